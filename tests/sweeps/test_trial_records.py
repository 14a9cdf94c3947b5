"""What a sweep's trials leave behind: MLflow records readable from the store alone (no server),
and, for trials that end without finishing, their config, logs and metrics but no checkpoints."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
from mlflow import MlflowClient

from launch.config import load_config
from launch.tracking import Tracker, write_through
from sweeps.mlflow_server import tracking_server
from sweeps.runner import prune_unfinished
from sweeps.trial import FINISHED_KEY, PRUNED_FILE, prune_ended


def test_trials_write_through_the_server_and_record_the_store(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking_server(store) as url:
        write_through(store, url)  # as sweeps/trial.py does in each trial process
        cfg = load_config("scenes", [f"logging.tracking_uri={store}", "logging.experiment=t"])
        tracker = Tracker(cfg, enabled=True)
        run_id = tracker.start()
        tracker.log_text("| a | b |\n", "table.md")
        tracker.end()
        served = MlflowClient(url)
        assert served.get_run(run_id).info.status == "FINISHED"  # it went through the server
        # An experiment made through the server gets a file root too (the server's default).
        other = served.create_experiment("made-through-the-server")
        assert served.get_experiment(other).artifact_location.startswith("file://")
    # The server is gone: the store alone reads everything, artifacts included.
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.data.params["logging.tracking_uri"] == store  # not the server's dead address
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert {f.path for f in client.list_artifacts(run_id)} >= {"config.yaml", "table.md"}


def _grid(*trials: tuple[str, bool]):
    """A stand-in for Tune's ResultGrid: per trial its reports (with FINISHED_KEY on the last
    report of a trial that finished training)."""
    out = []
    for _, finished in trials:
        frame = pd.DataFrame(
            {"iteration": [2, 4], FINISHED_KEY: [None, True if finished else None]}
        )
        out.append(SimpleNamespace(metrics_dataframe=frame))
    return out


def _run_dir(root: Path, trial: str) -> Path:
    d = root / trial
    (d / "checkpoints" / "iter_00000002").mkdir(parents=True)
    (d / "checkpoints" / "iter_00000002" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    for name in ("config.json", "metrics.jsonl", "eval.jsonl", "train.log"):
        (d / name).write_text("{}\n")
    return d


def test_trials_that_end_unfinished_keep_records_not_checkpoints(tmp_path: Path) -> None:
    statuses = {"stopped": "TERMINATED", "failed": "ERROR", "done": "TERMINATED",
                "paused": "UNFINISHED"}  # fmt: skip
    dirs = {t: _run_dir(tmp_path, t) for t in statuses}
    grid = _grid(("stopped", False), ("failed", False), ("done", True), ("paused", False))
    prune_unfinished(grid, statuses, tmp_path)
    for trial in ("stopped", "failed"):
        d = dirs[trial]
        assert not (d / "checkpoints").exists()
        assert all((d / n).is_file() for n in ("config.json", "metrics.jsonl", "eval.jsonl"))
    assert (dirs["stopped"] / PRUNED_FILE).read_text() == "ASHA stopped the trial early\n"
    assert (dirs["failed"] / PRUNED_FILE).read_text() == "the trial failed for good\n"
    # A finished trial prunes its own (after its export); an interrupted one must resume.
    assert (dirs["done"] / "checkpoints").is_dir() and (dirs["paused"] / "checkpoints").is_dir()
    assert not prune_ended(dirs["stopped"], "again")  # nothing left to remove
