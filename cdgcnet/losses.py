"""Losses of eq. (5): L = alpha * CE(coarse) + beta * OHEM-CE(refined) + gamma * CE(aux).

All terms are computed at label resolution: logits (B, M, h, w) are upsampled bilinearly
(align_corners=False) to the target's (H, W) first. Pixels labelled ignore_index never count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def upsample_to(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """fp32 bilinear resize of (B, M, h, w) logits to (B, M, *size).

    fp32 because bf16/fp16 logits lose too much precision in the softmax of the losses.
    """
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _check(logits: Tensor, target: Tensor, ignore_index: int) -> None:
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"losses expect logits (B, M, h, w) and target (B, H, W), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if target.dtype != torch.long:
        raise ValueError(f"target must be int64 (torch.long), got {target.dtype}")
    m = logits.shape[1]
    bad = (target != ignore_index) & ((target < 0) | (target >= m))
    if bool(bad.any()):
        values = torch.unique(target[bad])[:8].tolist()
        raise ValueError(
            f"target holds labels outside [0, {m}) that are not ignore ({ignore_index}): {values}"
        )


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Mean CE over non-ignored pixels at label resolution (0 with grad when none is labelled)."""
    _check(logits, target, ignore_index)
    logits = upsample_to(logits, target.shape[-2:])
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = 255,
) -> Tensor:
    """Online hard example mining CE (as in PSPNet/OCNet training code).

    Keeps the valid pixels whose softmax probability of the true class is below `thresh`; when
    fewer than `min_kept` are, keeps the `min_kept` valid pixels with the lowest true-class
    probability instead (all valid pixels when there are fewer than `min_kept`). The loss is the
    mean CE over the kept pixels of the whole batch. The selection itself carries no gradient.
    """
    if not 0.0 < thresh <= 1.0:
        raise ValueError(f"ohem thresh must be in (0, 1], got {thresh}")
    if min_kept < 0:
        raise ValueError(f"ohem min_kept must be >= 0, got {min_kept}")
    _check(logits, target, ignore_index)
    logits = upsample_to(logits, target.shape[-2:])
    m = logits.shape[1]
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, m)  # (B*H*W, M)
    flat_target = target.reshape(-1)  # (B*H*W,)
    valid = torch.nonzero(flat_target != ignore_index).squeeze(1)  # (V,)
    if valid.numel() == 0:
        return logits.sum() * 0.0
    with torch.no_grad():
        prob = torch.softmax(flat_logits[valid], dim=1)
        true_prob = prob.gather(1, flat_target[valid].unsqueeze(1)).squeeze(1)  # (V,)
        hard = true_prob < thresh
        if int(hard.sum()) >= min_kept:
            kept = valid[hard]
        elif valid.numel() <= min_kept:
            kept = valid
        else:
            kept = valid[torch.topk(true_prob, min_kept, largest=False).indices]
    return F.cross_entropy(flat_logits[kept], flat_target[kept])


class CDGCLoss(nn.Module):
    """Weighted sum of eq. (5); absent heads (no "refined" / no "aux" in the outputs) add nothing.

    forward returns (total, terms) with terms {"coarse", "refined", "aux", "total"} for the heads
    present, detached for logging.
    """

    def __init__(
        self,
        alpha: float = 0.6,
        beta: float = 0.7,
        gamma: float = 0.4,
        ohem_thresh: float = 0.7,
        ohem_min_kept: int = 100_000,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        for name, w in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if w < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {w}")
        if not 0.0 < ohem_thresh <= 1.0:
            raise ValueError(f"ohem_thresh must be in (0, 1], got {ohem_thresh}")
        if ohem_min_kept < 0:
            raise ValueError(f"ohem_min_kept must be >= 0, got {ohem_min_kept}")
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept
        self.ignore_index = ignore_index

    def forward(
        self, outputs: dict[str, Tensor], target: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if "coarse" not in outputs:
            raise ValueError(f"model outputs need a 'coarse' entry, got keys {sorted(outputs)}")
        terms: dict[str, Tensor] = {}
        terms["coarse"] = cross_entropy(outputs["coarse"], target, self.ignore_index)
        total = self.alpha * terms["coarse"]
        if "refined" in outputs:
            terms["refined"] = ohem_cross_entropy(
                outputs["refined"], target, self.ohem_thresh, self.ohem_min_kept, self.ignore_index
            )
            total = total + self.beta * terms["refined"]
        if "aux" in outputs:
            terms["aux"] = cross_entropy(outputs["aux"], target, self.ignore_index)
            total = total + self.gamma * terms["aux"]
        logged = {k: v.detach() for k, v in terms.items()}
        logged["total"] = total.detach()
        return total, logged
