"""Checkpoints with exact resume: what a checkpoint holds beyond the engine's states, and the
rules that make the losses of a resumed run equal those of an uninterrupted one (CPU, same world
size). The whole of it lives here; the training loop only draws batches and calls `save`.

1. Data loading never moves the global torch RNG, which the model's dynamic sampling and
   dropout draw from: batches are drawn inside `torch.random.fork_rng` (`batches`), and so is
   evaluation (`isolated`), whose loaders draw seeds too.
2. A resumed rank gets back its python, numpy, torch (and CUDA) RNG states after the first
   batch of the resumed run, i.e. once its loader has started.
3. A fresh run, and a resume at another world size (whose batches differ anyway), seeds every
   rank with `rank_seed(seed, rank, start)`.

The client state saved with each checkpoint: the iteration (the LR is a pure function of it),
every rank's data-stream position (TrainStream.state_dict) and RNG states, the config, the
world size, plus what the caller adds (the non-finite count, the MLflow run id).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch

from launch.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    load_engine,
    safe_load,
    to_universal,
    universal_reason,
)
from launch.config import TrainConfig, to_dict
from launch.distributed import WorldInfo, all_gather_object
from launch.hooks import Hook, StepResult, say


def rank_seed(seed: int, rank: int, start: int) -> int:
    """The seed of one rank's dropout and sampling RNGs for a run that starts at `start`."""
    return seed * 1000 + rank + 7919 * start


def isolated() -> AbstractContextManager:
    """Run something (a data loader, an evaluation) without moving the global torch RNG."""
    return torch.random.fork_rng(devices=[])


# ---------------------------------------------------------------- RNG states (weights_only-safe)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class RunState:
    """Save and restore one run's checkpoints with its RNG and data-stream state. `restore`,
    `save` and drawing from `batches` are collective: every rank calls them."""

    def __init__(self, cfg: TrainConfig, world: WorldInfo, ckpts: CheckpointManager) -> None:
        self.cfg, self.world, self.ckpts = cfg, world, ckpts
        self.start = 0
        self._rng: dict | None = None  # this rank's saved RNG states, set after the first batch

    def restore(self, engine, stream, ckpt: CheckpointInfo | None) -> dict:
        """Load the engine and stream states of ckpt (None: a fresh run) and seed this rank;
        returns the checkpoint's client state ({} for a fresh run)."""
        client: dict = {}
        if ckpt is not None:
            client = self._load(engine, stream, ckpt)
        if self._rng is None:
            _seed_all(rank_seed(self.cfg.runtime.seed, self.world.rank, self.start))
        return client

    def _load(self, engine, stream, ckpt: CheckpointInfo) -> dict:
        same_world = ckpt.world_size == self.world.world_size
        reason = universal_reason(ckpt, self.world.world_size)
        if reason is None:
            _, client = load_engine(engine, ckpt.path.parent, ckpt.tag)
        else:
            say(
                self.world, f"resume: checkpoint {ckpt.path} {reason}: converting to universal form"
            )
            _, client = load_engine(engine, to_universal(ckpt), ckpt.tag)
            if not client or "stream" not in client:  # the universal form may drop it
                client = safe_load(ckpt.path / "mp_rank_00_model_states.pt")
        if client is None:
            raise CheckpointError(f"{ckpt.path}: DeepSpeed could not load this checkpoint")
        self.start = int(client["iteration"])
        try:
            if same_world:
                stream.load_state_dict(client["stream"][self.world.rank])
                self._rng = client["rng"][self.world.rank]
            else:
                # Another world size sees other batches anyway: keep the position, not the order.
                stream.load_state_dict(client["stream"][0], strict=False)
        except ValueError as e:  # the data settings changed since the save
            raise CheckpointError(f"{ckpt.path}: cannot resume its data stream: {e}") from None
        say(self.world, f"resumed from {ckpt.path} at iteration {self.start}")
        return client

    def batches(self, stream) -> Iterator:
        """Endless batches, epochs rolling over, drawn without touching the global torch RNG;
        the saved RNG states come back right after the first one."""
        epoch = iter(stream)
        while True:
            with isolated():
                try:
                    batch = next(epoch)
                except StopIteration:
                    epoch = iter(stream)
                    batch = next(epoch)
            if self._rng is not None:
                set_rng_state(self._rng)
                self._rng = None
            yield batch

    def save(self, engine, iteration: int, stream, extra: dict) -> Path:
        """A complete checkpoint of `iteration`; `extra` goes into the client state."""
        client = {
            "iteration": iteration,
            "stream": all_gather_object(stream.state_dict()),
            "rng": all_gather_object(rng_state()),
            "config": to_dict(self.cfg),
            "world_size": self.world.world_size,
            **extra,
        }
        meta = {
            "world_size": self.world.world_size,
            "zero_stage": self.cfg.runtime.zero_stage,
            "parameter_alignment": bool(engine.zero_parameter_alignment()),
        }
        return self.ckpts.save(engine, iteration, client, meta)


class Checkpointing(Hook):
    """Save every `checkpoint.every` iterations and at the last one."""

    def __init__(self, state: RunState, engine, stream, extra: Callable[[], dict], tracker):
        self.state, self.engine, self.stream = state, engine, stream
        self.extra, self.tracker = extra, tracker
        self.every = state.cfg.checkpoint.every
        self.last = state.cfg.schedule.iterations

    def after_step(self, step: StepResult) -> None:
        it = step.iteration
        if not ((self.every and it % self.every == 0) or it == self.last):
            return
        extra = self.extra()
        # Rank 0 owns the MLflow run: every rank saves its id.
        extra["mlflow_run_id"] = all_gather_object(extra.get("mlflow_run_id"))[0]
        self.state.save(self.engine, it, self.stream, extra)
        if self.state.world.is_main:
            self.tracker.log_metrics({"checkpoint/iteration": it}, it)
