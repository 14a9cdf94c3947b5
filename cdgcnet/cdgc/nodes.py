"""Node sets V_m of the class graphs (section 3.3, eq. 4), computed without gradient.

Legend: B batch, M classes, H x W feature grid, N = H*W, G graphs (M, or 1 for plain-GCN).

- inference, and graph="sim" in training: V_m = C_m = [argmax P == m]; a pixel is in exactly one
  set.
- graph="ds" in training, eq. (4): hard negatives C_m - G_m (ignore pixels excluded), hard
  positives G_m - C_m, and easy positives C_m & G_m kept with probability ``ratio``; ``parts``
  selects which of the three are used. G is the target resized to H x W (nearest); ignore pixels
  are in no G_m, so in training they are in no node set at all. One Bernoulli draw per pixel
  (an easy positive belongs to one class only), from torch's global RNG. A pixel is in at most
  two sets.
- plain-GCN (paper Table 1): one graph over all N nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

GRAPHS = ("sim", "ds")
PARTS = ("easy", "hard_pos", "hard_neg")


def check_ratio(ratio: object, where: str = "ratio") -> float:
    """The easy-positive sampling ratio of dynamic sampling as a float in [0, 1]; a ValueError
    naming `where` otherwise. The one check of this rule (config, module, sweeps)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"{where} must be a number in [0, 1], got {ratio!r}")
    return float(ratio)


@dataclass(frozen=True)
class Sampling:
    """The rule that picks the node sets in training (eq. 4)."""

    graph: str = "ds"
    ratio: float = 1.0
    parts: Sequence[str] = PARTS
    ignore_index: int = 255


def resize_target(target: Tensor, size: tuple[int, int]) -> Tensor:
    """Ground truth (B, h, w) -> (B, H, W) long on the feature grid by nearest neighbour: the
    G of dynamic sampling (eq. 4). Labels pass unchanged (no interpolation between ids)."""
    target = target.long()
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    resized = F.interpolate(target[:, None].double(), size=size, mode="nearest")
    return resized[:, 0].long()


def coarse_masks(coarse_logits: Tensor) -> Tensor:
    """C_m: bool (B, M, N), [argmax P == m]."""
    b, m = coarse_logits.shape[:2]
    pred = coarse_logits.argmax(1).view(b, -1)  # (B, N)
    return F.one_hot(pred, m).transpose(1, 2).bool()


@torch.no_grad()
def sampled_parts(
    coarse: Tensor, target: Tensor, rule: Sampling, size: tuple[int, int]
) -> tuple[dict[str, Tensor], Tensor]:
    """The parts of eq. (4) named in ``rule.parts``, (B, M, N) bool each, given C_m (B, M, N);
    and a 0-dim count of out-of-range target labels (read with the layout's one sync)."""
    b, m, n = coarse.shape
    gt = resize_target(target, size).view(b, n)  # (B, N)
    labelled = gt != rule.ignore_index
    in_range = (gt >= 0) & (gt < m)
    n_bad = (labelled & ~in_range).sum()
    gt_onehot = F.one_hot(torch.where(in_range, gt, m), m + 1)[..., :m]  # (B, N, M)
    truth = gt_onehot.transpose(1, 2).bool()  # (B, M, N)  G_m
    parts = {}
    if "hard_neg" in rule.parts:
        parts["hard_neg"] = coarse & ~truth & labelled[:, None]
    if "hard_pos" in rule.parts:
        parts["hard_pos"] = truth & ~coarse
    if "easy" in rule.parts and rule.ratio > 0.0:
        easy = coarse & truth
        if rule.ratio < 1.0:
            # An easy positive is in one class only, so one draw per pixel suffices.
            easy &= torch.rand(b, 1, n, device=easy.device) < rule.ratio
        parts["easy"] = easy
    return parts, n_bad


@torch.no_grad()
def memberships(
    coarse_logits: Tensor | None, target: Tensor | None, rule: Sampling | None, shape: tuple
) -> tuple[Tensor, Tensor]:
    """Node sets (B, G, N) bool and a 0-dim count of out-of-range target labels.

    rule None: plain-GCN (one graph over every node, shape (B, H, W) and device from the
    caller); rule.graph == "sim" or no target needed: the coarse masks; else eq. (4).
    """
    b, h, w, device = shape
    if rule is None:
        return torch.ones(b, 1, h * w, dtype=torch.bool, device=device), torch.zeros(
            (), device=device
        )
    coarse = coarse_masks(coarse_logits)  # (B, M, N)
    if target is None:
        return coarse, torch.zeros((), device=device)
    parts, n_bad = sampled_parts(coarse, target, rule, (h, w))
    nodes = torch.zeros_like(coarse)
    for part in parts.values():
        nodes |= part
    return nodes, n_bad
