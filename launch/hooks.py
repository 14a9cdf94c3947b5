"""Jobs around the training step (detectron2's hooks): metrics, the non-finite policy,
checkpoints and evaluation are hooks, and so is anything a caller adds (an EMA, a test's fault).

The trainer calls, in the order the hooks were given:
    before_train(trainer)   once, after the engine is built, the run resumed and MLflow started
    before_step(iteration)  before each step (iterations count from 1)
    after_step(step)        after each step, with what it measured
    after_train()           once, after the last step, before the final evaluation and export
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launch.distributed import WorldInfo


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step measured (losses are means over ranks and micro-steps)."""

    iteration: int
    lr: float
    """Base LR of this step (the backbone's; the heads' is lr * head_lr_mult)."""
    losses: dict[str, float]
    """"total", "coarse", "refined", "aux" (those the model has)."""
    finite: bool
    """False: some rank's loss was not finite and the update was skipped."""
    seconds: float
    wait_seconds: float
    """Time spent waiting for batches."""


class Hook:
    """A job around the step; every method is a no-op here. `trainer` is the launch.trainer
    Trainer (its engine, criterion, device, run_dir, world, ...); hooks do not import it."""

    def before_train(self, trainer: Any) -> None:
        pass

    def before_step(self, iteration: int) -> None:
        pass

    def after_step(self, step: StepResult) -> None:
        pass

    def after_train(self) -> None:
        pass


def say(world: WorldInfo, message: str) -> None:
    """Print on rank 0 only (every rank computes; one speaks)."""
    if world.is_main:
        print(message, flush=True)
