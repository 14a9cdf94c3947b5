"""Checkpoints count only when complete; keep-last-k; non-finite weights are never saved; a
crash inside a save leaves the previous complete checkpoint as the one resumed from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.checkpoint import CheckpointError, CheckpointManager, latest_complete, list_complete
from tests.launch.train_utils import args, losses, python_cmd, run, scenes_shards


class FakeEngine:
    """What CheckpointManager uses of a DeepSpeed engine: .module and save_checkpoint."""

    def __init__(self, value: float = 1.0):
        self.module = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(self.module.weight, value)

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True)
        torch.save({"client": client_state}, d / "mp_rank_00_model_states.pt")


def test_keep_last_k_and_complete_marker(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    for it in (10, 20, 30):
        path = mgr.save(FakeEngine(), it, {"iteration": it}, {"world_size": 1})
        meta = json.loads((path / "COMPLETE").read_text())
        assert meta["iteration"] == it and meta["world_size"] == 1
    assert [c.iteration for c in list_complete(mgr.root)] == [20, 30]
    assert not (mgr.root / "iter_00000010").exists()
    assert mgr.resolve("auto").iteration == 30 and mgr.resolve("none") is None
    assert mgr.resolve(str(mgr.root / "iter_00000020")).iteration == 20


def test_incomplete_save_is_never_resumed_and_is_cleaned(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(FakeEngine(), 10, {}, {"world_size": 1})
    half = mgr.root / "iter_00000020"  # a save that died before its COMPLETE marker
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert latest_complete(mgr.root).iteration == 10
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        mgr.resolve(str(half))
    mgr.save(FakeEngine(), 30, {}, {"world_size": 1})
    assert not half.exists()  # older than the newest complete one: removed
    assert [c.iteration for c in list_complete(mgr.root)] == [10, 30]


def test_non_finite_weights_are_refused(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    with pytest.raises(CheckpointError, match="non-finite"):
        mgr.save(FakeEngine(float("nan")), 10, {}, {"world_size": 1})
    assert latest_complete(mgr.root) is None and not (mgr.root / "iter_00000010").exists()


def test_resume_path_errors(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path, keep=2)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        mgr.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        mgr.resolve(str(tmp_path / "empty"))


@pytest.mark.slow
def test_crash_during_save_resumes_from_previous_complete(tmp_path, tmp_path_factory) -> None:
    shards = scenes_shards(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = (
        "schedule.iterations=4",
        "checkpoint.every=2",
        "eval.every=0",
        f"logging.tracking_uri={uri}",
        "logging.experiment=crash",
        "logging.every=1",
    )
    proc = run(
        python_cmd(args(shards, run_dir, *common, mlflow=True)),
        tmp_path,
        check=False,
        faults={"crash_in_save_at": 4},
    )
    assert proc.returncode == -9  # SIGKILL inside the save of iteration 4
    ck = run_dir / "checkpoints"
    assert (ck / "iter_00000002" / "COMPLETE").is_file()
    assert (ck / "iter_00000004").is_dir() and not (ck / "iter_00000004" / "COMPLETE").exists()
    before = losses(run_dir)
    assert sorted(before) == [1, 2, 3, 4]

    proc = run(python_cmd(args(shards, run_dir, *common, mlflow=True)), tmp_path)
    assert "at iteration 2" in proc.stdout and "iter_00000002" in proc.stdout
    after = losses(run_dir)
    assert sorted(after) == [1, 2, 3, 4]
    for it in (3, 4):  # redone from the complete checkpoint: the same losses again
        assert after[it]["loss"] == before[it]["loss"]
    assert (ck / "iter_00000004" / "COMPLETE").is_file()
    assert (run_dir / "model.pt").is_file()

    # The resumed run continues the same MLflow run (its id travels in the client state).
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (r,) = client.search_runs([client.get_experiment_by_name("crash").experiment_id])
    assert r.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(r.info.run_id, "train/loss/total")}
    assert steps == {1, 2, 3, 4}
