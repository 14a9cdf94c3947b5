"""Operations one training step of the CDGC module dispatches, against the number of classes.

    python benchmarks/cdgc_ops.py [--json PATH] [--classes 19 171] [--smoke]

Counts every aten operation (torch.utils._python_dispatch.TorchDispatchMode, forward and
backward) of one forward+backward of ``CDGCModule`` in training mode (graph "ds", ratio 1.0,
loss = mean of R^2), per reading, at each class count M with the same N and C: B=2, C=64,
33x33, random coarse logits (so nearly every class is present in each image) and a random
target with an ignored top band. Also the step's median time (3 steps after a warm-up, CPU).

Issue 19's goal: ops(M=171) <= 1.5 x ops(M=19): the fast path runs no Python loop over classes.
The count depends on B (one class-block attention per image), not on M.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import common

CLASSES = (19, 171)
SHAPE = dict(B=2, C=64, S=33)
SMOKE_SHAPE = dict(B=2, C=16, S=9)
GOAL = 1.5  # ops at the largest M over ops at the smallest, at most


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def inputs(b: int, c: int, s: int, m: int, seed: int = 0):
    """x (B, C, S, S), random coarse logits (B, M, S, S), random target (B, S, S)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, s, s, generator=g)
    coarse = torch.randn(b, m, s, s, generator=g)
    target = torch.randint(0, m, (b, s, s), generator=g)
    target[:, : max(s // 16, 1)] = 255
    return x, coarse, target


def measure(
    m: int,
    queries: str = "all",
    impl: str = "fast",
    shape: dict[str, int] = SHAPE,
    iters: int = 3,
    dtype: str = "float32",
) -> dict[str, Any]:
    """One record: ops of one training forward+backward, classes present, median time."""
    from cdgcnet.cdgc import CDGCModule

    b, c, s = shape["B"], shape["C"], shape["S"]
    torch.manual_seed(0)
    mod = CDGCModule(c, m, graph="ds", ratio=1.0, queries=queries, impl=impl).train()
    mod = mod.to(getattr(torch, dtype))
    x, coarse, target = inputs(b, c, s, m)
    x = x.to(getattr(torch, dtype))
    x.requires_grad_(True)

    def step() -> None:
        x.grad = None
        mod.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        mod(x, coarse, target).square().mean().backward()

    if iters:
        step()  # warm-up of the timed steps (the count is the same in every step)
    counter = OpCounter()
    with counter:
        step()
    times = [common.time_call(step, torch.device("cpu")) for _ in range(iters)]  # none: untimed
    present = coarse.argmax(1).flatten(1)  # (B, N)
    per_image = [int(p.unique().numel()) for p in present]
    return dict(
        queries=queries,
        impl=impl,
        dtype=dtype,
        **shape,
        M=m,
        classes_per_image=per_image,
        ops=sum(counter.ops.values()),
        top_ops=dict(counter.ops.most_common(8)),
        fwd_bwd_ms=round(statistics.median(times), 2) if times else None,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=list(CLASSES))
    ap.add_argument("--queries", nargs="+", default=["all", "members", "masked"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape (script check)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    records = []
    for queries in args.queries:
        for m in args.classes:
            records.append(measure(m, queries, shape=shape, iters=args.iters))
            print(f"{queries:>8} M={m:<4} {records[-1]['ops']:>6} ops", flush=True)
        rows = [r for r in records if r["queries"] == queries]
        ratio = rows[-1]["ops"] / rows[0]["ops"]
        for r in rows:
            r["ops_vs_fewest_classes"] = round(r["ops"] / rows[0]["ops"], 3)
        print(
            f"{queries}: ops at M={rows[-1]['M']} / M={rows[0]['M']} = {ratio:.2f} (goal <= {GOAL})"
        )
    cols = ["queries", "M", "ops", "ops_vs_fewest_classes", "fwd_bwd_ms"]
    common.print_table(records, cols, title="CDGC module, one training forward + backward (CPU)")
    if args.json:
        hw = common.hardware(torch.device("cpu"))
        common.write_results(args.json, "cdgc_ops", argv, hw, records, goal=f"ratio <= {GOAL}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
