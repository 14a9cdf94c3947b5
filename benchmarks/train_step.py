"""Training-step throughput, peak memory and achieved FLOP/s of CDGCNet against baselines.

    python benchmarks/train_step.py [--preset auto|cpu|cityscapes|voc|cocostuff|paper]
                                    [--iters N] [--warmup N] [--json PATH] [--smoke]

One full step = forward, CDGCLoss (eq. 5; CE + 0.4 CE(aux) for torchvision), backward, SGD step.
Cases, side by side in one run (their steps take turns, so machine noise hits all alike):
- cdgc:        CDGCNet (ASPP + CDGC, graph "ds", the model's defaults: queries "all", impl
               "fast", cdgc_precision "split"), CDGC checkpointing off
- cdgc_ckpt:   the same model object with CDGC checkpointing on
- baseline:    the same backbone + ASPP without the CDGC module (context="none"; DeepLabV3-style)
- cdgc_nchw:   the cdgc model object fed NCHW (contiguous) batches instead of channels-last
- cdgc_compiled (--compile): CDGCNet with torch.compile on the backbone and ASPP (the
               compile happens in the warm-up steps, which are not timed)
- cdgc_fp32, cdgc_graph_bf16 (CUDA only, where bf16 autocast makes the precision act): the CDGC
               graph with cdgc_precision "fp32" and "autocast" (precision.py)
- torchvision: torchvision deeplabv3_resnet101 (weights=None) at the same crop and batch, only
               when torchvision is importable (paper presets only: it is ResNet-101).
Every case but cdgc_nchw gets channels-last input batches, as launch/trainer.py does
(runtime.channels_last); the weights keep the default layout there, and here.
CUDA: bf16 autocast, times from CUDA events; CPU: fp32.

Peak memory per device: each case in a fresh subprocess (model + SGD state + one warm-up and one
measured step). CUDA: max_memory_allocated (absolute: weights, gradients, momentum, activations).
CPU: VmHWM over the RSS just before the model is built (also weights, gradients, momentum and
activations), with glibc's mmap threshold at 64 KiB; see benchmarks/common.py.

FLOPs: torch.utils.flop_counter.FlopCounterMode over one step of each case (checkpointing off;
model FLOPs, so the checkpoint recompute is not counted as useful work). It counts matmul,
convolution, SDPA and grouped matmul (the CDGC fast path's per-class products, added by
common.count_flops); elementwise, BN, softmax, pooling, interpolation, index and scatter ops are
not counted. The fast path's backward recomputes its forward chunks, and under bf16 autocast
"split" runs its forward products over a 3x inner dimension: both counted as they run; the
precision cases are given the cdgc case's count.

Presets: cityscapes 769x769 (19 classes), voc 513x513 (21), cocostuff 520x520 (171), each
ResNet-101 OS8 with 2 images per device; cpu: ResNet-50 at 257x257, batch 2, 19 classes, fp32;
--smoke: ResNet-18, 64 channels, 65x65, batch 2 (checks the script, measures nothing useful).
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

PRESETS: dict[str, dict[str, Any]] = {
    "cityscapes": dict(crop=769, batch=2, classes=19, depth=101, channels=512, aspp_channels=512),
    "voc": dict(crop=513, batch=2, classes=21, depth=101, channels=512, aspp_channels=512),
    "cocostuff": dict(crop=520, batch=2, classes=171, depth=101, channels=512, aspp_channels=512),
    "cpu": dict(crop=257, batch=2, classes=19, depth=50, channels=512, aspp_channels=512),
    "smoke": dict(crop=65, batch=2, classes=19, depth=18, channels=64, aspp_channels=64),
}
PAPER = ("cityscapes", "voc", "cocostuff")
CASES = ("cdgc", "cdgc_ckpt", "baseline", "cdgc_nchw", "torchvision")
SAME_MODEL = ("cdgc_ckpt", "cdgc_nchw")  # run on the cdgc case's model object
PRECISION_CASES = {"cdgc_fp32": "fp32", "cdgc_graph_bf16": "autocast"}  # else the default


def _has_torchvision() -> bool:
    try:
        import torchvision.models.segmentation  # noqa: F401
    except Exception:  # missing, or built for another torch
        return False
    return True


def build(case: str, p: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The model of one case, in training mode on device."""
    torch.manual_seed(0)
    if case == "torchvision":
        from torchvision.models.segmentation import deeplabv3_resnet101

        model = deeplabv3_resnet101(
            weights=None, weights_backbone=None, num_classes=p["classes"], aux_loss=True
        )
    else:
        from cdgcnet.config import ModelConfig
        from cdgcnet.model import build_model

        cfg = ModelConfig(
            num_classes=p["classes"],
            depth=p["depth"],
            channels=p["channels"],
            aspp_channels=p["aspp_channels"],
            context="none" if case == "baseline" else "cdgc",
            checkpoint=case == "cdgc_ckpt",
            cdgc_precision=PRECISION_CASES.get(case, "split"),
        )
        model = build_model(cfg)
        if case == "cdgc_compiled":  # the static-shape parts; CDGC's segments vary per step
            model.backbone = torch.compile(model.backbone)
            model.aspp = torch.compile(model.aspp)
    return model.to(device).train()


def inputs(
    p: dict[str, Any], device: torch.device, channels_last: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking images (B,3,H,W) and blob labels (B,H,W) with an ignored band."""
    b, s, m = p["batch"], p["crop"], p["classes"]
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, s, s, generator=g)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = common.blob_labels(b, s, s, m, cells=max(s // 64, 3), seed=2)
    labels[:, : s // 16] = 255
    return images.to(device), labels.to(device)


def make_step(
    case: str,
    model: torch.nn.Module,
    p: dict[str, Any],
    device: torch.device,
    bf16: bool | None = None,
):
    """A closure running one full training step of `model` on fixed inputs; bf16 autocast
    when `bf16` (default: on CUDA)."""
    from cdgcnet.losses import CDGCLoss

    images, labels = inputs(p, device, channels_last=case != "cdgc_nchw")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    # Labels are checked off the step, as the trainer's loader workers do (no host sync here).
    loss_fn = CDGCLoss(check_labels=False).to(device)
    use_bf16 = device.type == "cuda" if bf16 is None else bf16

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if case == "torchvision":
                out = model(images)
                loss = F.cross_entropy(out["out"].float(), labels, ignore_index=255)
                loss = loss + 0.4 * F.cross_entropy(out["aux"].float(), labels, ignore_index=255)
            else:
                out = model(images, labels)
                loss, _ = loss_fn(out, labels)
        loss.backward()
        opt.step()

    return step


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Subprocess: peak memory of one case from model build through two steps."""
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    p = spec["preset"]
    inputs(p, device)  # input tensors exist before the region, as in training
    try:
        with common.PeakMemory(device) as mem:
            model = build(spec["case"], p, device)
            step = make_step(spec["case"], model, p, device)
            step()
            step()
    except torch.OutOfMemoryError:
        return {"peak_mem_mb": None, "memory_status": "out of memory"}
    peak = mem.absolute_peak_mb if device.type == "cuda" else mem.peak_mb
    return {"peak_mem_mb": round(peak, 1), "memory_status": "ok", "memory_method": mem.method}


def run_preset(name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    p = PRESETS[name]
    cases = [c for c in CASES if c != "torchvision"]
    if args.compile:
        cases.append("cdgc_compiled")
    if device.type == "cuda":  # under bf16 autocast: the other precisions of the CDGC graph
        cases += list(PRECISION_CASES)
    if name in PAPER and _has_torchvision():
        cases.append("torchvision")
    skipped = {}
    if "torchvision" not in cases:
        skipped["torchvision"] = (
            "torchvision not importable" if name in PAPER else "ResNet-101 only; not at this preset"
        )
    models = {c: build(c, p, device) for c in cases if c not in SAME_MODEL}
    for c in SAME_MODEL:
        models[c] = models["cdgc"]  # same weights; checkpointing toggled per step
    steps = {}
    for c in cases:
        inner = make_step(c, models[c], p, device)

        def step(inner=inner, ckpt=(c == "cdgc_ckpt"), cdgc=models["cdgc"]) -> None:
            cdgc.context.checkpoint = ckpt
            inner()

        steps[c] = step
    # The same model FLOPs as cdgc: checkpointing, layout and compilation change no model work.
    same = (*SAME_MODEL, "cdgc_compiled", *PRECISION_CASES)
    flops = {c: common.count_flops(steps[c]) for c in cases if c not in same}
    for c in same:
        flops[c] = flops["cdgc"]
    times = common.interleaved_times(steps, device, args.warmup, args.iters)
    del models, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()

    peak_tflops = None
    if device.type == "cuda":
        peak_tflops = common.bf16_peak_tflops(torch.cuda.get_device_name(device))
    rows = []
    for c in cases:
        t = common.summary(times[c])
        sec = t["median_ms"] / 1e3
        row: dict[str, Any] = dict(
            preset=name,
            case=c,
            device=device.type,
            dtype="bf16 autocast" if device.type == "cuda" else "fp32",
            depth=101 if c == "torchvision" else p["depth"],
            crop=p["crop"],
            batch=p["batch"],
            classes=p["classes"],
            step_ms=t["median_ms"],
            step_ms_min=t["min_ms"],
            step_ms_max=t["max_ms"],
            iters=t["n"],
            images_per_s=round(p["batch"] / sec, 3),
            gflop_per_step=round(flops[c]["total"] / 1e9, 2),
            achieved_tflops=round(flops[c]["total"] / sec / 1e12, 4),
            flop_ops=list(flops[c]["by_op"])[:8],
        )
        if device.type == "cuda":
            row["peak_fraction"] = (
                round(row["achieved_tflops"] / peak_tflops, 4) if peak_tflops else "unknown"
            )
        if not args.no_memory:
            spec = dict(case=c, preset=p, device=device.type, threads=torch.get_num_threads())
            row.update(common.run_in_subprocess(Path(__file__), spec, timeout_s=args.timeout))
        rows.append(row)
    base = next(r for r in rows if r["case"] == "baseline")
    tv = next((r for r in rows if r["case"] == "torchvision"), None)
    for r in rows:
        r["time_vs_baseline"] = round(r["step_ms"] / base["step_ms"], 3)
        # Ratio of the fastest steps: on a shared machine the least-disturbed estimate.
        r["time_vs_baseline_min"] = round(r["step_ms_min"] / base["step_ms_min"], 3)
        if r.get("peak_mem_mb") and base.get("peak_mem_mb"):
            r["mem_vs_baseline"] = round(r["peak_mem_mb"] / base["peak_mem_mb"], 3)
        if tv is not None:
            r["time_vs_torchvision"] = round(r["step_ms"] / tv["step_ms"], 3)
    for c, why in skipped.items():
        rows.append(dict(preset=name, case=c, device=device.type, status=f"skipped: {why}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if common.child_main(argv, memory_child):
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="auto", choices=["auto", "paper", *PRESETS])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per case (default 5/10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per case (1/3)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per memory subprocess, s")
    ap.add_argument("--smoke", action="store_true", help="tiny model and crop (script check)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="add a case with torch.compile on the backbone and ASPP (compiles first: minutes)",
    )
    ap.add_argument("--json", default=None, help="write the records here")
    args = ap.parse_args(argv)
    device = common.pick_device(args.device)
    cuda = device.type == "cuda"
    if args.smoke:
        names = ["smoke"]
    elif args.preset == "auto":
        names = list(PAPER) if cuda else ["cpu"]
    elif args.preset == "paper":
        names = list(PAPER)
    else:
        names = [args.preset]
    if args.iters is None:
        args.iters = 2 if args.smoke else (10 if cuda else 5)
    if args.warmup is None:
        args.warmup = 1 if (args.smoke or not cuda) else 3
    hw = common.hardware(device)
    print(f"hardware: {hw}")
    rows = []
    for name in names:
        rows.extend(run_preset(name, args, device))
    cols = ["preset", "case", "crop", "batch", "step_ms", "images_per_s", "peak_mem_mb"]
    cols += ["gflop_per_step", "achieved_tflops", "time_vs_baseline", "mem_vs_baseline"]
    cols += ["time_vs_torchvision", "peak_fraction"] if cuda else []
    cols += ["status"]
    common.print_table(rows, cols, title=f"training step on {hw.get('gpu', hw['cpu'])}")
    if args.json:
        common.write_results(
            args.json, "train_step", argv, hw, rows, gpu_rows=common.gpu_rows(cuda),
            flops_note="FlopCounterMode: matmul/conv/SDPA/grouped matmul counted; elementwise, BN, "
            "softmax, pooling, interpolation, index/scatter not counted",
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
