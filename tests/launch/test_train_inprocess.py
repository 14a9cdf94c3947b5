"""launch.train.run in-process (what the sweeps call, world size 1): on_eval, the final
metrics, and a hook that raises once (tests.launch.faults.FailOnce), after which a second call
resumes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launch.train_utils import REPO, TINY, env, losses, scenes_shards

SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from launch.config import load_config
from launch.train import run
from tests.launch.faults import FailOnce

cfg = load_config("scenes", sys.argv[2:])
seen = []
try:
    run(cfg, on_eval=lambda it, m: seen.append(it), hooks=[FailOnce(2)])
    raise SystemExit("FailOnce did not fire")
except RuntimeError as e:
    first_error = str(e)
result = run(cfg, on_eval=lambda it, m: seen.append((it, m["miou"])), hooks=[FailOnce(2)])
print("RESULT " + json.dumps({"error": first_error, "seen": seen, "result": result}))
"""


@pytest.mark.slow
def test_run_in_process_with_fail_once(tmp_path, tmp_path_factory) -> None:
    shards = scenes_shards(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    overrides = [
        f"data.root={shards}",
        f"runtime.run_dir={run_dir}",
        *TINY,
        "logging.enabled=false",
        "schedule.iterations=4",
        "checkpoint.every=2",
        "eval.every=2",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(REPO), *overrides],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert "injected failure at iteration 2" in out["error"]
    assert out["seen"][0] == 2  # the first call evaluated at 2, then failed
    assert [s[0] for s in out["seen"][1:]] == [4]  # resumed from 2: evaluates at 4 only
    res = out["result"]
    assert res["iteration"] == 4 and 0.0 <= res["miou"] <= 1.0
    assert len(res["iou"]) == 19 and res["run_id"] is None  # MLflow off in this test
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 for r in losses(run_dir).values())
    assert (run_dir / "failed_once_at_2").exists() and (run_dir / "model.pt").exists()


def test_loader_watch_warns_once_when_the_loader_is_the_bottleneck() -> None:
    from launch.train_log import LoaderWatch

    watch = LoaderWatch(num_workers=2, window=4, threshold=0.1, skip=2)
    # Start-up steps are skipped even when they mostly wait (the workers are starting).
    assert [watch.add(0.9, 1.0) for _ in range(2)] == [None, None]
    # A fed loader: 5% waits never warn.
    assert [watch.add(0.05, 1.0) for _ in range(10)] == [None] * 10
    # A starved loader: the (upper) median of the 4-step window reaches 50% on the second
    # slow step; it warns then, and only then.
    got = [watch.add(0.5, 1.0) for _ in range(6)]
    assert got[0] is None and got[2:] == [None] * 4
    assert got[1] is not None and "50%" in got[1] and "data.num_workers (now 2)" in got[1]
