"""The ratio sweep end to end on CPU: real training trials, MLflow nesting, retries, resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SEARCHED_PARAMS = ("model.ratio", "model.fusion", "loss.alpha", "loss.beta", "loss.gamma")


def _args(tmp: Path, uri: str, shards: Path, name: str, *extra: str):
    from sweeps.ratio_sweep import parse_args

    # No ASHA: with two trials it would stop the weaker one, depending on the drawn weights.
    return parse_args(
        ["--smoke", "--no-early-stop", "--storage", str(tmp), "--tracking-uri", uri,
         "--name", name, f"data.root={shards}", *extra]
    )  # fmt: skip


def _column(outcome, name: str) -> list:
    i = outcome.header.index(name)
    return [row[i] for row in outcome.rows]


def _children(uri: str, parent_run_id: str) -> list:
    from sweeps.runner import child_runs, mlflow_client

    return child_runs(mlflow_client(uri), parent_run_id)


def test_smoke_sweep_nests_trials_retries_a_failure_and_logs_the_table(
    ray_session, trial_faults: Path, tracking_uri: str, smoke_shards: Path, tmp_path: Path
) -> None:
    from sweeps.ratio_sweep import run_sweep
    from sweeps.runner import mlflow_client

    # Every trial raises once at iteration 3 (after the checkpointed evaluation at 2).
    trial_faults.write_text(json.dumps({"fail_once_at": 3}))
    try:
        outcome = run_sweep(_args(tmp_path, tracking_uri, smoke_shards, "smoke"))
    finally:
        trial_faults.unlink()

    assert outcome.complete
    assert len(outcome.rows) == 2
    assert sorted(_column(outcome, "ratio")) == [0.4, 1.0]
    assert _column(outcome, "status") == ["done", "done"]
    assert _column(outcome, "retries") == [1, 1]  # failed once, retried, finished
    assert _column(outcome, "iteration") == [4, 4]
    mious = _column(outcome, "miou")
    assert all(0.0 < m <= 1.0 for m in mious) and mious == sorted(mious, reverse=True)

    client = mlflow_client(tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["role"] == "sweep"
    children = _children(tracking_uri, outcome.parent_run_id)
    assert len(children) == 2  # a retried trial continues its own MLflow run
    by_trial = {run.data.tags["trial_id"]: run for run in children}
    assert set(by_trial) == set(_column(outcome, "trial"))
    for row in outcome.rows:
        run = by_trial[row[outcome.header.index("trial")]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert set(SEARCHED_PARAMS) <= set(run.data.params)
        assert float(run.data.params["model.ratio"]) == row[outcome.header.index("ratio")]
        assert float(run.data.params["loss.alpha"]) == row[outcome.header.index("alpha")]
        assert run.data.params["model.fusion"] == row[outcome.header.index("fusion")]
        assert run.data.metrics["val/miou"] == pytest.approx(row[outcome.header.index("miou")])
        assert any(k.startswith("val/iou/") for k in run.data.metrics)  # per-class IoU
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")]
        assert sorted(set(steps)) == [0, 2, 4]  # 0: NaN, logged first (launch/tracking.py)
        losses = client.get_metric_history(run.info.run_id, "train/loss/total")
        assert sorted({m.step for m in losses}) == [1, 2, 3, 4]  # per-iteration metrics
        run_dir = Path(run.data.tags["run_dir"])
        assert (run_dir / "failed_once_at_3").is_file()

    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"sweep_results.md", "sweep_results.csv"} <= artifacts
    table = Path(
        client.download_artifacts(outcome.parent_run_id, "sweep_results.csv", str(tmp_path))
    )
    lines = table.read_text().splitlines()
    assert lines[0].startswith("rank,trial,ratio,fusion,alpha,beta,gamma,miou")
    assert len(lines) == 3


_INTERRUPTED: list[str] = []  # module level: Tune pickles callbacks with the experiment


def _interrupt_after_first_trial():
    from ray import tune

    class InterruptAfterFirstTrial(tune.Callback):
        """Sends SIGUSR1 (Tune's graceful stop, as Ctrl+C) when the first trial completes."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            if not _INTERRUPTED:
                _INTERRUPTED.append(trial.trial_id)
                os.kill(os.getpid(), signal.SIGUSR1)

    return InterruptAfterFirstTrial()


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(
    ray_session, tracking_uri: str, smoke_shards: Path, tmp_path: Path
) -> None:
    from sweeps.ratio_sweep import run_sweep
    from sweeps.runner import mlflow_client

    args = _args(tmp_path, tracking_uri, smoke_shards, "resume", "--max-concurrent", "1")
    first = run_sweep(args, callbacks=[_interrupt_after_first_trial()])

    assert not first.complete
    finished = _INTERRUPTED[0]
    status = dict(zip(_column(first, "trial"), _column(first, "status"), strict=True))
    assert status[finished] == "done"
    # The second trial was not started yet or was stopped midway; it is not done.
    assert all(s == "unfinished" for t, s in status.items() if t != finished)
    client = mlflow_client(tracking_uri)
    assert client.get_run(first.parent_run_id).info.status == "KILLED"
    done_run = next(
        r for r in _children(tracking_uri, first.parent_run_id)
        if r.data.tags["trial_id"] == finished
    )  # fmt: skip

    resumed = run_sweep(_args(tmp_path, tracking_uri, smoke_shards, "resume", "--resume"))

    assert resumed.complete and resumed.parent_run_id == first.parent_run_id
    assert _column(resumed, "status") == ["done", "done"]
    assert client.get_run(resumed.parent_run_id).info.status == "FINISHED"
    children = _children(tracking_uri, resumed.parent_run_id)
    of_finished = [r for r in children if r.data.tags["trial_id"] == finished]
    assert len(of_finished) == 1  # not trained again
    again = client.get_run(done_run.info.run_id)
    assert again.info.end_time == done_run.info.end_time
    assert again.data.metrics == done_run.data.metrics
    finished_runs = [r for r in children if r.info.status == "FINISHED"]
    assert {r.data.tags["trial_id"] for r in finished_runs} == set(_column(resumed, "trial"))


def test_multi_worker_trial_trains_with_two_deepspeed_ranks(
    ray_session, tracking_uri: str, smoke_shards: Path, tmp_path: Path
) -> None:
    """--workers-per-trial 2: a Ray Train TorchTrainer inside the trial, two gloo ranks on CPU."""
    import json

    from sweeps.ratio_sweep import run_sweep

    args = _args(tmp_path, tracking_uri, smoke_shards, "ranks", "--ratios", "1.0", "--fusions",
                 "concat", "--workers-per-trial", "2", "--cpus-per-trial", "1.9",
                 "--keep-checkpoints")  # fmt: skip
    outcome = run_sweep(args)

    assert outcome.complete
    assert _column(outcome, "status") == ["done"]
    assert _column(outcome, "iteration") == [4]
    (run,) = _children(tracking_uri, outcome.parent_run_id)
    assert run.info.status == "FINISHED"
    from sweeps.runner import mlflow_client

    history = mlflow_client(tracking_uri).get_metric_history(run.info.run_id, "val/miou")
    assert [m.step for m in history] == [0, 2, 4]  # 0: NaN before the first evaluation
    # The table ranks a trial by its best evaluation.
    best = max(m.value for m in history if m.step > 0)
    assert best == pytest.approx(_column(outcome, "miou")[0])
    run_dir = Path(run.data.tags["run_dir"])  # --keep-checkpoints: the checkpoints stay
    marker = run_dir / "checkpoints" / "iter_00000004" / "COMPLETE"
    assert json.loads(marker.read_text())["world_size"] == 2
