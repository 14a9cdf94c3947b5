"""User errors of launch/train.py are one line and exit 2 before any work; Ctrl-C is one line."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch.config import ConfigError, load_config
from launch.train import preflight
from tests.launch.train_utils import args, env, python_cmd, run, scenes_shards


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "resolved config" not in proc.stdout  # refused before the trainer started
    return errors[0]


def _train(tmp_path: Path, *overrides: str, shards: Path | None = None, resume: str = "auto"):
    a = args(shards or tmp_path / "nope", tmp_path / "run", *overrides)
    return run([*python_cmd(a), "--resume", resume], tmp_path, timeout=120, check=False)


def test_missing_data_root_names_the_path_and_the_pack_command(tmp_path: Path) -> None:
    t0 = time.monotonic()
    line = _one_error_line(_train(tmp_path))
    root = tmp_path / "nope"
    assert f"data.root={root}: does not exist" in line
    # scenes is generated: the hint makes it first
    assert (f"generate and pack it with `python -m pipeline.synth scenes --out data/scenes && "
            f"python -m pipeline.pack scenes --src data/scenes --out {root}`") in line  # fmt: skip
    assert time.monotonic() - t0 < 60


def test_raw_dataset_as_data_root_is_recognised(tmp_path: Path) -> None:
    from pipeline.synth import generate

    raw = tmp_path / "raw"
    generate("scenes", raw, train=2, val=1, size=(96, 64))
    line = _one_error_line(_train(tmp_path, shards=raw))
    assert f"data.root={raw}: holds a raw scenes dataset, not packed shards" in line
    assert f"python -m pipeline.pack scenes --src {raw} --out shards/scenes" in line


def test_unpacked_folder_as_data_root(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    line = _one_error_line(_train(tmp_path, shards=empty))
    assert f"data.root={empty}: is not packed (no train/val/manifest.json)" in line


def test_missing_resume_path_is_one_line(tmp_path: Path) -> None:
    shards = scenes_shards(tmp_path)
    line = _one_error_line(_train(tmp_path, shards=shards, resume=str(tmp_path / "ckpt")))
    assert line == f"error: --resume {tmp_path / 'ckpt'}: no such file or directory"


def test_global_batch_that_does_not_divide_the_world_is_refused_before_start(
    tmp_path: Path,
) -> None:
    shards = scenes_shards(tmp_path)
    cfg = load_config("scenes", [f"data.root={shards}", "data.batch_size=2",
                                 "data.global_batch_size=8"])  # fmt: skip
    preflight(cfg, 2, "auto")  # 8 = 2 x 2 ranks x 2 micro-steps
    with pytest.raises(ConfigError, match=r"data\.global_batch_size=8 .* world size 3"):
        preflight(cfg, 3, "auto")


@pytest.mark.slow
def test_ctrl_c_is_one_line_naming_the_iteration_and_the_checkpoint(tmp_path: Path) -> None:
    shards = scenes_shards(tmp_path)
    run_dir = tmp_path / "run"
    a = args(shards, run_dir, "schedule.iterations=500", "checkpoint.every=2", "eval.every=0",
             mlflow=True)  # fmt: skip
    proc = subprocess.Popen(
        python_cmd(a), cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "checkpoints" / "iter_00000004" / "COMPLETE").is_file():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = json.loads(log.read_text().splitlines()[-1])["iteration"]
    (line,) = [ln for ln in err.splitlines() if "interrupted" in ln]
    newest = max(m.parent.name for m in (run_dir / "checkpoints").glob("iter_*/COMPLETE"))
    assert line.startswith(f"interrupted at iteration {last}; newest complete checkpoint {newest}; "
                           "rerun the same command to resume")  # fmt: skip
    assert _mlflow_statuses(tmp_path) == ["KILLED"]  # stopped from outside, not failed


def _mlflow_statuses(cwd: Path) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r.info.status for r in client.search_runs(exps)]


def test_the_experiment_defaults_to_the_preset_name() -> None:
    from launch.train import cli_config, parse_args

    assert cli_config(parse_args(["--config", "scenes"])).logging.experiment == "scenes"
    assert cli_config(parse_args(["--config", "voc"])).logging.experiment == "voc"
    chosen = parse_args(["--config", "scenes", "logging.experiment=mine"])
    assert cli_config(chosen).logging.experiment == "mine"


@pytest.mark.slow
def test_ctrl_c_under_the_deepspeed_launcher_is_one_line_for_two_ranks(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the launcher and both ranks (one process group); the
    per-node launcher then sends SIGTERM to the ranks."""
    import os

    from tests.launch.train_utils import BIN, TRAIN, free_port

    shards = scenes_shards(tmp_path)
    run_dir = tmp_path / "run"
    a = args(shards, run_dir, "schedule.iterations=500", "checkpoint.every=2", "eval.every=0",
             mlflow=True)  # fmt: skip
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN,
           "--nodes", "1", *a]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
        # As in a terminal, where Ctrl-C reaches the runner too (a shell running this test in
        # the background would have it ignore SIGINT, and children inherit that).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "checkpoints" / "iter_00000002" / "COMPLETE").is_file():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    # No rank prints a traceback; the `deepspeed` runner itself prints one of its own
    # (KeyboardInterrupt in deepspeed/launcher/runner.py), which is not this program's.
    tracebacks = out.split("Traceback (most recent call last):")[1:]
    assert all("deepspeed/launcher/runner.py" in t and "launch/train" not in t
               for t in tracebacks), out[-4000:]  # fmt: skip
    assert len(tracebacks) <= 1, out[-4000:]
    lines = [ln for ln in out.splitlines() if "interrupted at iteration" in ln]
    assert len(lines) == 1, out[-4000:]
    assert "newest complete checkpoint iter_" in lines[0]
    # The runner dies of the SIGINT, which a shell reports as status 130.
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, out[-3000:])
    assert _mlflow_statuses(tmp_path) == ["KILLED"]


def test_run_dir_flag_is_checked_like_the_config_key(capsys) -> None:
    from launch.train import main

    assert main(["--config", "scenes", "--run-dir", "/"]) == 2
    assert capsys.readouterr().err.startswith("error: runtime.run_dir='/' (/) is a filesystem root")
