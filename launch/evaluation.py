"""Evaluation: the confusion matrix over an EvalStream (all-reduced across ranks), the inputs of
the pictures from one forward of the model, and the training run's periodic evaluation.

Multi-scale, flipped, sliding-window inference multiplies the passes per image (6 scales x 2
flips x several windows); on a CPU that is minutes per image. The progress bar counts images
with an ETA, and once the first image is done a long expected time is said in one warning.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cdgcnet.inference import predict_logits
from cdgcnet.losses import validate_labels
from cdgcnet.metrics import ConfusionMatrix
from launch.hooks import Hook, StepResult
from launch.resume import isolated
from launch.visualize import pictures_for_sample

LONG_EVAL_S = 600.0
"""Expected evaluation times above this get a warning (after the first image)."""


class LabelError(ValueError):
    """An evaluation label holds ids outside the label set; the message names shard and key."""


def _shard_of(stream: object, key: str) -> str:
    """The shard that holds `key`, from an EvalStream's manifest (else the stream's name)."""
    manifest = getattr(stream, "manifest", None)
    folder = Path(getattr(stream, "split_dir", "."))
    for shard in (manifest or {}).get("shards", ()):
        if key in shard.get("keys", ()):
            return str(folder / shard["name"])
    return str(getattr(stream, "split_dir", "evaluation stream"))


def _plan(mode: str, scales: Sequence[float], flip: bool, crop, stride) -> str:
    passes = f"{len(scales)} scale(s){' x 2 flips' if flip else ''}"
    return passes + (f", sliding {crop} px windows every {stride} px" if mode == "slide" else "")


def _warn_if_long(first_s: float, total: int, device: torch.device, plan: str,
                  warn_after_s: float) -> None:  # fmt: skip
    expected = first_s * total
    if expected <= warn_after_s:
        return
    hint = (
        "a GPU, or fewer of --ms / --flip / --sliding" if device.type == "cpu" else "fewer passes"
    )
    print(
        f"warning: evaluation will take about {expected / 60:.0f} min on "
        f"{device.type.upper()} ({total} image(s), {first_s:.0f} s for the first: {plan}); "
        f"for a quicker check use {hint}",
        file=sys.stderr,
        flush=True,
    )


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
    warn_after_s: float = LONG_EVAL_S,
) -> ConfusionMatrix:
    """Predict every sample of the stream and accumulate a (M, M) confusion matrix.

    Samples are EvalStream dicts {"image" (1,3,H,W), "label" (1,H,W), ...}. Predictions are
    argmax'ed at label resolution. When torch.distributed is initialised the matrices of all
    ranks are summed (each rank must see its own disjoint share of the samples). The model is
    put in eval mode and its previous mode restored afterwards. A label outside the label set
    raises LabelError naming the shard and key.
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
    plan = _plan(mode, scales, flip, crop, stride)
    show = progress and rank == 0
    bar = tqdm(
        stream, total=total, desc=f"eval ({plan})", disable=None if show else True, leave=False
    )  # None: a bar on a terminal only
    was_training = model.training
    model.eval()
    try:
        for i, sample in enumerate(bar):
            t0 = time.perf_counter()
            image = sample["image"].to(device, non_blocking=True)  # (1, 3, H, W)
            label = sample["label"]  # (1, H, W) int64
            try:
                validate_labels(label, num_classes, ignore_index)
            except ValueError as e:
                key = sample.get("key")
                raise LabelError(f"{_shard_of(stream, key)}: sample {key}: {e}") from None
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
            if i == 0 and rank == 0 and total:
                _warn_if_long(time.perf_counter() - t0, total, device, plan, warn_after_s)
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


@torch.no_grad()
def picture_inputs(model: nn.Module, sample: dict) -> dict[str, np.ndarray]:
    """What the pictures of one EvalStream sample show, from one eval-mode forward, as numpy:
    "image" (H, W, 3) uint8, "label" and "pred" (H, W); with a class-wise CDGC module also
    "feature" X and "refined" R (C, h, w), "grid_label" (h, w) (the label as the module resizes
    it) and the dynamic-sampling parts (CDGCModule.node_parts) "easy" / "hard_pos" / "hard_neg"
    (M, h, w) bool, those the module's `parts` name.

    The RNG of the model's device is forked (node_parts draws the easy positives from it), so
    training randomness is untouched. Under ZeRO-3 call it on every rank (the forward gathers
    parameters) or pass an unpartitioned copy.
    """
    from cdgcnet.cdgc import CDGCModule, resize_target
    from cdgcnet.model import final_logits

    net = getattr(model, "module", model)
    device = next(net.parameters()).device
    label = sample["label"].long()  # (1, H, W)
    data = {
        "image": np.asarray(sample["image_uint8"], dtype=np.uint8),
        "label": label[0].cpu().numpy(),
    }
    was_training = net.training
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        net.eval()
        try:
            out = net(sample["image"].to(device), return_features=True)
            logits = F.interpolate(
                final_logits(out).float(),
                size=label.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )
            data["pred"] = logits.argmax(1)[0].cpu().numpy()  # (H, W)
            ctx = getattr(net, "context", None)
            if isinstance(ctx, CDGCModule) and ctx.class_wise and "context" in out:
                coarse = out["coarse"]  # (1, M, h, w)
                target = label.to(device)
                for name, part in ctx.node_parts(coarse, target).items():
                    data[name] = part[0].cpu().numpy()  # (M, h, w)
                data["grid_label"] = resize_target(target, coarse.shape[-2:])[0].cpu().numpy()
                data["feature"] = out["feature"][0].float().cpu().numpy()
                data["refined"] = out["context"][0].float().cpu().numpy()
        finally:
            net.train(was_training)
    return data


class Evaluator(Hook):
    """Validation every `eval.every` iterations and at the last one: the metrics, the pictures of
    the first `eval.num_pictures` validation images (rank 0), both handed to the run's log, and
    the on_eval(iteration, metrics) callback (rank 0). Runs without moving the training RNG."""

    def __init__(self, trainer, val_stream, on_eval: Callable[[int, dict], None] | None):
        """trainer: the launch.trainer Trainer whose engine is evaluated."""
        self.trainer, self.val_stream, self.on_eval = trainer, val_stream, on_eval
        self.cfg, self.world = trainer.cfg, trainer.world
        self.spec = trainer.spec
        self.last: dict = {}
        with isolated():
            self.samples = self._picture_samples()

    def _picture_samples(self) -> list[dict]:
        from pipeline.reader import EvalStream

        n = self.cfg.eval.num_pictures
        if n == 0 or not self.world.is_main or self.cfg.runtime.zero_stage == 3:
            return []  # ZeRO-3 forward is collective: no rank-0-only pictures
        out = []
        for sample in EvalStream(Path(self.cfg.data.root) / self.cfg.data.val_split):
            out.append(sample)
            if len(out) == n:
                break
        return out

    def after_step(self, step: StepResult) -> None:
        it, every = step.iteration, self.cfg.eval.every
        if (every and it % every == 0) or it == self.cfg.schedule.iterations:
            with isolated():
                self.evaluate(it)
            self.trainer.engine.train()

    def final(self) -> dict:
        """The last evaluation's metrics; a run resumed at its end evaluates the final weights."""
        if not self.last:
            self.evaluate(self.cfg.schedule.iterations)
        return self.last

    def evaluate(self, iteration: int) -> dict:
        t = self.trainer
        model = t.engine.module
        cm = evaluate_run(
            model,
            self.val_stream,
            self.cfg,
            self.spec.num_classes,
            t.device,
            self.cfg.runtime.progress,
        )
        self.last = {
            "miou": float(cm.miou()),
            "pixel_accuracy": float(cm.pixel_accuracy()),
            "iou": [float(v) for v in cm.iou()],
            "iteration": iteration,
        }
        if self.world.is_main:
            pictures = [
                (str(s.get("key", i)), pictures_for_sample(picture_inputs(model, s), self.spec))
                for i, s in enumerate(self.samples)
            ]
            t.log.log_evaluation(cm, self.last, pictures, self.spec.class_names)
            if self.on_eval is not None:
                self.on_eval(iteration, self.last)
        return self.last
