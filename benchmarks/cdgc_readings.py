"""Cost of the three readings of section 3.3: CDGC queries="all" (default), "members", "masked".

    OMP_NUM_THREADS=1 python benchmarks/cdgc_readings.py --json benchmarks/results/cdgc_readings_cpu.json
    python benchmarks/cdgc_readings.py --smoke --json /tmp/r.json      # a tiny shape (script check)

The readings differ in which query-key pairs carry attention: "members" those inside each class's
node set (sum_m |V_m|^2), "all" every node against each class's node set (N * sum_m |V_m|),
"masked" the same pairs as "all" plus N - |V_m| zero keys per class and uniform non-member
queries. The fast path (impl "fast", the default) computes N * sum_m |V_m| scores for each of
them, in chunks of queries, and recomputes each chunk in backward; "all" also runs with
checkpoint=True (then only the module's input is held for backward). Inputs as in
cdgc_module.py (common.cdgc_inputs: smooth class blobs, a perturbed target), module in training
mode with graph="ds", ratio 1.0, fp32 on CPU (precision "split" acts under bf16 autocast only).

Per case, in fresh subprocesses (common.run_in_subprocess): forward+backward time (median of
--iters after a warm-up), its peak memory and what is held between forward and backward, and the
no-grad forward of inference (eval mode): time and peak memory. CPU memory: the resident-set
high-water mark over the start of the region with glibc's mmap threshold at 64 KiB
(common.PeakMemory); CUDA: max_memory_allocated. Needs torch only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from benchmarks import common

CPU_SHAPES = [
    dict(B=2, C=256, H=24, W=24, M=19),
    dict(B=2, C=256, H=48, W=48, M=19),
    dict(B=2, C=256, H=48, W=48, M=60),
]
SMOKE_SHAPES = [dict(B=1, C=16, H=10, W=12, M=5)]
CUDA_SHAPES = [dict(B=2, C=512, H=97, W=97, M=19), dict(B=2, C=512, H=65, W=65, M=171)]
VARIANTS = [("all", False), ("members", False), ("masked", False), ("all", True)]  # (queries, ckpt)


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One (shape, reading) measurement in this process; returns the JSON record."""
    import torch

    from cdgcnet.cdgc import CDGCModule

    device = torch.device(case["device"])
    b, c, h, w, m = (case[k] for k in "BCHWM")
    torch.manual_seed(0)
    mod = CDGCModule(c, m, graph="ds", ratio=1.0, queries=case["queries"])
    mod.checkpoint = case["checkpoint"]
    mod = mod.to(device).train()
    cells = (max(h // 12, 2), max(w // 12, 2))
    x, coarse, target = common.cdgc_inputs(b, c, h, w, m, cells, device)
    x.requires_grad_(True)
    record = dict(case, status="ok", threads=torch.get_num_threads())
    with torch.no_grad():
        nodes = mod.node_sets(coarse, target)  # (B, M, H, W)
    record["memberships_per_node"] = round(nodes.sum().item() / (b * h * w), 3)
    # The query-key pairs that carry attention in each reading, and the scores the fast path
    # computes for every reading (all queries against the keys of every class present).
    sizes = nodes.flatten(2).sum(-1).double()  # (B, M)
    pairs = (sizes * sizes).sum() if case["queries"] == "members" else (h * w) * sizes.sum()
    record["attention_pairs"] = int(pairs.item())
    record["scores"] = int((h * w) * sizes.sum().item())
    held: list[float] = []

    def memory_now() -> float:
        if device.type == "cuda":
            return torch.cuda.memory_allocated() / 2**20
        return common.status_mb("VmRSS")

    def train_step() -> None:
        x.grad = None
        mod.zero_grad(set_to_none=True)
        out = mod(x, coarse, target)
        held.append(memory_now())
        out.square().mean().backward()

    def infer_step() -> None:
        with torch.no_grad():
            mod(x, coarse)

    try:
        train_step()  # warm-up
        x.grad = None
        mod.zero_grad(set_to_none=True)
        held.clear()
        with common.PeakMemory(device) as mem:
            times = [common.time_call(train_step, device) for _ in range(case["iters"])]
        record["fwd_bwd_ms"] = round(statistics.median(times), 2)
        record["peak_mem_mb"] = round(mem.peak_mb, 1)
        record["held_after_fwd_mb"] = round(max(held) - mem.base_mb, 1)
        mod.eval()
        infer_step()
        with common.PeakMemory(device) as mem:
            times = [common.time_call(infer_step, device) for _ in range(case["iters"])]
        record["infer_ms"] = round(statistics.median(times), 2)
        record["infer_peak_mem_mb"] = round(mem.peak_mb, 1)
    except torch.OutOfMemoryError:
        record["status"] = "out of memory"
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if common.child_main(argv, run_case):
        return 0
    p = argparse.ArgumentParser(
        prog="benchmarks/cdgc_readings.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("--json", type=Path, help="write the records to this JSON file")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per case")
    p.add_argument("--smoke", action="store_true", help="one tiny CPU shape (script check)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    shapes = SMOKE_SHAPES if args.smoke else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    records = []
    for shape in shapes:
        for queries, ckpt in VARIANTS:
            case = dict(
                shape, device=device.type, queries=queries, checkpoint=ckpt, iters=args.iters
            )
            rec = common.run_in_subprocess(Path(__file__), case, timeout_s=1800)
            records.append({**case, **rec})
    columns = ["B", "C", "H", "W", "M", "queries", "checkpoint", "attention_pairs", "scores",
               "fwd_bwd_ms", "peak_mem_mb", "held_after_fwd_mb", "infer_ms", "infer_peak_mem_mb",
               "status"]  # fmt: skip
    common.print_table(records, columns, title=f"CDGC readings on {device.type}")
    if args.json:
        cmd = "python benchmarks/cdgc_readings.py " + " ".join(argv)
        common.write_json(
            args.json,
            {"command": cmd.strip(), "hardware": common.hardware(device), "records": records},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
