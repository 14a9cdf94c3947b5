"""Confusion matrix for semantic segmentation: accumulate, merge across ranks, IoU / mIoU / acc."""

from __future__ import annotations

import numpy as np
import torch


class ConfusionMatrix:
    """M x M pixel counts, rows = target class, columns = predicted class; ignore pixels skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"ConfusionMatrix num_classes must be an int >= 1, got {num_classes!r}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.mat[:] = 0

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add predicted and target class ids of the same shape (any shape, any device)."""
        pred_t = torch.as_tensor(pred)
        target_t = torch.as_tensor(target, device=pred_t.device)
        if pred_t.shape != target_t.shape:
            raise ValueError(
                f"ConfusionMatrix.update: pred {tuple(pred_t.shape)} and target "
                f"{tuple(target_t.shape)} differ in shape"
            )
        if pred_t.is_floating_point() or target_t.is_floating_point():
            raise ValueError("ConfusionMatrix.update expects integer class ids, got floats")
        m = self.num_classes
        pred_t, target_t = pred_t.reshape(-1).long(), target_t.reshape(-1).long()
        keep = target_t != self.ignore_index
        pred_t, target_t = pred_t[keep], target_t[keep]
        for name, t in (("target", target_t), ("pred", pred_t)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= m):
                bad = torch.unique(t[(t < 0) | (t >= m)])[:8].tolist()
                raise ValueError(
                    f"ConfusionMatrix.update: {name} holds ids outside [0, {m}) "
                    f"(ignore {self.ignore_index}): {bad}"
                )
        counts = torch.bincount(target_t * m + pred_t, minlength=m * m)
        self.mat += counts.reshape(m, m).cpu().numpy().astype(np.int64)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix of the same size into this one; returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one"
            )
        self.mat += other.mat
        return self

    def iou(self) -> np.ndarray:
        """(M,) IoU per class; NaN for a class absent from both predictions and targets."""
        tp = np.diag(self.mat).astype(np.float64)
        union = self.mat.sum(0) + self.mat.sum(1) - np.diag(self.mat)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over classes that appear (NaN when no pixel was counted)."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.mat.sum()
        return float(np.trace(self.mat) / total) if total else float("nan")

    def as_tensor(self) -> torch.Tensor:
        """(M, M) int64 copy, e.g. for torch.distributed.all_reduce."""
        return torch.from_numpy(self.mat.copy())

    @classmethod
    def from_tensor(cls, t: torch.Tensor, ignore_index: int = 255) -> ConfusionMatrix:
        if t.dim() != 2 or t.shape[0] != t.shape[1]:
            raise ValueError(
                f"ConfusionMatrix.from_tensor needs a square (M, M) tensor, got {tuple(t.shape)}"
            )
        cm = cls(int(t.shape[0]), ignore_index)
        cm.mat = t.detach().cpu().to(torch.int64).numpy().copy()
        return cm
