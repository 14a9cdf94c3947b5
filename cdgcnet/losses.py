"""Losses of eq. (5): L = alpha * CE(coarse) + beta * OHEM-CE(refined) + gamma * CE(aux).

The final prediction is trained by beta * OHEM-CE in every model, as the paper trains its final
(refined) prediction: a model without a context module (the ablation baselines) has the coarse
logits as its final prediction, so there they get beta * OHEM-CE and no alpha * CE term. Without
this rule every gain of a CDGC row over a baseline row would include OHEM's own gain.

All terms are computed at label resolution: logits (B, M, h, w) are upsampled bilinearly
(align_corners=False) to the target's (H, W) first. Pixels labelled ignore_index never count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdgcnet.model import final_logits


def upsample_to(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """fp32 bilinear resize of (B, M, h, w) logits to (B, M, *size).

    fp32 because bf16/fp16 logits lose too much precision in the softmax of the losses.
    """
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _check(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"losses expect logits (B, M, h, w) and target (B, H, W), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if target.dtype != torch.long:
        raise ValueError(f"target must be int64 (torch.long), got {target.dtype}")


def validate_labels(target: Tensor, num_classes: int, ignore_index: int = 255) -> None:
    """Raise ValueError naming the labels outside [0, num_classes) that are not ignore_index.

    On a GPU tensor this is a host-device sync; the trainer runs it on the host copy of the
    batch instead and builds its losses with ``check_labels=False``.
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        values = torch.unique(target[bad])[:8].tolist()
        raise ValueError(
            f"target holds labels outside [0, {num_classes}) that are not ignore "
            f"({ignore_index}): {values}"
        )


def cross_entropy(
    logits: Tensor, target: Tensor, ignore_index: int = 255, check_labels: bool = True
) -> Tensor:
    """Mean CE over non-ignored pixels at label resolution (0 with grad when none is labelled).

    Free of host-device syncs when ``check_labels`` is False.
    """
    _check(logits, target)
    if check_labels:
        validate_labels(target, logits.shape[1], ignore_index)
    logits = upsample_to(logits, target.shape[-2:])
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp_min(1)


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = 255,
    check_labels: bool = True,
) -> Tensor:
    """Online hard example mining CE (as in PSPNet/OCNet training code).

    Keeps the valid pixels whose softmax probability of the true class is below `thresh`; when
    fewer than `min_kept` are, keeps the `min_kept` valid pixels with the lowest true-class
    probability instead (all valid pixels when there are fewer than `min_kept`). The loss is the
    mean CE over the kept pixels of the whole batch. The selection itself carries no gradient.

    Every shape is fixed by the input's, so the step needs no host-device sync (when
    ``check_labels`` is False): the choice between the two rules is a ``torch.where`` on the
    device, and the loss is a masked mean over all pixels instead of a gather of the kept ones.
    """
    if not 0.0 < thresh <= 1.0:
        raise ValueError(f"ohem thresh must be in (0, 1], got {thresh}")
    if min_kept < 0:
        raise ValueError(f"ohem min_kept must be >= 0, got {min_kept}")
    _check(logits, target)
    if check_labels:
        validate_labels(target, logits.shape[1], ignore_index)
    logits = upsample_to(logits, target.shape[-2:])
    nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    nll = nll.flatten()  # (P,), 0 at ignored pixels
    valid = (target != ignore_index).flatten()  # (P,)
    with torch.no_grad():
        # True-class probability; an ignored pixel gets 2, so it is never hard and ranks last.
        prob = torch.where(valid, torch.exp(-nll), 2.0)
        hard = prob < thresh
        k = min(min_kept, prob.numel())
        if k == 0:
            keep = hard
        else:
            lowest = torch.topk(prob, k, largest=False)  # ascending: values[-1] is the k-th
            ranked = torch.zeros_like(valid).index_fill_(0, lowest.indices, True) & valid
            # At least k hard pixels <=> the k-th lowest probability is below thresh.
            keep = torch.where(lowest.values[-1] < thresh, hard, ranked)
        weight = keep.to(nll.dtype)
    return (nll * weight).sum() / weight.sum().clamp_min(1.0)


class CDGCLoss(nn.Module):
    """Weighted sum of eq. (5); absent heads (no "refined" / no "aux" in the outputs) add nothing.

    The final prediction (`final_logits`: refined, else coarse) gets beta * OHEM-CE, a coarse
    prediction that is refined further alpha * CE, the auxiliary one gamma * CE.
    forward returns (total, terms) with terms {"coarse", "refined", "aux", "total"} for the heads
    present (each head's own term, whichever criterion), detached for logging. The labels are validated once per call when `check_labels`
    is set (a host-device sync on GPU); with it off the whole loss is sync-free.
    """

    def __init__(
        self,
        alpha: float = 0.6,
        beta: float = 0.7,
        gamma: float = 0.4,
        ohem_thresh: float = 0.7,
        ohem_min_kept: int = 100_000,
        ignore_index: int = 255,
        check_labels: bool = True,
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
        self.check_labels = check_labels

    def forward(
        self, outputs: dict[str, Tensor], target: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if "coarse" not in outputs:
            raise ValueError(f"model outputs need a 'coarse' entry, got keys {sorted(outputs)}")
        if self.check_labels:
            _check(outputs["coarse"], target)
            validate_labels(target, outputs["coarse"].shape[1], self.ignore_index)
        ignore = self.ignore_index
        terms: dict[str, Tensor] = {}
        final = "coarse" if final_logits(outputs) is outputs["coarse"] else "refined"
        final_term = ohem_cross_entropy(
            outputs[final], target, self.ohem_thresh, self.ohem_min_kept, ignore, check_labels=False
        )
        if final == "coarse":
            terms["coarse"] = final_term
            total = self.beta * final_term
        else:
            terms["coarse"] = cross_entropy(outputs["coarse"], target, ignore, check_labels=False)
            terms["refined"] = final_term
            total = self.alpha * terms["coarse"] + self.beta * final_term
        if "aux" in outputs:
            terms["aux"] = cross_entropy(outputs["aux"], target, ignore, check_labels=False)
            total = total + self.gamma * terms["aux"]
        logged = {k: v.detach() for k, v in terms.items()}
        logged["total"] = total.detach()
        return total, logged
