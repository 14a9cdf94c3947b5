"""The sizes of a GPU lease and of its CPU dry run, the stage names, and what a stage process
knows (`Ctx`), trainer overrides included. Standard library only: the lease's own process
imports it before any wheel is installed."""

from __future__ import annotations

import itertools
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGES = ("env", "gpu_tests", "cdgc", "trainer", "train_step", "extras")
"""The stages in the order they run, most valuable first."""


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""

    label: str
    budget_s: float  # the whole command
    stage_caps_s: dict[str, float]  # the most one stage may take
    matmul_n: int  # square matmul for the measured peak
    train_preset: str  # benchmarks/train_step.py PRESETS key: train_step
    extra_presets: tuple[str, ...]  # the same for the extras stage
    step_warmup: int
    step_iters: int
    trainer_overrides: tuple[str, ...]  # key=value for launch/train.py
    iterations: int  # of a trainer run; it checkpoints halfway and resumes from there
    profile_at: tuple[int, int]  # (first iteration, steps) the trainer's profiler covers
    synth_size: tuple[int, int]  # (width, height) of the generated Cityscapes images
    synth_train: int
    synth_val: int
    cdgc_cases: tuple[dict[str, Any], ...]  # the module alone: B, C, side, M, queries, precision
    block_max_shape: tuple[int, int, int]  # (T, n, K') of one chunk's block max
    inference_args: tuple[str, ...]  # benchmarks/inference.py arguments


GPU = Sizes(
    label="gpu",
    budget_s=560.0,  # a 600 s command: room for the wheels' install and the last record
    stage_caps_s=dict(env=40, gpu_tests=100, cdgc=75, trainer=200, train_step=75, extras=120),
    matmul_n=8192,
    train_preset="cityscapes",
    extra_presets=("voc", "cocostuff"),
    step_warmup=3,
    step_iters=10,
    trainer_overrides=(
        "runtime.precision=bf16",
        "data.num_workers=6",
    ),
    iterations=20,
    profile_at=(4, 3),  # after 3 warm-up steps, clear of the saves at 10 and 20
    synth_size=(2048, 1024),
    synth_train=48,  # more than the 2 x 20 crops of the run: one loader epoch, no restart
    synth_val=2,
    cdgc_cases=(
        # the presets' feature grids (crop / 8), B=2, C=512, the default model
        dict(B=2, C=512, side=97, M=19, queries="all", precision="split"),
        dict(B=2, C=512, side=65, M=21, queries="all", precision="split"),
        dict(B=2, C=512, side=65, M=171, queries="all", precision="split"),
        # the other precisions and readings at the cityscapes shape
        dict(B=2, C=512, side=97, M=19, queries="all", precision="fp32"),
        dict(B=2, C=512, side=97, M=19, queries="all", precision="autocast"),
        dict(B=2, C=512, side=97, M=19, queries="members", precision="split"),
        dict(B=2, C=512, side=97, M=19, queries="masked", precision="split"),
    ),
    block_max_shape=(18818, 1664, 19),
    inference_args=("--setting", "paper", "--cases", "whole", "slide", "--iters", "3"),
)
DRY = Sizes(
    label="dry run (CPU, tiny sizes: the figures mean nothing)",
    budget_s=600.0,  # about a minute on an idle 2-core machine; room for a busy one
    stage_caps_s=dict(env=60, gpu_tests=120, cdgc=90, trainer=300, train_step=120, extras=120),
    matmul_n=256,
    train_preset="smoke",
    extra_presets=("smoke",),
    step_warmup=1,
    step_iters=2,
    trainer_overrides=(
        "runtime.precision=fp32",
        "data.num_workers=1",
        "model.depth=18",
        "model.channels=64",
        "model.aspp_channels=64",
        "data.crop_size=65",
        "eval.crop=65",
        "eval.stride=43",
        "loss.ohem_min_kept=4096",
    ),
    iterations=4,
    profile_at=(3, 1),  # the one iteration without a save after it
    synth_size=(256, 128),
    synth_train=8,
    synth_val=1,
    cdgc_cases=(
        dict(B=2, C=32, side=9, M=5, queries="all", precision="split"),
        dict(B=2, C=32, side=9, M=5, queries="members", precision="split"),
    ),
    block_max_shape=(162, 88, 5),
    inference_args=("--smoke", "--cases", "whole", "slide", "--iters", "1", "--device", "cpu"),
)


@dataclass
class Ctx:
    """What a stage process knows: where to write, how big, until when."""

    out: Path
    work: Path
    sizes: Sizes
    dry_run: bool
    deadline: float  # time.time() by which the stage must be done
    sets: tuple[str, ...] = ()  # --set: trainer overrides of every variant
    variants: tuple[tuple[str, ...], ...] = ()  # --variant: more trainer runs, overrides each

    def left(self) -> float:
        return self.deadline - time.time()


def parse_trainer_overrides(
    sets: Sequence[str] | None, variants: Sequence[str] | None, error: Callable[[str], Any]
) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """--set items and --variant strings (shell-split) as override tuples; error(message) for
    an item that is not KEY=VALUE (the trainer stage checks keys and values)."""
    parsed = tuple(tuple(shlex.split(v)) for v in variants or ())
    for item in [*(sets or ()), *itertools.chain.from_iterable(parsed)]:
        if "=" not in item or not item.split("=", 1)[0].strip():
            error(f"trainer override {item!r} is not KEY=VALUE (e.g. model.queries=members)")
    if any(not v for v in parsed):
        error("--variant needs at least one KEY=VALUE")
    return tuple(sets or ()), parsed
