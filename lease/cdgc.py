"""Stage cdgc: the CDGC module alone, forward + backward under bf16 autocast (fp32 on CPU), at
the presets' feature grids and, at the Cityscapes grid, the other precisions and readings
(`Sizes.cdgc_cases`): median time, model FLOP/s against the matmul peak measured here, peak
memory, keys and classes per image, top kernels, and the warnings it raised (a Triton or
grouped-kernel fallback announces itself there); then the two ways to take the block max."""

from __future__ import annotations

import statistics
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from benchmarks import common, step_profile
from cdgcnet.cdgc import CDGCModule, triton_blocks
from lease.context import Ctx
from lease.measure import device, matmul_peak_tflops
from lease.results import record


def stage_cdgc(ctx: Ctx) -> None:
    """Each case of `ctx.sizes.cdgc_cases` in turn (`measure_cdgc`), then the block max."""
    dev = device()
    peak = matmul_peak_tflops(dev, ctx.sizes.matmul_n)
    record(ctx.out, "cdgc", {"matmul_peak": peak, "triton": triton_blocks.blocks is not None})
    rows: list[dict[str, Any]] = []
    for case in ctx.sizes.cdgc_cases:
        if ctx.left() < 10:
            rows.append({**case, "status": "skipped: stage time used up"})
        else:
            rows.append(measure_cdgc(ctx, case, dev, peak))
        record(ctx.out, "cdgc", {"records": rows})
    if ctx.left() > 5:
        t, n, k = ctx.sizes.block_max_shape
        record(ctx.out, "cdgc", {"block_max_ms": block_max_ms(dev, t, n, k, 10)})
    record(ctx.out, "cdgc", {"triton_available_after": triton_blocks.available()})


def measure_cdgc(
    ctx: Ctx, case: dict[str, Any], dev: torch.device, peak: dict[str, Any]
) -> dict[str, Any]:
    """One case (B, C, side, M, queries, precision): timed steps, then one profiled step."""
    cuda = dev.type == "cuda"
    row: dict[str, Any] = dict(case)
    x, coarse, target = cdgc_inputs(case["B"], case["C"], case["side"], case["M"], dev)
    torch.manual_seed(0)
    mod = CDGCModule(
        case["C"], case["M"], graph="ds", ratio=1.0, queries=case["queries"],
        precision=case["precision"],
    ).to(dev).train()  # fmt: skip
    nodes = mod.node_sets(coarse, target)
    x.requires_grad_(True)

    def step() -> None:
        mod.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            out = mod(x, coarse, target)
        out.float().square().mean().backward()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with warnings.catch_warnings(record=True) as caught, common.PeakMemory(dev) as mem:
            warnings.simplefilter("always")
            for _ in range(2):
                step()
            times = [common.time_call(step, dev) for _ in range(ctx.sizes.step_iters)]
        with profile(activities=activities) as prof:
            step()
            common.sync(dev)
    except (RuntimeError, NotImplementedError) as exc:
        return {**row, "status": f"error: {type(exc).__name__}: {str(exc)[:300]}"}
    kernels = step_profile.device_ops(prof.key_averages())
    ms = common.summary(times)["median_ms"]
    gflop = cdgc_model_gflop(nodes, case["C"])
    tflops = gflop / ms  # GFLOP per ms = TFLOP/s
    row.update(
        status="ok",
        dtype="bf16 autocast" if cuda else "fp32",
        fwd_bwd_ms=ms,
        keys_per_image=[int(n.sum()) for n in nodes],
        classes_per_image=[int(n.flatten(1).any(1).sum()) for n in nodes],
        model_gflop=round(gflop, 2),
        achieved_tflops=round(tflops, 2),
        fraction_of_matmul_peak=round(tflops / peak["tflops"], 4),
        peak_mem_mb=round(mem.absolute_peak_mb if cuda else mem.peak_mb, 1),
        kernels=sum(e.count for e in kernels),
        warnings=sorted({str(w.message)[:200] for w in caught}),
        top_kernels=[
            {"name": e.key[:120], "calls": e.count, "ms": round(e.self_device_time_total / 1e3, 3)}
            for e in kernels[:10]
        ],
    )
    return row


def cdgc_model_gflop(nodes: Tensor, channels: int) -> float:
    """Model GFLOP of one CDGC forward + backward (backward = 2 x forward), from the node sets
    (B, G, H, W): per image N queries, T keys, K' classes present; the forward's products are
    q and k (2 N C^2 each), V' (T C^2), S and P V' (N T C each) and the aggregation (N K' C^2),
    2 FLOPs per multiply-add. The split precision's extra terms and the backward's recompute are
    not useful work and not counted."""
    b, _, h, w = nodes.shape
    n, c = h * w, channels
    total = 0.0
    for image in nodes.view(b, nodes.shape[1], n):
        t = int(image.sum())
        k = int(image.any(1).sum())
        total += 2 * (2 * n * c * c + t * c * c + 2 * n * t * c + n * k * c * c)
    return 3 * total / 1e9


def cdgc_inputs(
    b: int, c: int, side: int, m: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """X after a BN + ReLU in bf16 (as the network gives it), smooth random coarse logits and a
    target that disagrees with them in places (so hard negatives and positives exist)."""
    g = torch.Generator().manual_seed(0)
    low = torch.randn(b, m, 6, 6, generator=g)
    coarse = 4.0 * F.interpolate(low, size=(side, side), mode="bilinear")
    noisy = low + 0.5 * torch.randn(low.shape, generator=g)
    target = F.interpolate(noisy, size=(side, side), mode="bilinear").argmax(1)
    x = torch.relu(torch.randn(b, c, side, side, generator=g)).bfloat16()
    return x.to(device), coarse.to(device), target.to(device)


def block_max_ms(device: torch.device, t: int, n: int, k: int, iters: int) -> dict[str, float]:
    """The two ways to take a max over each class's key block of S (T, n): torch.segment_reduce
    (what the fast path uses on CUDA) and scatter_reduce amax (what it uses on CPU)."""
    s = torch.randn(t, n, device=device)
    lengths = torch.full((k,), t // k, device=device)
    lengths[-1] += t - int(lengths.sum())
    cls = torch.repeat_interleave(torch.arange(k, device=device), lengths)
    index = cls[:, None].expand(t, n)

    def seg() -> None:
        torch.segment_reduce(s, "max", lengths=lengths, axis=0)

    def scatter() -> None:
        s.new_full((k, n), float("-inf")).scatter_reduce_(0, index, s, "amax")

    out = {}
    for name, fn in (("segment_reduce", seg), ("scatter_reduce", scatter)):
        fn()
        out[name] = round(statistics.median(common.time_call(fn, device) for _ in range(iters)), 3)
    return out
