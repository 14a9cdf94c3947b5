"""The Ray Tune trial: one real training run through `launch.train.run`.

A trial gets the searched values as its Tune config (ratio, fusion, alpha, beta, gamma, or an
ablation `variant`) and the sweep's fixed settings through `tune.with_parameters(..., sweep=...)`,
so that a resumed sweep hands trials the current MLflow server address. Merged, they hold:
    config          preset name or config file path for `launch.config.load_config`
    overrides       base `key=value` overrides (absolute data root included)
    variants        {variant name: [overrides]} (ablation tables; empty for the ratio sweep)
    variant         the variant of this trial (optional)
    ratio, fusion, alpha, beta, gamma   searched values (optional; see common.SEARCH_KEYS)
    tracking_uri    where trials write MLflow records (the sweep's server for a SQLite store)
    store_uri       the store itself, which the runs record as logging.tracking_uri
    parent_run_id, experiment, tags   MLflow nesting
    runs_root       absolute folder holding every trial's run dir
    workers, use_gpu, worker_resources   > 1 worker: a DeepSpeed trial over Ray Train workers

Fault tolerance: the run dir is the one copy of a trial's checkpoints. Each evaluation is reported
to Tune with a small reference checkpoint (run dir, iteration, newest complete DeepSpeed
checkpoint), not a copy of the weights; a retried or resumed trial finds its run dir at the same
path (same machine, or a filesystem every node shares), checks that it still holds a checkpoint
at least as new as the reported one, and training resumes from it (resume="auto"). Once training
finished, its DeepSpeed checkpoints are deleted (the exported model.pt stays) unless the sweep
keeps them (`keep_checkpoints`); so are those of a trial ASHA stopped or one that failed for good
(sweeps/runner.py), whose config, logs and metrics stay.

Output: everything training prints (its progress, DeepSpeed's and torch's messages) goes
to `<run dir>/train.log` instead of the console; the driver prints one line per trial event.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sweeps.common import SEARCH_KEYS, config_hash


def trial_overrides(config: dict[str, Any]) -> list[str]:
    """Every override of this trial: base, then its variant's, then the searched values."""
    overrides = list(config.get("overrides", ()))
    variant = config.get("variant")
    if variant is not None:
        overrides += list(config.get("variants", {})[variant])
    overrides += [f"{key}={config[name]}" for name, key in SEARCH_KEYS.items() if name in config]
    return overrides


def build_trial_config(config: dict[str, Any], trial_id: str, run_dir: Path):
    """The TrainConfig of a trial: loaded like launch/train.py does, nested under the parent run."""
    from launch.config import load_config
    from launch.tracking import write_through

    overrides = trial_overrides(config)
    cfg = load_config(config["config"], overrides)
    cfg.runtime.run_dir = str(run_dir)
    # The run records its store; this process writes to it through the sweep's server.
    store = config.get("store_uri") or config["tracking_uri"]
    cfg.logging.tracking_uri = store
    write_through(store, config["tracking_uri"])
    cfg.logging.parent_run_id = config.get("parent_run_id")
    if config.get("experiment"):
        cfg.logging.experiment = config["experiment"]
    tags = dict(cfg.logging.tags or {})
    tags.update(config.get("tags", {}))
    tags["trial_id"] = trial_id
    tags["config_hash"] = config_hash(overrides, config["config"])
    tags["run_dir"] = str(run_dir)
    for name in SEARCH_KEYS:
        if name in config:
            tags[name] = str(config[name])
    if config.get("variant") is not None:
        tags["variant"] = str(config["variant"])
        if tags.get("table"):
            tags[table_tag(tags["table"])] = tags["variant"]
    cfg.logging.tags = tags
    cfg.logging.run_name = trial_run_name(config)
    return cfg


def table_tag(table: int | str) -> str:
    """The tag naming a run's row in one ablation table: `table5` = the row's variant.

    One tag per table, because a configuration shared by several tables is one run.
    """
    return f"table{table}"


def row_name(table: int | str, variant: str) -> str:
    """MLflow run name of an ablation row, e.g. `table5/easy+hard_pos`."""
    return f"table{table}/{variant}"


def trial_run_name(config: dict[str, Any]) -> str:
    """What the trial is: `table5/easy+hard_pos`, or its searched values `ratio=0.6 ... fusion=concat`."""
    variant = config.get("variant")
    if variant is not None:
        table = config.get("tags", {}).get("table")
        return row_name(table, variant) if table else str(variant)
    return " ".join(f"{name}={config[name]}" for name in SEARCH_KEYS if name in config)


def run_dir_of(config: dict[str, Any], trial_id: str) -> Path:
    """The trial's run dir: fixed per trial, so retries and resumes find it again."""
    return Path(config["runs_root"]) / trial_id


REFERENCE_FILE = "run_dir.json"  # the whole Tune checkpoint of a report


def check_run_dir(run_dir: Path) -> None:
    """Before a retried or resumed trial trains: its run dir must hold the reported progress.

    Tune's checkpoint only names the run dir's DeepSpeed checkpoint; when the run dir is gone
    (a trial retried on another node without a shared filesystem), training would silently start
    over, so this raises instead.
    """
    from ray import tune

    from launch.checkpoint import latest_complete

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as saved:
        reference = json.loads((Path(saved) / REFERENCE_FILE).read_text())
    wanted = reference.get("checkpoint_iteration")
    if wanted is None:
        return
    latest = latest_complete(run_dir / "checkpoints")
    if latest is None and (run_dir / PRUNED_FILE).is_file():
        # Removed on purpose when the trial failed for good (sweeps --keep-checkpoints keeps them):
        # a retry of it (Tuner.restore(resume_errored=True)) starts over.
        print(f"{run_dir}: its checkpoints were removed when it ended; training starts over")
        return
    if latest is None or latest.iteration < wanted:
        raise FileNotFoundError(
            f"{run_dir}: the trial reported a checkpoint at iteration {wanted}, but its run dir "
            f"holds {'none' if latest is None else f'only iteration {latest.iteration}'}; retries "
            "and resumes continue from the run dir where training wrote it (same machine, or a "
            "runs folder every node shares)"
        )


def report_with_checkpoint(result: dict[str, Any], run_dir: Path) -> None:
    """tune.report with a reference checkpoint: the run dir and its newest complete DeepSpeed
    checkpoint, named, not copied (Tune would copy every report's weights into its storage)."""
    from ray import tune

    from launch.checkpoint import latest_complete

    latest = latest_complete(run_dir / "checkpoints")
    reference = {
        "run_dir": str(run_dir),
        "checkpoint": None if latest is None else str(latest.path),
        "checkpoint_iteration": None if latest is None else latest.iteration,
    }
    staged = run_dir.with_name(run_dir.name + ".report")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        (staged / REFERENCE_FILE).write_text(json.dumps(reference, indent=1))
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(staged)))
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def prune_finished(run_dir: Path, keep_checkpoints: bool) -> None:
    """After training finished: drop its DeepSpeed checkpoints (model.pt is the result)."""
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


PRUNED_FILE = "checkpoints.removed"  # in the run dir: why its checkpoints are gone


def prune_ended(run_dir: Path, why: str) -> bool:
    """A trial that ended without finishing (stopped by ASHA, or failed for good) keeps its
    config, logs and MLflow metrics, not its DeepSpeed checkpoints; `why` is noted in the run dir.
    True when there was something to remove."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.exists():
        return False
    shutil.rmtree(ckpts, ignore_errors=True)
    (run_dir / PRUNED_FILE).write_text(f"{why}\n")
    return True


def count_attempt(run_dir: Path) -> int:
    """1 on a trial's first start, then one more per restart (failure retry or resume)."""
    path = run_dir / "attempts"
    attempt = int(path.read_text()) + 1 if path.is_file() else 1
    tmp = path.with_name("attempts.tmp")
    tmp.write_text(str(attempt))
    tmp.rename(path)
    return attempt


@contextlib.contextmanager
def output_to(log_path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so that C++ and
    subprocess output follow) to `log_path` while training runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# Set on the report made after training returned. (Tune's own "done" field is True on the last
# result of any trial, also one that ASHA stopped.)
FINISHED_KEY = "training_finished"


def tune_result(iteration: int, metrics: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    """The numbers Tune sees from one evaluation (scalars only; per-class IoU goes to MLflow)."""
    result = {"iteration": int(iteration), "miou": float(metrics["miou"]), "attempt": attempt}
    if "pixel_accuracy" in metrics:
        result["pixel_accuracy"] = float(metrics["pixel_accuracy"])
    return result


def _start_attempt(
    config: dict[str, Any], sweep: dict[str, Any]
) -> tuple[dict[str, Any], str, Path, int]:
    """(the trial's full config, its id, its run dir (made and checked), this attempt's number)."""
    from ray import tune

    config = {**sweep, **config}
    trial_id = tune.get_context().get_trial_id()
    run_dir = run_dir_of(config, trial_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_dir(run_dir)
    return config, trial_id, run_dir, count_attempt(run_dir)


def train_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune function trainable: one process trains one configuration."""
    from ray import tune

    config, trial_id, run_dir, attempt = _start_attempt(config, sweep)
    cfg = build_trial_config(config, trial_id, run_dir)

    def on_eval(iteration: int, metrics: dict[str, Any]) -> None:
        report_with_checkpoint(tune_result(iteration, metrics, attempt), run_dir)

    with output_to(run_dir / TRAIN_LOG):
        final = _run_training(cfg, on_eval)
    tune.report(
        {
            **tune_result(final["iteration"], final, attempt),
            FINISHED_KEY: True,
            "run_id": final.get("run_id"),
        }
    )
    prune_finished(run_dir, bool(config.get("keep_checkpoints")))


TRAIN_LOG = "train.log"  # in the run dir: what training printed


def _run_training(cfg: Any, on_eval: Callable[[int, dict], None] | None) -> dict[str, Any]:
    from launch.train import run

    return run(cfg, on_eval=on_eval, resume="auto")


def train_trial_distributed(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune function trainable for a multi-GPU DeepSpeed trial.

    A Ray Train TorchTrainer with `workers` workers runs `launch.train.run` on every rank.
    Only rank 0 sees evaluations (on_eval), while `ray.train.report` is a barrier over all ranks, so
    rank 0 forwards them through a Ray queue and this function reports them to Tune. The run dir
    must be on a filesystem every worker of the trial shares (DeepSpeed checkpoints need it too).
    """
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    config, trial_id, run_dir, attempt = _start_attempt(config, sweep)
    # No CPU: it must fit in the trial's placement group, whose CPUs the workers hold.
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _distributed_worker,
        train_loop_config={**config, "trial_id": trial_id, "queue": queue},
        scaling_config=ScalingConfig(
            num_workers=int(config["workers"]),
            use_gpu=bool(config["use_gpu"]),
            resources_per_worker={k: v for k, v in config["worker_resources"].items() if v > 0},
        ),
        run_config=RunConfig(
            name=f"{trial_id}-ranks", storage_path=str(Path(config["runs_root"]) / "ray-train")
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised below, in the trial's own thread
            outcome["error"] = error

    worker = threading.Thread(target=fit, daemon=True)
    worker.start()
    final: dict[str, Any] | None = None
    while worker.is_alive() or not queue.empty():
        try:
            kind, _, metrics = queue.get(timeout=1.0)
        except Empty:
            continue
        if kind == "eval":
            report_with_checkpoint({**metrics, "attempt": attempt}, run_dir)
        else:
            final = metrics
    worker.join()
    queue.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    if final is None:
        raise RuntimeError(f"trial {trial_id}: training ended without final metrics from rank 0")
    tune.report(
        {
            **tune_result(final["iteration"], final, attempt),
            FINISHED_KEY: True,
            "run_id": final.get("run_id"),
        }
    )
    prune_finished(run_dir, bool(config.get("keep_checkpoints")))


def _distributed_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    queue = loop_config["queue"]
    run_dir = run_dir_of(loop_config, loop_config["trial_id"])
    cfg = build_trial_config(loop_config, loop_config["trial_id"], run_dir)
    rank = ray.train.get_context().get_world_rank()

    def on_eval(iteration: int, metrics: dict[str, Any]) -> None:
        queue.put(("eval", iteration, tune_result(iteration, metrics)))

    with output_to(run_dir / f"train-rank{rank}.log"):
        final = _run_training(cfg, on_eval)
    if rank == 0:
        queue.put(("final", final["iteration"], final))
