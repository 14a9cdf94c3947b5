"""Shared pieces of the training tests: a tiny `scenes` shard set and subprocess launchers.

Training runs in subprocesses (python / torchrun / deepspeed), never in the pytest process, so
no process group or DeepSpeed state leaks between tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "launch" / "train.py")
BIN = Path(sys.executable).parent

# depth 18, 16 channels, 64 px crops: a few hundred ms per iteration on one core.
TINY = [
    "model.channels=16",
    "model.aspp_channels=16",
    "data.crop_size=64",
    "data.batch_size=2",
    "data.num_workers=0",
    "eval.crop=64",
    "eval.num_pictures=1",
    "schedule.warmup_iters=0",
    "runtime.progress=false",
]


def scenes_shards(base: Path) -> Path:
    """shards/scenes with 16 train and 4 val images of 96x64 under base (made once)."""
    root = base / "scenes_shards"
    if (root / "val" / "manifest.json").is_file():
        return root
    from launch.demo import pack_command
    from pipeline.synth import generate

    data = base / "scenes_data"
    if not data.exists():
        generate("scenes", data, train=16, val=4, size=(96, 64))
    cmd = [*pack_command(data, root), "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, env=env())
    return root


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"})
    e.pop("MLFLOW_TRACKING_URI", None)
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(shards: Path, run_dir: Path, *overrides: str, mlflow: bool = False) -> list[str]:
    out = ["--config", "scenes", "--run-dir", str(run_dir), f"data.root={shards}", *TINY]
    if not mlflow:
        out.append("logging.enabled=false")
    return out + list(overrides)


def python_cmd(a: list[str]) -> list[str]:
    return [sys.executable, TRAIN, *a]


def torchrun_cmd(a: list[str], nproc: int = 2) -> list[str]:
    return [
        str(BIN / "torchrun"),
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        TRAIN,
        *a,
    ]


def run(
    cmd: list[str],
    cwd: Path,
    timeout: float = 240,
    check: bool = True,
    faults: dict | None = None,
    **extra_env: str,
) -> subprocess.CompletedProcess:
    """Run a training command; `faults` (tests.launch.faults) breaks it on purpose."""
    if faults:
        from tests.launch.faults import fault_env

        extra_env = {**fault_env(faults), **extra_env}
    proc = subprocess.run(
        cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def losses(run_dir: Path) -> dict[int, dict]:
    """iteration -> record, from <run_dir>/metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["iteration"]] = rec
    return out
