"""Run dirs: a new run gets a directory of its own; a finished run is reported, never redone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.config import ConfigError, load_config, to_dict
from launch.run_dir import complete_or_refuse, config_key, default_run_dir, finished_result
from launch.train import cli_config, main, parse_args
from tests.launch.train_utils import TRAIN, env


def _dir_of(*argv: str) -> str:
    return cli_config(parse_args(["--config", "scenes", *argv])).runtime.run_dir


def test_an_unnamed_run_dir_is_named_after_the_config() -> None:
    plain = _dir_of()
    key = config_key(load_config("scenes"))
    assert plain == f"runs/scenes-200it-{key}"
    # What is trained changes the directory; where data and logs are does not.
    assert _dir_of("optim.lr=0.05") != plain
    assert _dir_of("schedule.iterations=30000").startswith("runs/scenes-30k-")
    assert _dir_of("data.root=/elsewhere", "logging.experiment=x", "runtime.progress=false") == (
        plain
    )
    # A directory the user names is used as given.
    assert _dir_of("--run-dir", "runs/mine") == "runs/mine"
    assert _dir_of("runtime.run_dir=runs/theirs") == "runs/theirs"


def _finished_run(run_dir: Path, *overrides: str, iteration: int = 200) -> None:
    """What a finished run leaves: its config, an evaluation at its last iteration, model.pt."""
    cfg = load_config("scenes", list(overrides))
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    (run_dir / "eval.jsonl").write_text(json.dumps({"iteration": iteration, "miou": 0.755}) + "\n")
    (run_dir / "model.pt").write_bytes(b"weights")


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_rerunning_a_finished_run_says_so_and_touches_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = Path(_dir_of())
    _finished_run(run_dir)
    before = _snapshot(tmp_path)
    assert main(["--config", "scenes"]) == 0  # no data, no process group, no MLflow needed
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{run_dir}: this run is complete")
    assert "iteration 200, val mIoU 0.7550" in out[0]
    assert _snapshot(tmp_path) == before  # not even an MLflow store


def test_a_finished_run_of_another_config_is_not_continued(tmp_path, capsys) -> None:
    run_dir = tmp_path / "named"
    _finished_run(run_dir, "optim.lr=0.05")
    assert main(["--config", "scenes", "--run-dir", str(run_dir)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {run_dir} holds a finished run of another config")
    assert "optim.lr: 0.05 -> 0.02" in line


def test_more_iterations_extend_a_finished_run(tmp_path) -> None:
    run_dir = tmp_path / "run"
    _finished_run(run_dir)  # 200 iterations
    longer = load_config("scenes", [f"runtime.run_dir={run_dir}", "schedule.iterations=300"])
    assert complete_or_refuse(longer, "auto", named=True) is None  # resumes and trains on
    shorter = load_config("scenes", [f"runtime.run_dir={run_dir}", "schedule.iterations=100"])
    with pytest.raises(ConfigError, match=r"schedule.iterations: 200 -> 100"):
        complete_or_refuse(shorter, "auto", named=True)
    other = load_config(
        "scenes", [f"runtime.run_dir={run_dir}", "schedule.iterations=300", "optim.lr=0.05"]
    )
    with pytest.raises(ConfigError, match="finished run of another config"):
        complete_or_refuse(other, "auto", named=True)


def test_a_run_that_has_not_finished_is_resumed_not_refused(tmp_path) -> None:
    run_dir = tmp_path / "run"
    _finished_run(run_dir, iteration=100)  # evaluated before its last iteration
    cfg = load_config("scenes", [f"runtime.run_dir={run_dir}"])
    assert finished_result(run_dir) is None
    assert complete_or_refuse(cfg, "auto", named=True) is None
    (run_dir / "eval.jsonl").write_text(json.dumps({"iteration": 200, "miou": 0.7}) + "\n")
    (run_dir / "model.pt").unlink()  # killed between the last evaluation and the export
    assert complete_or_refuse(cfg, "auto", named=True) is None


def test_a_fresh_start_never_overwrites_a_run_in_a_directory_it_did_not_name(tmp_path) -> None:
    cfg = load_config("scenes")
    cfg.runtime.run_dir = str(tmp_path / default_run_dir(cfg))
    Path(cfg.runtime.run_dir).mkdir(parents=True)
    assert complete_or_refuse(cfg, "none", named=False) is None  # empty: nothing to overwrite
    (Path(cfg.runtime.run_dir) / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run of this config"):
        complete_or_refuse(cfg, "none", named=False)
    assert complete_or_refuse(cfg, "none", named=True) is None  # named by the user: as asked


def test_the_command_line_answers_a_finished_run_in_seconds(tmp_path) -> None:
    run_dir = tmp_path / "done"
    _finished_run(run_dir)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, TRAIN, "--config", "scenes", "--run-dir", str(run_dir)],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "this run is complete" in lines[0], lines
    assert seconds < 30, seconds  # importing torch is most of it
    assert sorted(os.listdir(tmp_path)) == ["done"]


def test_a_second_make_demo_reports_the_finished_run_without_training(tmp_path, capsys) -> None:
    from launch.demo import demo_config, train

    shards = tmp_path / "shards" / "scenes"
    cfg, _ = demo_config(tmp_path, shards, [])
    run_dir = Path(cfg.runtime.run_dir)
    assert run_dir == tmp_path / "runs" / "scenes"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    (run_dir / "eval.jsonl").write_text(json.dumps({"iteration": 200, "miou": 0.755}) + "\n")
    (run_dir / "model.pt").write_bytes(b"weights")
    metrics, seconds = train(tmp_path, shards, [])  # no launcher started
    assert metrics["miou"] == 0.755 and seconds is None
    assert "this run is complete" in capsys.readouterr().out
    # Overrides make another config: a directory of its own, never runs/scenes.
    other, _ = demo_config(tmp_path, shards, ["schedule.iterations=50"])
    assert Path(other.runtime.run_dir).parent == tmp_path / "runs"
    assert Path(other.runtime.run_dir).name.startswith("scenes-50it-")
