"""The non-finite loss policy: all ranks agree on one verdict per micro-step; a non-finite step
is skipped (no weight changes) and counted; `runtime.max_nonfinite` in a row stop the run."""

from __future__ import annotations

import torch

from launch.distributed import WorldInfo
from launch.hooks import Hook, StepResult, say

LOSS_TERMS = ("total", "coarse", "refined", "aux")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


def mean_over_ranks(terms: dict[str, torch.Tensor], world_size: int) -> tuple[bool, dict]:
    """(all ranks' losses finite, {term: mean over ranks}) from one all-reduce: NaN and inf
    survive the sum, so the verdict is the same on every rank."""
    device = terms["total"].device
    vec = torch.stack([terms.get(k, torch.zeros((), device=device)).float() for k in LOSS_TERMS])
    if torch.distributed.is_initialized() and world_size > 1:
        torch.distributed.all_reduce(vec)
        vec = vec / world_size
    finite = bool(torch.isfinite(vec).all())
    means = {k: float(v) for k, v in zip(LOSS_TERMS, vec.tolist(), strict=True) if k in terms}
    return finite, means


class NonFinitePolicy(Hook):
    """Counts skipped steps (`observe`, called by the step) and stops the run after the limit
    (`after_step`, once the step's metrics are written)."""

    def __init__(self, max_in_a_row: int, world: WorldInfo, ckpt_root, total: int = 0) -> None:
        self.max_in_a_row, self.world, self.ckpt_root = max_in_a_row, world, ckpt_root
        self.total = total
        """Skipped steps over the whole run (it survives resumes through the checkpoints)."""
        self.in_a_row = 0

    def observe(self, finite: bool, iteration: int) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        say(
            self.world,
            f"iteration {iteration}: non-finite loss, step skipped "
            f"({self.in_a_row} in a row, {self.total} in total)",
        )

    def after_step(self, step: StepResult) -> None:
        if self.in_a_row < self.max_in_a_row:
            return
        it = step.iteration
        raise NonFiniteLossError(
            f"{self.in_a_row} non-finite losses in a row (iterations "
            f"{it - self.in_a_row + 1}..{it}); stopping (runtime.max_nonfinite="
            f"{self.max_in_a_row}). The last complete checkpoint in "
            f"{self.ckpt_root} holds finite weights."
        )
