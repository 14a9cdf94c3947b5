"""Stage train_step: the training step of benchmarks/train_step.py at the Cityscapes preset,
case after case in this process: CDGCNet, the same net without CDGC (`baseline`) and CDGCNet
with its graph in float32 (`cdgc_fp32`); images/s, peak memory, FLOP/s against the matmul peak
measured in the same process, and each case against the baseline. The extras stage and the
trainer's plain step measure their cases with the same functions."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks import common
from benchmarks import train_step as bench
from lease.context import Ctx
from lease.measure import device, matmul_peak_tflops
from lease.results import record


def measure_train_step(
    ctx: Ctx,
    preset: str,
    cases: Sequence[str],
    peak: dict[str, Any],
    on_rows: Callable[[list[dict[str, Any]]], None],
) -> list[dict[str, Any]]:
    """Cases one after another in this process, each with its own model; on_rows(rows) after
    each case. The model FLOPs of cdgc_ckpt are those of cdgc (the recompute is no useful work).
    """
    p = bench.PRESETS[preset]
    rows: list[dict[str, Any]] = []
    flops: dict[str, float] = {}
    for case in cases:
        row: dict[str, Any] = dict(preset=preset, case=case, crop=p["crop"], batch=p["batch"],
                                   classes=p["classes"])  # fmt: skip
        if case == "torchvision" and not bench._has_torchvision():
            row["status"] = "skipped: torchvision not importable"
        elif ctx.left() < 15:
            row["status"] = "skipped: stage time used up"
        else:
            row.update(measure_case(ctx, case, p))
        if row["status"] == "ok":
            flops[case] = row["gflop_per_step"]
            if case == "cdgc_ckpt" and "cdgc" in flops:
                row["gflop_per_step"] = flops["cdgc"]
            achieved = row["gflop_per_step"] * 1e9 / (row["step_ms"] / 1e3) / 1e12
            row["achieved_tflops"] = round(achieved, 3)
            row["fraction_of_matmul_peak"] = round(achieved / peak["tflops"], 4)
        rows.append(row)
        _ratios(rows)
        on_rows(rows)
    return rows


def measure_case(
    ctx: Ctx,
    case: str,
    p: dict[str, Any],
    build: Callable[[Any], Any] | None = None,
    bf16: bool | None = None,
) -> dict[str, Any]:
    """Step times, FLOPs and the peak memory from model build to the last step (weights,
    gradients, momentum, activations) of one benchmarks/train_step.py case; `build(device)`
    makes another model for the case's step, `bf16` overrides its autocast (default: on CUDA)."""
    dev = device()
    bf16 = dev.type == "cuda" if bf16 is None else bf16
    gc.collect()  # the previous case's model, optimizer and inputs
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    try:
        with common.PeakMemory(dev) as mem:
            model = build(dev) if build else bench.build(case, p, dev)
            step = bench.make_step(case, model, p, dev, bf16=bf16)
            flops = common.count_flops(step)  # also the first warm-up step
            for _ in range(max(ctx.sizes.step_warmup - 1, 0)):
                step()
            times = [common.time_call(step, dev) for _ in range(ctx.sizes.step_iters)]
    except torch.OutOfMemoryError:
        return {"status": "out of memory"}
    finally:
        model = step = None  # free the case before the next one
    t = common.summary(times)
    return dict(
        status="ok",
        device=dev.type,
        depth=101 if case == "torchvision" else p["depth"],
        dtype="bf16 autocast" if bf16 else "fp32",
        step_ms=t["median_ms"],
        step_ms_min=t["min_ms"],
        step_ms_max=t["max_ms"],
        iters=t["n"],
        images_per_s=round(p["batch"] / (t["median_ms"] / 1e3), 3),
        peak_mem_mb=round(mem.absolute_peak_mb if dev.type == "cuda" else mem.peak_mb, 1),
        gflop_per_step=round(flops["total"] / 1e9, 2),
        flop_ops=list(flops["by_op"])[:6],
    )


def _ratios(rows: list[dict[str, Any]]) -> None:
    """time / memory of every case against the same net without CDGC and against torchvision."""
    for ref, suffix in (("baseline", "baseline"), ("torchvision", "torchvision")):
        for preset in {r["preset"] for r in rows}:
            base = next(
                (r for r in rows if r["preset"] == preset and r["case"] == ref and "step_ms" in r),
                None,
            )
            for r in rows:
                if base is None or r["preset"] != preset or "step_ms" not in r:
                    continue
                r[f"time_vs_{suffix}"] = round(r["step_ms"] / base["step_ms"], 3)
                if base["peak_mem_mb"] > 0:
                    r[f"mem_vs_{suffix}"] = round(r["peak_mem_mb"] / base["peak_mem_mb"], 3)


def stage_train_step(ctx: Ctx) -> None:
    peak = matmul_peak_tflops(device(), ctx.sizes.matmul_n)
    record(ctx.out, "train_step", {"matmul_peak": peak})
    # cdgc_fp32: what the split precision (the default) saves over a float32 graph
    cases = ("cdgc", "baseline", "cdgc_fp32")
    measure_train_step(
        ctx,
        ctx.sizes.train_preset,
        cases,
        peak,
        lambda rows: record(ctx.out, "train_step", {"records": rows}),
    )
