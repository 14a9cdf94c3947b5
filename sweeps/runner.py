"""Runs a set of trials with Ray Tune under one MLflow parent run (ratio sweep and ablations).

The driver owns: the MLflow parent run, the Tuner (fresh or restored), fault tolerance
(FailureConfig; trials resume from their last reported checkpoint), and closing child runs that
never finished (ASHA stops). Trials live in sweeps/trial.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeps import resume_trust
from sweeps.common import close_unfinished_children, quiet_tune
from sweeps.trial import train_trial, train_trial_distributed


@dataclass
class SweepSpec:
    """Everything one Tune experiment needs; paths absolute."""

    name: str  # Tune experiment name (folder under storage) and MLflow parent run name
    config: str  # preset name or config file for launch.config.load_config
    overrides: list[str]  # base key=value overrides for every trial
    param_space: dict[str, Any]  # searched values (tune.grid_search / tune.choice / ...)
    storage: Path  # Tune storage folder; the experiment is storage/name
    experiment: str  # MLflow experiment of the parent and its children
    tracking_uri: str  # URI the trials write to (a server when the store is a SQLite file)
    store_uri: str | None = None  # the store itself (default tracking_uri): what runs record
    variants: dict[str, list[str]] = field(default_factory=dict)  # ablations: overrides per variant
    tags: dict[str, str] = field(default_factory=dict)  # tags on the parent and on every child
    num_samples: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int | None = None  # DeepSpeed ranks per trial (None: one per GPU, >= 1)
    max_failures: int = 2
    max_concurrent: int | None = None
    scheduler: Any = None  # e.g. ASHAScheduler(time_attr="iteration", ...)
    callbacks: list[Any] = field(default_factory=list)  # extra tune.Callback objects (tests)
    parent_run_id: str | None = None  # group under this existing run (its owner ends it)
    nest: bool = True  # trials are MLflow children of the group run (else tagged sweep_run only)
    keep_checkpoints: bool = False  # keep a finished trial's DeepSpeed checkpoints (else pruned)

    def __post_init__(self) -> None:
        if not self.storage.is_absolute():
            raise ValueError(f"sweep storage {self.storage} must be an absolute path")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise ValueError(f"gpus_per_trial above 1 must be whole, got {self.gpus_per_trial}")
        if self.workers_per_trial is None:
            self.workers_per_trial = max(1, int(self.gpus_per_trial))
        if self.workers_per_trial < 1:
            raise ValueError(f"workers_per_trial must be >= 1, got {self.workers_per_trial}")

    @property
    def experiment_dir(self) -> Path:
        return self.storage / self.name

    @property
    def state_file(self) -> Path:
        """Sweep-level state kept beside Tune's experiment folder (the parent run id)."""
        return self.storage / f"{self.name}.sweep.json"


def mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(client: Any, name: str, store_uri: str | None = None) -> str:
    """The experiment's id, created (of the kind MLflow's UI opens on its runs table, with a file
    artifact root beside a SQLite `store_uri`) if needed."""
    from launch.tracking import get_or_create_experiment

    return get_or_create_experiment(client, name, store_uri or client.tracking_uri)


def start_parent_run(spec: SweepSpec, client: Any, resume: bool) -> str:
    """Create the sweep's MLflow parent run, or reopen it when resuming."""
    if spec.parent_run_id is not None:
        return spec.parent_run_id
    if resume:
        if not spec.state_file.is_file():
            raise FileNotFoundError(
                f"{spec.state_file}: no sweep state to resume (was a sweep named {spec.name!r} "
                f"started with this storage folder?)"
            )
        state = json.loads(spec.state_file.read_text())
        client.update_run(state["parent_run_id"], status="RUNNING")
        return state["parent_run_id"]
    exp_id = experiment_id(client, spec.experiment, spec.store_uri)
    run = client.create_run(exp_id, run_name=spec.name, tags={**spec.tags, "role": "sweep"})
    client.log_param(run.info.run_id, "config", spec.config)
    client.log_param(run.info.run_id, "overrides", " ".join(spec.overrides)[:6000])
    client.log_param(run.info.run_id, "search_space", _describe(spec.param_space)[:6000])
    spec.storage.mkdir(parents=True, exist_ok=True)
    state = {"parent_run_id": run.info.run_id, "experiment": spec.experiment, "name": spec.name}
    tmp = spec.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.rename(spec.state_file)
    return run.info.run_id


def _describe(space: dict[str, Any]) -> str:
    return json.dumps({k: str(v) for k, v in space.items()})


# Every trial's run carries the id of its sweep's (or table's) run, nested or not.
GROUP_TAG = "sweep_run"


def make_trainable(spec: SweepSpec, parent_run_id: str):
    from ray import tune

    sweep = {
        "config": spec.config,
        "overrides": list(spec.overrides),
        "variants": spec.variants,
        "tracking_uri": spec.tracking_uri,
        "store_uri": spec.store_uri or spec.tracking_uri,
        "parent_run_id": parent_run_id if spec.nest else None,
        "experiment": spec.experiment,
        "tags": {**spec.tags, GROUP_TAG: parent_run_id},
        "runs_root": str(spec.experiment_dir / "runs"),
        "keep_checkpoints": spec.keep_checkpoints,
        "workers": spec.workers_per_trial,
        "use_gpu": spec.gpus_per_trial > 0,
        "worker_resources": {
            "CPU": spec.cpus_per_trial / spec.workers_per_trial,
            "GPU": spec.gpus_per_trial / spec.workers_per_trial,
        },
    }
    if spec.workers_per_trial > 1:
        # The Ray Train workers ask for the trial's CPUs and GPUs; the trial function only
        # coordinates them.
        fn, resources = train_trial_distributed, {"cpu": 0.01}
    else:
        fn, resources = train_trial, {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(fn, sweep=sweep), resources)


def fit(spec: SweepSpec, *, resume: bool = False):
    """Run (or resume) the experiment; return (ResultGrid, parent_run_id, complete).

    complete: every trial the search space asks for exists and ended (finished, stopped by ASHA
    or failed for good).
    The parent run ends FINISHED when every trial ended, KILLED when the sweep was interrupted
    (resume it with resume=True) and FAILED on an error in the driver.
    """
    from ray import tune

    if resume:  # Tune unpickles the folder's files: only one this driver created
        resume_trust.check(spec.storage, spec.name)
    quiet_tune()
    client = mlflow_client(spec.tracking_uri)
    if not resume and spec.experiment_dir.exists():
        raise FileExistsError(
            f"{spec.experiment_dir} already holds a sweep: resume it (--resume) or pick another "
            "--name / storage folder"
        )
    parent_run_id = start_parent_run(spec, client, resume)
    status = "FAILED"
    try:
        trainable = make_trainable(spec, parent_run_id)
        if resume:
            if not tune.Tuner.can_restore(str(spec.experiment_dir)):
                raise FileNotFoundError(
                    f"{spec.experiment_dir}: no Tune experiment state to resume"
                )
            tuner = tune.Tuner.restore(
                str(spec.experiment_dir),
                trainable=trainable,
                param_space=spec.param_space,
                resume_unfinished=True,
                resume_errored=True,
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=spec.param_space,
                tune_config=tune.TuneConfig(
                    metric="miou",
                    mode="max",
                    scheduler=spec.scheduler,
                    num_samples=spec.num_samples,
                    max_concurrent_trials=spec.max_concurrent,
                    # A fresh process per trial: training leaves a process group behind.
                    reuse_actors=False,
                ),
                run_config=tune.RunConfig(
                    name=spec.name,
                    storage_path=str(spec.storage),
                    failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    callbacks=[
                        trial_log(spec.experiment_dir / "runs", spec.tags, spec.keep_checkpoints),
                        *spec.callbacks,
                    ],
                    # Tune's status tables and per-result lines: TrialLog prints a line per
                    # trial event instead.
                    verbose=0,
                ),
            )
            resume_trust.record(spec.storage, spec.name)  # Tune wrote tuner.pkl just now
        grid = tuner.fit()
        statuses = trial_statuses(grid)
        if not spec.keep_checkpoints:  # whatever the callbacks could not remove while it ran
            prune_unfinished(grid, statuses, spec.experiment_dir / "runs")
        complete = len(statuses) >= expected_trials(spec) and all(
            s in ("TERMINATED", "ERROR") for s in statuses.values()
        )
        status = "FINISHED" if complete else "KILLED"
        return grid, parent_run_id, complete
    finally:
        exp = client.get_run(parent_run_id).info.experiment_id
        close_unfinished_children(client, exp, parent_run_id)
        if spec.parent_run_id is None:
            client.set_terminated(parent_run_id, status=status)


def expected_trials(spec: SweepSpec) -> int:
    """Trials the search space asks for: grid cells x num_samples."""
    cells = 1
    for value in spec.param_space.values():
        if isinstance(value, dict) and "grid_search" in value:
            cells *= len(value["grid_search"])
    return cells * spec.num_samples


def trial_statuses(grid: Any) -> dict[str, str]:
    """trial id -> TERMINATED (ended: finished or stopped by ASHA), ERROR, or UNFINISHED.

    From the public ResultGrid: a Result's error, and Tune's `done` flag, which is set on the
    last result of a trial that ended.
    """
    out = {}
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        if result.error is not None:
            out[trial_id] = "ERROR"
        else:
            out[trial_id] = "TERMINATED" if metrics.get("done") else "UNFINISHED"
    return out


def trial_failures(grid: Any) -> dict[str, int]:
    """trial id -> restarts of the trial seen in its reports (failure retries and resumes)."""
    out = {}
    for result in grid:
        frame = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        attempts = frame["attempt"].max() if frame is not None and "attempt" in frame else 1
        out[trial_id] = max(0, int(attempts) - 1)
    return out


def prune_unfinished(grid: Any, statuses: dict[str, str], runs_root: Path) -> None:
    """Drop the DeepSpeed checkpoints of every trial that ended without finishing its training
    (stopped by ASHA, or failed for good); finished ones pruned their own."""
    from sweeps.trial import FINISHED_KEY, prune_ended

    for trial_id, result in zip(statuses, grid, strict=True):
        frame = result.metrics_dataframe
        finished = (
            frame is not None
            and FINISHED_KEY in frame
            and bool(frame[FINISHED_KEY].fillna(False).any())
        )
        if statuses[trial_id] == "ERROR":
            prune_ended(runs_root / trial_id, "the trial failed for good")
        elif statuses[trial_id] == "TERMINATED" and not finished:
            prune_ended(runs_root / trial_id, "ASHA stopped the trial early")


def trial_log(runs_root: Path, tags: dict[str, str], keep_checkpoints: bool = False) -> Any:
    """A Tune callback printing one line per trial event: what the trial is (its MLflow run
    name), its evaluations, its end or failure, and where its training log is. It also drops the
    checkpoints of a trial that ends without finishing (unless keep_checkpoints), as soon as it
    ends: at paper scale, early-stopped trials would otherwise fill the disk."""
    from ray import tune

    from sweeps.trial import FINISHED_KEY, TRAIN_LOG, prune_ended, trial_run_name

    def name(trial: Any) -> str:
        return trial_run_name({**trial.config, "tags": tags}) or trial.trial_id

    class TrialLog(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            log = runs_root / trial.trial_id / TRAIN_LOG
            print(f"[{name(trial)}] started: trial {trial.trial_id}, training log {log}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "miou" in result and not result.get(FINISHED_KEY):  # the final one repeats it
                it, miou = result.get("iteration"), result["miou"]
                print(f"[{name(trial)}] iteration {it}: val mIoU {miou:.4f}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            finished = bool((trial.last_result or {}).get(FINISHED_KEY))
            if finished:
                print(f"[{name(trial)}] ended")
                return
            print(f"[{name(trial)}] stopped early (ASHA)")
            if not keep_checkpoints:
                prune_ended(runs_root / trial.trial_id, "ASHA stopped the trial early")

        def on_trial_error(self, iteration, trials, trial, **info):
            log = runs_root / trial.trial_id / TRAIN_LOG
            print(f"[{name(trial)}] failed, see {log} (retried up to --max-failures times)")
            if not keep_checkpoints:
                prune_ended(runs_root / trial.trial_id, "the trial failed for good")

    return TrialLog()


def child_runs(client: Any, parent_run_id: str) -> list[Any]:
    """The trials' MLflow runs of the sweep run `parent_run_id` (every state)."""
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs(
        [exp], filter_string=f"tags.{GROUP_TAG} = '{parent_run_id}'", max_results=5000
    )


def runs_by_trial(client: Any, parent_run_id: str) -> dict[str, list[Any]]:
    """trial id -> its MLflow child runs (one, or more when training made a new run on retry)."""
    out: dict[str, list[Any]] = {}
    for run in child_runs(client, parent_run_id):
        out.setdefault(run.data.tags.get("trial_id", ""), []).append(run)
    return out


def log_table(client: Any, run_id: str, markdown: str, csv: str, stem: str) -> None:
    client.log_text(run_id, markdown, f"{stem}.md")
    client.log_text(run_id, csv, f"{stem}.csv")


def cpu_count() -> int:
    return os.cpu_count() or 1
