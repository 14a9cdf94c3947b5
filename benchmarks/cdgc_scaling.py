"""How the CDGC module's cost grows with the feature size N and the class count M.

    python benchmarks/cdgc_scaling.py [--full] [--queries Q] [--C 128] [--B 1] [--iters N]
                                      [--json PATH] [--dense-budget-gb G] [--smoke]

The module alone (training mode, graph "ds", ratio 1.0, all three parts, the model's default
reading queries="all" unless --queries says otherwise), dense vs fast, forward + backward
(loss = mean of R^2), over feature sides S (N = S*S nodes) and class counts M.
Inputs: coarse logits made of smooth random class blobs, a target that mostly agrees with them
(the same blobs, perturbed) with an ignored top band, so node sets look like a training step.

Per case: median time (dense and fast of one shape take turns in one process), peak memory
(a fresh subprocess per case, see benchmarks/common.py), T = sum_m |V_m| memberships,
sum_m |V_m|^2 (the "members" reading's query-key pairs), N*T (the scores the fast path computes
for every reading: every node is a query of every class block) and M*N^2 (the dense path's).
Fits (least squares in log-log): peak memory vs N per implementation and M (fast should be
~1, dense ~2), and time vs N*T.

Dense cases whose estimated memory (6 x B x M x N^2 x 4 bytes: scores, masked logits, softmax,
adjacency and their gradients) exceeds --dense-budget-gb are recorded as skipped, not run.
Default grid: CPU S in {33, 49, 65}, M in {19, 171}, C=128, B=1, fp32; --full or CUDA:
S in {33, 49, 65, 97, 129}, M in {19, 21, 171} (CUDA: C=512, bf16 autocast, precision "split").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import torch

from benchmarks import common

FULL_SIDES = (33, 49, 65, 97, 129)
FULL_CLASSES = (19, 21, 171)
CPU_SIDES = (33, 49, 65)
CPU_CLASSES = (19, 171)
SMOKE_SIDES = (9, 13)
SMOKE_CLASSES = (5,)


def make_inputs(b: int, c: int, s: int, m: int, device: torch.device, seed: int = 0):
    """x (B,C,S,S), coarse logits (B,M,S,S) of class blobs, target (B,S,S) mostly agreeing."""
    cells = max(s // 8, 3)
    return common.cdgc_inputs(b, c, s, s, m, (cells, cells), device, seed)


def build(spec: dict[str, Any], device: torch.device):
    from cdgcnet.cdgc import CDGCModule

    torch.manual_seed(0)
    mod = CDGCModule(
        spec["C"], spec["M"], graph="ds", ratio=1.0, impl="fast", queries=spec["queries"]
    )
    return mod.to(device).train()


def make_step(mod, x, coarse, target, device: torch.device, impl: str):
    x = x.detach().requires_grad_(True)
    bf16 = device.type == "cuda"

    def step() -> None:
        mod.impl = impl
        x.grad = None
        mod.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = mod(x, coarse, target)
        out.float().square().mean().backward()

    return step


def dense_estimate_gb(b: int, m: int, n: int, bytes_per: int = 4) -> float:
    return 6 * b * m * n * n * bytes_per / 2**30


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Subprocess: peak memory of one forward+backward after a warm-up step."""
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    mod = build(spec, device)
    x, coarse, target = make_inputs(spec["B"], spec["C"], spec["S"], spec["M"], device)
    step = make_step(mod, x, coarse, target, device, spec["impl"])
    try:
        step()  # warm-up
        with common.PeakMemory(device) as mem:
            step()
    except torch.OutOfMemoryError:
        return {"peak_mem_mb": None, "status": "does not fit (out of memory)"}
    return {"peak_mem_mb": round(mem.peak_mb, 1), "memory_method": mem.method}


def node_stats(mod, coarse, target) -> dict[str, int]:
    nodes = mod.node_sets(coarse, target)  # (B, M, S, S)
    sizes = nodes.flatten(2).sum(-1).double()  # (B, M) |V_m| per image
    n = nodes.shape[-2] * nodes.shape[-1]
    return {"T": int(sizes.sum()), "sum_V2": int((sizes**2).sum()), "N_T": int(n * sizes.sum())}


def run(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    if args.smoke:
        sides, classes = SMOKE_SIDES, SMOKE_CLASSES
    elif args.full or cuda:
        sides, classes = FULL_SIDES, FULL_CLASSES
    else:
        sides, classes = CPU_SIDES, CPU_CLASSES
    budget = args.dense_budget_gb
    if budget is None:
        if cuda:
            free, _ = torch.cuda.mem_get_info(device)
            budget = 0.9 * free / 2**30
        else:
            budget = min(0.5 * common.available_memory_gb(), 8.0)
    rows = []
    for m in classes:
        for s in sides:
            n = s * s
            spec = dict(B=args.B, C=args.C, S=s, M=m, device=device.type, queries=args.queries)
            spec["threads"] = torch.get_num_threads()
            mod = build(spec, device)
            x, coarse, target = make_inputs(args.B, args.C, s, m, device)
            stats = node_stats(mod, coarse, target)
            est = dense_estimate_gb(args.B, m, n, 2 if cuda else 4)
            impls = ["fast"]
            if est <= budget:
                impls.insert(0, "dense")
            steps = {i: make_step(mod, x, coarse, target, device, i) for i in impls}
            try:
                times = common.interleaved_times(steps, device, args.warmup, args.iters)
            except torch.OutOfMemoryError:
                if "dense" not in steps:
                    raise
                steps.pop("dense")
                impls.remove("dense")
                torch.cuda.empty_cache()
                times = common.interleaved_times(steps, device, args.warmup, args.iters)
            del steps, mod
            for impl in ("dense", "fast"):
                row: dict[str, Any] = dict(
                    impl=impl,
                    queries=args.queries,
                    device=device.type,
                    dtype="bf16 autocast" if cuda else "fp32",
                    B=args.B,
                    C=args.C,
                    S=s,
                    N=n,
                    M=m,
                    **stats,
                    M_N2=args.B * m * n * n,
                )
                if impl not in impls:
                    row["status"] = (
                        f"does not fit: dense estimate {est:.1f} GiB > budget {budget:.1f} GiB"
                        if est > budget
                        else "does not fit (out of memory)"
                    )
                    rows.append(row)
                    continue
                t = common.summary(times[impl])
                row["fwd_bwd_ms"] = t["median_ms"]
                row["iters"] = t["n"]
                if not args.no_memory:
                    child = dict(spec, impl=impl)
                    row.update(common.run_in_subprocess(Path(__file__), child, args.timeout))
                row.setdefault("status", "ok")
                rows.append(row)
            done = [r for r in rows[-len(impls) :] if r.get("fwd_bwd_ms") is not None]
            print(
                f"S={s} M={m}: " + ", ".join(f"{r['impl']} {r['fwd_bwd_ms']:.1f} ms" for r in done),
                flush=True,
            )
            if cuda:
                torch.cuda.empty_cache()
    return rows


def fits(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Growth exponents per (impl, M): memory vs N, time vs N, time vs N*T."""
    out = []
    for impl in ("dense", "fast"):
        for m in sorted({r["M"] for r in rows}):
            sel = [r for r in rows if r["impl"] == impl and r["M"] == m and r.get("fwd_bwd_ms")]
            if len(sel) < 2:
                continue
            with_mem = [r for r in sel if r.get("peak_mem_mb")]
            out.append(
                dict(
                    impl=impl,
                    M=m,
                    points=len(sel),
                    mem_vs_N=common.fit_exponent(
                        [r["N"] for r in with_mem], [r["peak_mem_mb"] for r in with_mem]
                    ),
                    time_vs_N=common.fit_exponent(
                        [r["N"] for r in sel], [r["fwd_bwd_ms"] for r in sel]
                    ),
                    time_vs_N_T=common.fit_exponent(
                        [r["N_T"] for r in sel], [r["fwd_bwd_ms"] for r in sel]
                    ),
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if common.child_main(argv, memory_child):
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--full", action="store_true", help="the whole grid (default on CUDA)")
    ap.add_argument("--queries", default="all", help="the reading (default: the model's)")
    ap.add_argument("--C", type=int, default=None, help="channels (CPU 128, CUDA 512)")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dense-budget-gb", type=float, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--smoke", action="store_true", help="tiny grid (script check)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = common.pick_device(args.device)
    if args.C is None:
        args.C = 16 if args.smoke else (512 if device.type == "cuda" else 128)
    if args.smoke:
        args.iters = min(args.iters, 2)
    hw = common.hardware(device)
    print(f"hardware: {hw}")
    rows = run(args, device)
    cols = ["impl", "S", "N", "M", "T", "N_T", "M_N2", "fwd_bwd_ms", "peak_mem_mb", "status"]
    common.print_table(rows, cols, title="CDGC module, forward + backward")
    fit_rows = fits(rows)
    common.print_table(
        fit_rows,
        ["impl", "M", "points", "mem_vs_N", "time_vs_N", "time_vs_N_T"],
        title="growth exponents k (y ~ x^k, log-log least squares)",
    )
    if args.json:
        gpu_rows = common.gpu_rows(device.type == "cuda")
        common.write_results(
            args.json, "cdgc_scaling", argv, hw, rows, gpu_rows=gpu_rows, fits=fit_rows
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
