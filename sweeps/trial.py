"""The Ray Tune trial: one real training run through `launch.train.run`.

A trial gets the searched values as its Tune config (ratio, fusion, alpha, beta, gamma, or an
ablation `variant`) and the sweep's fixed settings through `tune.with_parameters(..., sweep=...)`,
so that a resumed sweep hands trials the current MLflow server address. Merged, they hold:
    config          preset name or config file path for `launch.config.load_config`
    overrides       base `key=value` overrides (absolute data root included)
    variants        {variant name: [overrides]} (ablation tables; empty for the ratio sweep)
    variant         the variant of this trial (optional)
    ratio, fusion, alpha, beta, gamma   searched values (optional; see common.SEARCH_KEYS)
    tracking_uri, parent_run_id, experiment, tags   MLflow nesting
    runs_root       absolute folder holding every trial's run dir
    workers, use_gpu, worker_resources   > 1 worker: a DeepSpeed trial over Ray Train workers

Fault tolerance: each evaluation is reported to Tune with a checkpoint of the run dir. A retried
or resumed trial keeps its run dir when it is still there (same machine) and otherwise restores
it from the last reported checkpoint, then training resumes from the run dir (resume="auto").
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
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

    overrides = trial_overrides(config)
    cfg = load_config(config["config"], overrides)
    cfg.runtime.run_dir = str(run_dir)
    cfg.logging.tracking_uri = config["tracking_uri"]
    cfg.logging.parent_run_id = config.get("parent_run_id")
    if config.get("experiment"):
        cfg.logging.experiment = config["experiment"]
    tags = dict(cfg.logging.tags or {})
    tags.update(config.get("tags", {}))
    tags["trial_id"] = trial_id
    tags["config_hash"] = config_hash(overrides, config["config"])
    tags["run_dir"] = str(run_dir)
    if config.get("variant") is not None:
        tags["variant"] = str(config["variant"])
    cfg.logging.tags = tags
    return cfg


def run_dir_of(config: dict[str, Any], trial_id: str) -> Path:
    """The trial's run dir: fixed per trial, so retries and resumes find it again."""
    return Path(config["runs_root"]) / trial_id


def restore_run_dir(run_dir: Path) -> None:
    """Bring back the run dir from Tune's last checkpoint when this machine does not have it."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None or (run_dir.is_dir() and any(run_dir.iterdir())):
        return
    with checkpoint.as_directory() as saved:
        tmp = run_dir.with_name(run_dir.name + ".restoring")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(saved, tmp)
        shutil.rmtree(run_dir, ignore_errors=True)
        tmp.rename(run_dir)


def report_with_checkpoint(result: dict[str, Any], run_dir: Path) -> None:
    """tune.report with a checkpoint holding what resuming needs: the run dir's small files and
    its newest complete DeepSpeed checkpoint (hard links; Tune copies them to its storage)."""
    from ray import tune

    from launch.checkpoint import latest_complete

    staged = run_dir.with_name(run_dir.name + ".report")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        for item in run_dir.iterdir():
            if item.is_file() and item.name != "model.pt":  # the export is rebuilt at the end
                _link(item, staged / item.name)
        ckpts = run_dir / "checkpoints"
        latest = latest_complete(ckpts)
        if latest is not None:
            (staged / "checkpoints").mkdir()
            for item in ckpts.iterdir():
                if item.is_file():
                    _link(item, staged / "checkpoints" / item.name)
            shutil.copytree(latest.path, staged / "checkpoints" / latest.path.name,
                            copy_function=_link)  # fmt: skip
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(staged)))
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _link(src: Any, dst: Any) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


# Set on the report made after training returned. (Tune's own "done" field is True on the last
# result of any trial, also one that ASHA stopped.)
FINISHED_KEY = "training_finished"


def tune_result(iteration: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers Tune sees from one evaluation (scalars only; per-class IoU goes to MLflow)."""
    result = {"iteration": int(iteration), "miou": float(metrics["miou"])}
    if "pixel_accuracy" in metrics:
        result["pixel_accuracy"] = float(metrics["pixel_accuracy"])
    return result


def train_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune function trainable: one process trains one configuration."""
    from ray import tune

    config = {**sweep, **config}
    trial_id = tune.get_context().get_trial_id()
    run_dir = run_dir_of(config, trial_id)
    restore_run_dir(run_dir)
    cfg = build_trial_config(config, trial_id, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    def on_eval(iteration: int, metrics: dict[str, Any]) -> None:
        report_with_checkpoint(tune_result(iteration, metrics), run_dir)

    final = _run_training(cfg, on_eval)
    tune.report(
        {
            **tune_result(final["iteration"], final),
            FINISHED_KEY: True,
            "run_id": final.get("run_id"),
        }
    )


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

    config = {**sweep, **config}
    trial_id = tune.get_context().get_trial_id()
    run_dir = run_dir_of(config, trial_id)
    restore_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
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
            kind, iteration, metrics = queue.get(timeout=1.0)
        except Empty:
            continue
        if kind == "eval":
            report_with_checkpoint(tune_result(iteration, metrics), run_dir)
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
            **tune_result(final["iteration"], final),
            FINISHED_KEY: True,
            "run_id": final.get("run_id"),
        }
    )


def _distributed_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    queue = loop_config["queue"]
    run_dir = run_dir_of(loop_config, loop_config["trial_id"])
    cfg = build_trial_config(loop_config, loop_config["trial_id"], run_dir)
    rank = ray.train.get_context().get_world_rank()

    def on_eval(iteration: int, metrics: dict[str, Any]) -> None:
        queue.put(("eval", iteration, tune_result(iteration, metrics)))

    final = _run_training(cfg, on_eval)
    if rank == 0:
        queue.put(("final", final["iteration"], final))
