"""Pieces shared by the ratio sweep and the ablation tables.

Searched or varied settings travel to trials as `key=value` override strings for
`launch.config.load_config`, so a trial's config is built exactly as `launch/train.py` builds it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Search-space name -> dotted TrainConfig key.
SEARCH_KEYS: dict[str, str] = {
    "ratio": "model.ratio",
    "fusion": "model.fusion",
    "alpha": "loss.alpha",
    "beta": "loss.beta",
    "gamma": "loss.gamma",
}

# CPU smoke settings on top of the `scenes` preset: a tiny model, a few iterations, an early
# evaluation so that ASHA and the checkpoints have something to work with.
SMOKE_CONFIG = "scenes"
SMOKE_OVERRIDES: tuple[str, ...] = (
    "schedule.iterations=4",
    "schedule.warmup_iters=0",
    "eval.every=2",
    "eval.num_pictures=0",
    "checkpoint.every=2",
    "checkpoint.keep=1",
    "data.crop_size=64",
    "data.batch_size=2",
    "data.num_workers=0",
    "logging.every=1",
    "runtime.progress=false",
)
SMOKE_DATA = {"train": 8, "val": 4, "size": "128x64"}  # images of the generated scenes set


def absolute(path: str | os.PathLike) -> Path:
    """`path` made absolute against the current directory (trials run elsewhere)."""
    return Path(path).expanduser().resolve()


def config_hash(overrides: Sequence[str], config: str) -> str:
    """A short stable hash of what decides a training run's result (preset + overrides).

    Paths, tracking settings and tags are left out: they do not change what is trained.
    """
    skip = ("data.root=", "runtime.run_dir=", "logging.")
    kept = sorted(o for o in overrides if not o.startswith(skip))
    blob = json.dumps({"config": config, "overrides": kept}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_smoke_data(root: Path) -> Path:
    """Generate and pack the `scenes` dataset under `root` once; return the shard root.

    Uses the same commands a user runs (`python -m pipeline.synth`, `python -m pipeline.pack`).
    """
    shards = root / "shards" / "scenes"
    if (shards / "train" / "manifest.json").is_file() and (
        shards / "val" / "manifest.json"
    ).is_file():
        return shards
    raw = root / "raw" / "scenes"
    _run([
        sys.executable, "-m", "pipeline.synth", "scenes", "--out", str(raw), "--overwrite",
        "--train", str(SMOKE_DATA["train"]), "--val", str(SMOKE_DATA["val"]),
        "--size", SMOKE_DATA["size"], "--quiet",
    ])  # fmt: skip
    _run([
        sys.executable, "-m", "pipeline.pack", "cityscapes", "--src", str(raw), "--out", str(shards),
        "--name", "scenes", "--workers", "1", "--no-progress",
    ])  # fmt: skip
    return shards


def base_config(
    config: str,
    overrides: Sequence[str],
    *,
    smoke: bool,
    smoke_data: Path,
    reserved: Sequence[str] = (),
) -> tuple[str, list[str], Any]:
    """The preset, the overrides every trial gets (data root made absolute) and the loaded config.

    smoke: the `scenes` preset with SMOKE_OVERRIDES, data generated under `smoke_data` unless a
    data.root is given. `reserved` keys (what the caller varies itself) may not be overridden.
    Loading here makes a bad key or value fail in the driver, before any trial starts.
    """
    from launch.config import check_pretrained, load_config

    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
    clash = [o for o in overrides if o.split("=", 1)[0] in reserved]
    if clash:
        raise ValueError(f"overrides {clash} set values that this run varies itself")
    if smoke:
        config = SMOKE_CONFIG
        overrides = [*SMOKE_OVERRIDES, *overrides]
        if not any(o.startswith("data.root=") for o in overrides):
            overrides.append(f"data.root={prepare_smoke_data(smoke_data)}")
    cfg = load_config(config, overrides)
    check_pretrained(cfg)  # a paper preset without ImageNet weights stops here, not in each trial
    overrides = [o for o in overrides if not o.startswith("data.root=")]
    overrides.append(f"data.root={absolute(cfg.data.root)}")
    return config, overrides, cfg


def default_experiment(cfg: Any, smoke: bool) -> str:
    """The MLflow experiment: the config's, else the dataset's ("smoke" for smoke runs)."""
    return cfg.logging.experiment or ("smoke" if smoke else cfg.dataset)


def schedule_of(cfg: Any) -> tuple[int, int]:
    """(training iterations, evaluation interval); an interval of 0 means only at the end."""
    iterations = int(cfg.schedule.iterations)
    every = int(cfg.eval.every) or iterations
    return iterations, every


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with code {done.returncode}:\n{done.stderr[-3000:]}"
        )


def quiet_tune() -> None:
    """Keep Tune's own console output off: the sweeps print a line per trial event instead.

    Tune's newer reporter prints an experiment box and a TensorBoard hint even at verbose=0;
    the legacy one is silent at verbose=0. The snapshot-frequency warning is about reports with
    checkpoints, which are tiny references here (sweeps/trial.py).
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join `address` (auto / ray://HOST:PORT) or start a local Ray sized to this machine.

    The dashboard stays off for a local Ray (nothing listens beyond 127.0.0.1); a Ray already
    initialised in this process (tests) is used as is.
    """
    import ray

    if ray.is_initialized():
        return
    env = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    # Ray gives each trial OMP_NUM_THREADS = its CPUs; a value set here (tests) wins.
    if os.environ.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    runtime_env = {"env_vars": env}
    from pipeline.ray_local import join_cluster, start_local

    if address:
        join_cluster(address, runtime_env=runtime_env)
        return
    # Ray keeps token authentication on for a new local instance (its default, which this
    # keeps) and warns about it on every start; sweeps/README.md says it once instead.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    # A new private cluster on loopback even when another Ray runs on this machine.
    start_local(num_cpus or os.cpu_count() or 1, runtime_env=runtime_env, log_to_driver=True)


def check_tracking_reach(address: str | None, tracking_uri: str | None) -> None:
    """Warn when trials on other nodes could not reach a server the sweep starts on 127.0.0.1."""
    from sweeps.mlflow_server import resolve_tracking_uri, sqlite_path

    if address and sqlite_path(resolve_tracking_uri(tracking_uri)) is not None:
        print(
            "warning: the MLflow server for a SQLite store listens on 127.0.0.1 of this machine; "
            "trials on other nodes of the cluster cannot reach it. Give --tracking-uri "
            "http://HOST:PORT of a tracking server every node reaches.",
            file=sys.stderr,
        )


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[format_value(v) for v in row] for row in rows])
    return out.getvalue()


def close_unfinished_children(client: Any, experiment_id: str, parent_run_id: str) -> list[str]:
    """Mark the trial runs of sweep run `parent_run_id` (tag sweep_run) that are still RUNNING as
    KILLED; return their ids.

    A trial stopped by ASHA (or lost with its worker) never reaches the end of training, so its
    MLflow run would otherwise stay RUNNING for ever.
    """
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.sweep_run = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in runs]


def add_common_args(p: argparse.ArgumentParser, *, storage: str, smoke_help: str) -> None:
    """The options the ratio sweep and the ablation tables share: config, MLflow, Ray, trials."""
    p.add_argument("--config", default="cityscapes", help="preset name or config file")
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the dataset)")
    p.add_argument(
        "--address",
        default=None,
        help="join a Ray cluster (auto, HOST:PORT or ray://HOST:PORT; it needs the cluster's "
        "token: RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... ); default: a private Ray on 127.0.0.1",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray size (default: all)")
    p.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help=">1: a DeepSpeed trial over that many GPUs (default 1 with GPUs, else 0)",
    )
    p.add_argument(
        "--workers-per-trial",
        type=int,
        default=None,
        help="DeepSpeed ranks per trial (Ray Train workers; default one per GPU, at least 1)",
    )
    p.add_argument(
        "--cpus-per-trial", type=float, default=None, help="default: 1 with --smoke, else 4"
    )
    p.add_argument(
        "--max-failures", type=int, default=2, help="retries per training run (default 2)"
    )
    p.add_argument("--storage", default=storage, help="Tune results and trial run dirs")
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep a finished run's DeepSpeed checkpoints (default: only its exported model.pt)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides key=value for every run")
