"""Forward+backward time and peak memory of the CDGC module, dense vs fast.

    python benchmarks/cdgc_module.py [--json PATH] [--iters N] [--smoke] [--queries Q]
    python benchmarks/cdgc_module.py --precision [--errors] [--json PATH] [--iters N]

CPU threads follow torch's default (set OMP_NUM_THREADS to choose).

Shapes: CPU (B=2, C=256, 48x48, M=19, fp32); with CUDA also the Cityscapes training shape
(B=2, C=512, 97x97, M=19, bf16 autocast) and the COCO-Stuff shape (B=2, C=512, 65x65, M=171,
bf16 autocast). The module runs in training mode with graph="ds", ratio=1.0, the model's
default reading (queries="all"; --queries picks another) and precision ("split"), on a realistic
coarse map (smooth random class blobs) and a target that mostly agrees with it (a perturbed
version of the same blobs, with an ignored top band), so node sets look like a real training
step; memberships_per_node records how many node sets a pixel is in on average.

Each case runs in fresh subprocesses: one untimed warm-up step, then --iters timed steps (the
median is reported). On CPU memory is measured in a second subprocess with glibc's mmap
threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident
set; the timing run keeps the default allocator. Memory is measured against a baseline taken in that process after the
module, the inputs and the warm-up (whose freed heap goes back to the OS via malloc_trim):
- peak_mem_mb: on CPU the resident-set high-water mark (VmHWM, reset through
  /proc/self/clear_refs) minus VmRSS at the baseline; on CUDA torch.cuda.max_memory_allocated()
  minus memory_allocated() at the baseline.
- held_after_fwd_mb: memory still held between forward and backward (saved activations, which
  gradient checkpointing reduces), same baseline.
A case that runs out of memory is recorded as such (numbers null, status "out of memory").

--precision measures the precision modes instead (cdgcnet/cdgc/precision.py): the Cityscapes
training shape, the fast path, bf16 autocast on every device (CPU included: the bf16 products
emulated as the GPU computes them), with precision "split" (default), "fp32" and "autocast".
--errors adds their gradient error against float64 at C=512, M=19, 33x33 for each reading, at
the initial weights and with phi, phi' x2 (tests/cdgcnet/test_cdgc_precision.py measures it).
Needs torch only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from benchmarks import common

CPU_SHAPES = [dict(B=2, C=256, H=48, W=48, M=19)]
SMOKE_SHAPES = [dict(B=1, C=16, H=12, W=10, M=5)]
CUDA_SHAPES = [dict(B=2, C=512, H=97, W=97, M=19), dict(B=2, C=512, H=65, W=65, M=171)]
VARIANTS = [("dense", False), ("fast", False), ("fast", True)]  # (impl, checkpoint)
PRECISION_SHAPE = dict(B=2, C=512, H=97, W=97, M=19)  # Cityscapes: 769 px crops, output stride 8
PRECISIONS = ("split", "fp32", "autocast")


def _inputs(B, C, H, W, M, device, seed=0):
    cells = (max(H // 12, 2), max(W // 12, 2))
    return common.cdgc_inputs(B, C, H, W, M, cells, device, seed)


def run_case(case: dict) -> dict:
    """One (shape, impl) measurement in this process; returns the JSON record."""
    import torch

    from cdgcnet.cdgc import CDGCModule

    device = torch.device(case["device"])
    cuda = device.type == "cuda"
    B, C, H, W, M = (case[k] for k in "BCHWM")
    torch.manual_seed(0)
    precision = case.get("precision", "split")
    queries = case.get("queries", "all")
    mod = CDGCModule(
        C,
        M,
        graph="ds",
        ratio=1.0,
        impl=case["impl"],
        checkpoint=case["checkpoint"],
        precision=precision,
        queries=queries,
    )
    mod = mod.to(device).train()
    x, coarse, target = _inputs(B, C, H, W, M, device)
    x.requires_grad_(True)
    autocast = cuda or case.get("bf16", False)
    dtype = torch.bfloat16 if autocast else torch.float32
    record = dict(
        impl=case["impl"],
        device=device.type,
        B=B,
        C=C,
        H=H,
        W=W,
        M=M,
        fwd_bwd_ms=None,
        peak_mem_mb=None,
        checkpoint=case["checkpoint"],
        queries=queries,
        precision=precision,
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        status="ok",
    )
    with torch.no_grad():
        record["memberships_per_node"] = round(
            mod.node_sets(coarse, target).sum().item() / (B * H * W), 3
        )

    def memory_now() -> float:
        return torch.cuda.memory_allocated() / 2**20 if cuda else common.status_mb("VmRSS")

    held = []  # memory still held between forward and backward (what checkpointing saves)

    def step():
        x.grad = None
        mod.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = mod(x, coarse, target)
        held.append(memory_now())
        out.float().square().mean().backward()

    times = []
    try:
        step()  # warm-up: one-time costs (library code paged in, thread pools) are not the case's
        x.grad = None  # the measured steps allocate their gradients anew, so they count
        mod.zero_grad(set_to_none=True)
        held.clear()
        # The baseline: after the warm-up, its freed heap handed back to the OS (CPU).
        with common.PeakMemory(device) as mem:
            for _ in range(case["iters"]):
                times.append(common.time_call(step, device))
    except torch.OutOfMemoryError:
        record["status"] = "out of memory"
        return record
    peak, base = mem.peak_mb, mem.base_mb
    record["fwd_bwd_ms"] = round(statistics.median(times), 2)
    record["peak_mem_mb"] = round(peak, 1)
    record["held_after_fwd_mb"] = round(max(held) - base, 1)
    return record


def _dense_estimate_gb(s: dict, bytes_per: int) -> float:
    # The dense path holds several (B, M, N, N) tensors at once (scores, softmax, grads).
    n = s["H"] * s["W"]
    return 6 * s["B"] * s["M"] * n * n * bytes_per / 2**30


def _spawn(case: dict) -> dict:
    """Run one case in fresh subprocesses; on CPU time and memory are measured separately."""
    if case["device"] != "cpu":
        return _spawn_one(case, {})
    timed = _spawn_one(dict(case, measure="time"), {})
    # Every allocation of 64 KiB or more gets its own mapping and is unmapped on free, so the
    # resident set follows live memory instead of glibc's retained heap; this slows allocation,
    # hence the separate timing run above.
    mem = _spawn_one(dict(case, measure="memory", iters=1), {"MALLOC_MMAP_THRESHOLD_": "65536"})
    for key in ("peak_mem_mb", "held_after_fwd_mb"):
        timed[key] = mem.get(key)
    if timed["status"] == "ok" and mem["status"] != "ok":
        timed["status"] = f"memory run: {mem['status']}"
    return timed


def _spawn_one(case: dict, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--_case", json.dumps(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        oom = proc.returncode in (-9, 137)  # killed by the kernel's OOM killer
        status = "out of memory (killed)" if oom else f"failed: {tail[0]}"
        return dict(
            impl=case["impl"],
            device=case["device"],
            **{k: case[k] for k in "BCHWM"},
            fwd_bwd_ms=None,
            peak_mem_mb=None,
            checkpoint=case["checkpoint"],
            queries=case.get("queries", "all"),
            precision=case.get("precision", "split"),
            status=status,
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v, unit="") -> str:
    return "-" if v is None else f"{v:,.1f}{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the records to this JSON file")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per case")
    parser.add_argument("--smoke", action="store_true", help="one tiny CPU shape (script check)")
    parser.add_argument("--queries", default="all", help="the reading (default: the model's)")
    parser.add_argument(
        "--precision",
        action="store_true",
        help="the precision modes instead: Cityscapes shape, bf16 autocast, split/fp32/autocast",
    )
    parser.add_argument(
        "--errors", action="store_true", help="with --precision: gradient errors per mode, reading"
    )
    parser.add_argument("--_case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._case:
        print(json.dumps(run_case(json.loads(args._case))))
        return 0

    import torch

    if args.precision:
        return _precision_main(args, torch.cuda.is_available())
    cases = [(s, "cpu") for s in (SMOKE_SHAPES if args.smoke else CPU_SHAPES)]
    if torch.cuda.is_available() and not args.smoke:
        cases += [(s, "cuda") for s in CUDA_SHAPES]
    records = []
    for shape, device in cases:
        for impl, ckpt in VARIANTS:
            case = dict(shape, device=device, impl=impl, checkpoint=ckpt, iters=args.iters)
            case["queries"] = args.queries
            est = _dense_estimate_gb(shape, 4)
            if impl == "dense" and device == "cpu" and est > 0.8 * common.available_memory_gb():
                rec = dict(case, fwd_bwd_ms=None, peak_mem_mb=None, status="skipped: needs ~")
                rec["status"] += f"{est:.0f} GB, {common.available_memory_gb():.0f} GB available"
                rec.pop("iters")
            else:
                rec = _spawn(case)
            records.append(rec)
            print(
                f"{rec['device']:>5} B={rec['B']} C={rec['C']} {rec['H']}x{rec['W']} "
                f"M={rec['M']:<3} {rec['impl']:>5}{' +ckpt' if ckpt else '      '} "
                f"{_fmt(rec['fwd_bwd_ms'], ' ms'):>13} {_fmt(rec['peak_mem_mb'], ' MB'):>13}  "
                f"{rec['status']}",
                flush=True,
            )
    for shape, device in cases:
        rows = {
            (r["impl"], r["checkpoint"]): r
            for r in records
            if r["device"] == device and all(r[k] == shape[k] for k in "BCHWM")
        }
        d, s = rows[("dense", False)], rows[("fast", False)]
        if d["fwd_bwd_ms"] and s["fwd_bwd_ms"]:
            print(
                f"{device} {shape}: fast is {d['fwd_bwd_ms'] / s['fwd_bwd_ms']:.1f}x faster, "
                f"{d['peak_mem_mb'] / max(s['peak_mem_mb'], 1e-3):.1f}x less peak memory"
            )
    if args.json:
        common.write_json(args.json, records)
    return 0


def _precision_main(args: argparse.Namespace, cuda: bool) -> int:
    shape = SMOKE_SHAPES[0] if args.smoke else PRECISION_SHAPE
    records = []
    for device in ["cpu"] + (["cuda"] if cuda and not args.smoke else []):
        for precision in PRECISIONS:
            case = dict(shape, device=device, impl="fast", checkpoint=False, bf16=True)
            rec = _spawn(dict(case, precision=precision, iters=args.iters))
            records.append(rec)
            print(
                f"{device:>5} B={rec['B']} C={rec['C']} {rec['H']}x{rec['W']} M={rec['M']} "
                f"bf16 autocast, precision={precision:<8} {_fmt(rec['fwd_bwd_ms'], ' ms'):>13} "
                f"{_fmt(rec['peak_mem_mb'], ' MB'):>13}  {rec['status']}",
                flush=True,
            )
    errors = _errors() if args.errors else []
    if args.json:
        common.write_json(args.json, {"timings": records, "errors": errors})
    return 0


def _errors() -> list[dict]:
    """Relative L2 errors (percent) of the output and every gradient against float64 on CPU, per
    reading, weights and mode."""
    import torch

    from cdgcnet.cdgc import QUERIES
    from tests.cdgcnet.test_cdgc_precision import errors

    rows = []
    for queries in QUERIES:
        for sharpen in (1.0, 2.0):
            for precision in PRECISIONS:
                errs = errors(queries, precision, sharpen, torch.device("cpu"))
                rows.append(dict(queries=queries, phi_scale=sharpen, precision=precision))
                rows[-1].update({f"{k}_pct": round(100 * v, 2) for k, v in errs.items()})
                print(f"{queries:>8} x{sharpen} {precision:>8}: " + ", ".join(
                    f"{k} {100 * v:.2f}%" for k, v in errs.items()
                ), flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    sys.exit(main())
