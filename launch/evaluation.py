"""Evaluation over an EvalStream: confusion matrix, all-reduced across ranks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cdgcnet.inference import predict_logits
from cdgcnet.metrics import ConfusionMatrix

if TYPE_CHECKING:
    from launch.config import TrainConfig


@torch.no_grad()
def evaluate(
    model: nn.Module,
    stream: Iterable[dict],
    *,
    num_classes: int,
    mode: str = "whole",
    crop: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    ignore_index: int = 255,
) -> ConfusionMatrix:
    """Predict every sample of the stream and accumulate a (M, M) confusion matrix.

    Samples are EvalStream dicts {"image" (1,3,H,W), "label" (1,H,W), ...}. Predictions are
    argmax'ed at label resolution. When torch.distributed is initialised the matrices of all
    ranks are summed (each rank must see its own disjoint share of the samples). The model is
    put in eval mode and its previous mode restored afterwards.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"evaluate: mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("evaluate: mode='slide' needs crop and stride")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    total = len(stream) if hasattr(stream, "__len__") else None
    bar = tqdm(stream, total=total, desc="eval", disable=not (progress and rank == 0), leave=False)
    was_training = model.training
    model.eval()
    try:
        for sample in bar:
            image = sample["image"].to(device, non_blocking=True)  # (1, 3, H, W)
            label = sample["label"]  # (1, H, W) int64
            kwargs = {"mode": mode, "scales": tuple(scales), "flip": flip}
            if mode == "slide":
                kwargs.update(crop=crop, stride=stride)
            logits = predict_logits(model, image, **kwargs)  # (1, M, H, W)
            if logits.shape[-2:] != label.shape[-2:]:
                logits = F.interpolate(
                    logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False
                )
            pred = logits.argmax(1).cpu()  # (1, H, W)
            cm.update(pred, label.cpu().long())
    finally:
        model.train(was_training)
    if distributed:
        cm = _all_reduce(cm, ignore_index)
    return cm


def _all_reduce(cm: ConfusionMatrix, ignore_index: int) -> ConfusionMatrix:
    """Sum the int64 matrices of all ranks (on the backend's device: nccl needs CUDA)."""
    t = cm.as_tensor().to(torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return ConfusionMatrix.from_tensor(t.cpu(), ignore_index=ignore_index)


def evaluate_run(
    model: nn.Module,
    stream: Iterable[dict],
    cfg: TrainConfig,
    num_classes: int,
    device: torch.device | str | None,
    progress: bool,
) -> ConfusionMatrix:
    """evaluate() with a run config's evaluation settings (cfg.eval: mode, crop, scales...)."""
    e = cfg.eval
    return evaluate(
        model,
        stream,
        num_classes=num_classes,
        mode=e.mode,
        crop=e.crop,
        stride=e.stride,
        scales=e.scales,
        flip=e.flip,
        device=device,
        progress=progress,
    )
