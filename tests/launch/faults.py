"""Fault injection for the training tests, as hooks (launch.hooks.Hook) the program never sees
unless a test adds them: SIGKILL every rank after an iteration, SIGKILL inside a checkpoint save,
NaN losses, one failure, a resume that restarts the data stream (the control of exact resume),
and the unpadded ZeRO layout of the program before 16-byte alignment (to write old checkpoints).

A fault spec is a dict, e.g. {"kill_at": 3} or {"nonfinite_at": [2, 4]}:
- in-process: `launch.train.run(cfg, hooks=fault_hooks(spec))`;
- in a subprocess (python, torchrun, Ray trials): `fault_env(spec)` is the environment that puts
  `fault_site/` on PYTHONPATH; its sitecustomize adds the hooks to every Trainer of the process.
  `fault_env(path)` names a JSON file read whenever a Trainer is made (absent file: no faults).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from launch.distributed import barrier
from launch.hooks import Hook, StepResult

ENV = "CDGCNET_TEST_FAULTS"
REPO = Path(__file__).resolve().parents[2]
SITE = Path(__file__).resolve().parent / "fault_site"
KINDS = (
    "kill_at",
    "crash_in_save_at",
    "nonfinite_at",
    "fail_once_at",
    "fresh_data",
    "unpadded_layout",
)
PATCHES = ("fresh_data", "unpadded_layout")  # change the program, not a hook


class KillAt(Hook):
    """SIGKILL every rank right after iteration k (after its checkpoint and evaluation)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def after_step(self, step: StepResult) -> None:
        if step.iteration == self.k:
            barrier()
            os.kill(os.getpid(), signal.SIGKILL)


class CrashInSave(Hook):
    """SIGKILL every rank inside the checkpoint save of iteration k: after DeepSpeed wrote the
    files, before the save counts (no COMPLETE marker)."""

    def __init__(self, k: int) -> None:
        self.k, self.it = k, 0

    def before_train(self, trainer) -> None:
        save = trainer.engine.save_checkpoint

        def save_then_die(*args, **kwargs):
            out = save(*args, **kwargs)
            if self.it == self.k:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        trainer.engine.save_checkpoint = save_then_die

    def before_step(self, iteration: int) -> None:
        self.it = iteration


class NonFiniteAt(Hook):
    """Make the loss (and its logged total) NaN at the given iterations."""

    def __init__(self, iterations) -> None:
        self.at, self.it = {int(i) for i in iterations}, 0

    def before_train(self, trainer) -> None:
        criterion = trainer.criterion

        def nan_criterion(outputs, labels):
            loss, terms = criterion(outputs, labels)
            if self.it in self.at:
                loss = loss * float("nan")
                terms["total"] = loss.detach()
            return loss, terms

        trainer.criterion = nan_criterion

    def before_step(self, iteration: int) -> None:
        self.it = iteration


class FailOnce(Hook):
    """Raise RuntimeError after iteration k, once per run directory (a marker file remembers)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def before_train(self, trainer) -> None:
        self.run_dir, self.world = trainer.run_dir, trainer.world

    def after_step(self, step: StepResult) -> None:
        if step.iteration != self.k:
            return
        marker = self.run_dir / f"failed_once_at_{self.k}"
        already = marker.exists()
        barrier()
        if already:
            return
        if self.world.is_main:
            marker.write_text("the test hook FailOnce fired here\n")
        barrier()
        raise RuntimeError(f"injected failure at iteration {self.k} (test hook FailOnce)")


def fault_hooks(spec: dict) -> list[Hook]:
    """The hooks of a fault spec (PATCHES are not hooks: see `restart_data_on_resume`,
    `unpadded_layout`)."""
    unknown = sorted(set(spec) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {KINDS}")
    hooks: list[Hook] = []
    if "kill_at" in spec:
        hooks.append(KillAt(int(spec["kill_at"])))
    if "crash_in_save_at" in spec:
        hooks.append(CrashInSave(int(spec["crash_in_save_at"])))
    if "nonfinite_at" in spec:
        hooks.append(NonFiniteAt(spec["nonfinite_at"]))
    if "fail_once_at" in spec:
        hooks.append(FailOnce(int(spec["fail_once_at"])))
    return hooks


def restart_data_on_resume() -> None:
    """Resumed runs of this process keep their weights and RNG states but restart the data
    stream: the saved stream position is not loaded."""
    from pipeline.reader import TrainStream

    TrainStream.load_state_dict = lambda self, state, strict=True: None


def unpadded_layout(trainer_module) -> None:
    """Engines of this process get ZeRO's unpadded flat layout and no alignment check, as the
    program wrote checkpoints before 16-byte parameter alignment."""
    build = trainer_module.build_ds_config

    def without_padding(*args, **kwargs) -> dict:
        ds = build(*args, **kwargs)
        ds["zero_optimization"].pop("parameter_alignment", None)
        return ds

    trainer_module.build_ds_config = without_padding
    trainer_module.check_alignment = lambda engine: None


def fault_env(spec: dict | str | os.PathLike) -> dict[str, str]:
    """Environment variables that give a subprocess's Trainers the faults of `spec` (a dict, or
    the path of a JSON file read at each Trainer's creation)."""
    value = json.dumps(spec) if isinstance(spec, dict) else "@" + str(spec)
    path = os.pathsep.join(p for p in (str(SITE), str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {ENV: value, "PYTHONPATH": path}


def _spec_from_env() -> dict:
    value = os.environ.get(ENV, "")
    if value.startswith("@"):
        f = Path(value[1:])
        return json.loads(f.read_text()) if f.is_file() else {}
    return json.loads(value) if value else {}


def install(trainer_module) -> None:
    """Give every Trainer of `trainer_module` the faults named by $CDGCNET_TEST_FAULTS
    (called by fault_site/sitecustomize.py right after launch.trainer is imported)."""
    trainer_cls = trainer_module.Trainer
    init = trainer_cls.__init__

    def init_with_faults(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        spec = _spec_from_env()
        if spec.get("fresh_data"):
            restart_data_on_resume()
        if spec.get("unpadded_layout"):
            unpadded_layout(trainer_module)
        self.extra_hooks.extend(fault_hooks({k: v for k, v in spec.items() if k not in PATCHES}))

    trainer_cls.__init__ = init_with_faults
