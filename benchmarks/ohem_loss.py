"""The OHEM loss: the sync-free masked mean against the gather of the kept pixels.

    python benchmarks/ohem_loss.py [--device auto|cpu|cuda] [--iters N] [--json PATH] [--smoke]

`cdgcnet.losses.ohem_cross_entropy` keeps every shape fixed: per-pixel CE over the whole
batch, a top-k of fixed size k = min_kept, a `torch.where` between the two selection rules,
and a masked mean. The formulation it replaced (kept here as `gather_ohem`) gathered the
valid pixels with `nonzero`, read the hard count on the host to pick the rule, and indexed
the kept pixels with a boolean mask: three host-device syncs and copies of (P, M) logits.

Per preset label shape (refined logits at 1/8 resolution, upsampled bilinearly to the crop,
as in training) and two regimes, forward + backward of the loss alone; the two formulations
take turns in one process (median time); peak memory in a fresh subprocess per case (CPU) or
around the step (CUDA). "early": random logits, nearly every pixel hard (the threshold rule);
"late": confident logits of smooth class blobs, hard only along the blob boundaries (a few
per cent of the pixels: the top-k rule at min_kept = 100k).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import torch
import torch.nn.functional as F

from benchmarks import common
from cdgcnet.losses import ohem_cross_entropy, upsample_to

# name: (batch per GPU, classes, crop) of the training presets (launch/config.py)
SHAPES = {
    "cityscapes": (2, 19, 769),
    "voc": (4, 21, 513),
    "cocostuff": (4, 171, 520),
}
SMOKE_SHAPES = {"smoke": (2, 5, 33)}
MIN_KEPT = 100_000
THRESH = 0.7
IMPLS = ("masked", "gather")


def gather_ohem(logits, target, thresh=THRESH, min_kept=MIN_KEPT, ignore_index=255):
    """The replaced formulation (data-dependent shapes and host reads); the tests' reference."""
    up = upsample_to(logits, target.shape[-2:])
    flat = up.permute(0, 2, 3, 1).reshape(-1, up.shape[1])
    t = target.reshape(-1)
    valid = torch.nonzero(t != ignore_index).squeeze(1)
    if valid.numel() == 0:
        return up.sum() * 0.0
    with torch.no_grad():
        prob = torch.softmax(flat[valid], 1).gather(1, t[valid, None]).squeeze(1)
        hard = prob < thresh
        if int(hard.sum()) >= min_kept:
            kept = valid[hard]
        elif valid.numel() <= min_kept:
            kept = valid
        else:
            kept = valid[torch.topk(prob, min_kept, largest=False).indices]
    return F.cross_entropy(flat[kept], t[kept])


def make_inputs(shape: tuple[int, int, int], regime: str, device: torch.device, seed: int = 0):
    """Refined logits (B, M, S, S) at 1/8 of the crop and the crop's labels (B, crop, crop)."""
    b, m, crop = shape
    s = (crop - 1) // 8 + 1
    g = torch.Generator().manual_seed(seed)
    coarse_target = common.blob_labels(b, s, s, m, cells=3, seed=seed)  # (B, S, S)
    logits = torch.randn(b, m, s, s, generator=g)
    if regime == "late":  # confident and right, except where upsampling blurs the boundaries
        logits += 9.0 * F.one_hot(coarse_target, m).permute(0, 3, 1, 2)
    full = F.interpolate(coarse_target[:, None].float(), size=(crop, crop), mode="nearest")
    full = full[:, 0].long()
    full[:, : crop // 16] = 255  # an ignored band, as the padded or void regions of a crop
    return logits.to(device), full.to(device)


def _loss_fn(impl: str):
    if impl == "gather":
        return gather_ohem
    return lambda x, t: ohem_cross_entropy(x, t, THRESH, MIN_KEPT, check_labels=False)


def make_step(impl: str, logits, target):
    x = logits.detach().requires_grad_(True)
    fn = _loss_fn(impl)

    def step() -> None:
        x.grad = None
        fn(x, target).backward()

    return step


def hard_fraction(logits, target) -> float:
    up = upsample_to(logits, target.shape[-2:])
    valid = target != 255
    nll = F.cross_entropy(up, target, ignore_index=255, reduction="none")
    return float(((torch.exp(-nll) < THRESH) & valid).sum() / valid.sum())


def peak_case(case: dict[str, Any]) -> dict[str, Any]:
    """Child process (CPU) or in-process (CUDA): peak memory of one step."""
    device = torch.device(case["device"])
    logits, target = make_inputs(tuple(case["shape"]), case["regime"], device)
    step = make_step(case["impl"], logits, target)
    step()
    common.sync(device)
    with common.PeakMemory(device) as mem:
        step()
    return {"peak_mb": round(mem.peak_mb, 1), "memory_method": mem.method}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--iters", type=int, default=7, help="timed steps per case (median)")
    p.add_argument("--json", help="write the records here")
    p.add_argument("--smoke", action="store_true", help="one tiny shape (for the tests)")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    iters = 2 if args.smoke else args.iters
    rows = []
    for name, shape in shapes.items():
        for regime in ("early", "late"):
            logits, target = make_inputs(shape, regime, device)
            steps = {impl: make_step(impl, logits, target) for impl in IMPLS}
            times = common.interleaved_times(steps, device, warmup=1, iters=iters)
            frac = hard_fraction(logits, target)
            del logits, target, steps
            for impl in IMPLS:
                case = {"device": device.type, "shape": list(shape), "regime": regime}
                case["impl"] = impl
                if device.type == "cuda":
                    mem = peak_case(case)
                else:
                    mem = common.run_in_subprocess(Path(__file__), case, timeout_s=600)
                b, m, crop = shape
                rows.append(
                    {
                        "preset": name,
                        "shape": f"B={b} M={m} {crop}x{crop}",
                        "regime": regime,
                        "hard": f"{frac:.1%}",
                        "impl": impl,
                        **common.summary(times[impl]),
                        **mem,
                    }
                )
    for row in rows:
        if row["impl"] == "masked":
            ref = next(
                r
                for r in rows
                if r["impl"] == "gather"
                and (r["preset"], r["regime"]) == (row["preset"], row["regime"])
            )
            row["time_vs_gather"] = round(row["median_ms"] / ref["median_ms"], 3)
            if "peak_mb" in row and "peak_mb" in ref:
                row["memory_vs_gather"] = round(row["peak_mb"] / ref["peak_mb"], 3)
    common.print_table(
        rows,
        [
            "preset",
            "shape",
            "regime",
            "hard",
            "impl",
            "median_ms",
            "peak_mb",
            "time_vs_gather",
            "memory_vs_gather",
        ],
        title=f"OHEM loss, forward + backward ({device.type})",
    )
    if args.json:
        hw = common.hardware(device)
        common.write_results(
            args.json, "ohem_loss", argv, hw, rows, min_kept=MIN_KEPT, thresh=THRESH
        )
    return 0


if __name__ == "__main__":
    if not common.child_main(sys.argv[1:], peak_case):
        sys.exit(main())
