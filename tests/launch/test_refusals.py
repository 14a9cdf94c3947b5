"""Refusals end a run in one line and exit status 2, before and after the process group starts,
on every rank count; one writer per run dir (an OS lock held by rank 0 for the run's life)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from launch.distributed import WorldInfo
from launch.refusal import EXIT_USAGE, exit_code, one_line
from launch.run_lock import LOCK_NAME, RunDirBusy, RunDirClaim, acquire, release
from pipeline.shards import ShardError
from tests.launch.probe import probe
from tests.launch.train_utils import (
    args,
    python_cmd,
    scenes_shards,
    torchrun_cmd,
)

ALONE = WorldInfo(0, 0, 1, 1, 1, launched=False)


# ---------------------------------------------------------------- the run-dir lock


def test_a_second_holder_is_refused_naming_pid_and_host(tmp_path) -> None:
    fd = acquire(tmp_path / "run")
    try:
        with pytest.raises(RunDirBusy) as e:
            acquire(tmp_path / "run")
        msg = str(e.value)
        assert f"run dir {tmp_path / 'run'} is in use by pid {os.getpid()}" in msg
        assert f"on host {socket.gethostname()} since " in msg and "--run-dir" in msg
        with pytest.raises(RunDirBusy), RunDirClaim(tmp_path / "run", ALONE):
            pass  # a world of one is refused when the claim is made
    finally:
        release(fd)
    with RunDirClaim(tmp_path / "run", ALONE) as claim:
        claim.confirm()
        assert claim.fd is not None
    assert claim.fd is None


def test_a_lock_left_by_a_killed_process_is_not_in_the_way(tmp_path) -> None:
    """SIGKILL of the holder: the kernel drops the flock; its record is simply replaced."""
    run_dir = tmp_path / "run"
    code = "import sys, time; from launch.run_lock import acquire; acquire(sys.argv[1]); time.sleep(60)"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], cwd=Path(__file__).parents[2]
    )
    try:
        for _ in range(100):
            if (run_dir / LOCK_NAME).is_file() and (run_dir / LOCK_NAME).stat().st_size:
                break
            time.sleep(0.1)
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid} on host"):
            acquire(run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert f'"pid": {holder.pid}' in (run_dir / LOCK_NAME).read_text()  # the stale record
    release(acquire(run_dir))


# ---------------------------------------------------------------- one line


def test_a_data_loader_workers_refusal_is_its_original_line() -> None:
    wrapped = ShardError(
        "Caught ShardError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        'last):\n  File "x.py", line 1, in f\n    raise ShardError(m)\n'
        "pipeline.shards.ShardError: /s/a.tar: sha256 1234... differs\n"
    )
    assert one_line(wrapped) == "/s/a.tar: sha256 1234... differs"
    full = OSError(28, "No space left on device", "/r/metrics.jsonl")
    assert (
        one_line(full)
        == "/r/metrics.jsonl: writing failed: the disk is full (no space left on device)"
    )


def test_a_refusal_alone_prints_one_line_and_returns_2(capsys) -> None:
    assert exit_code(ShardError("/s/a.tar: bad"), ALONE) == EXIT_USAGE
    assert capsys.readouterr().err == "error: /s/a.tar: bad\n"
    assert exit_code(RuntimeError("a bug"), ALONE) is None  # re-raised by the caller
    assert exit_code(KeyboardInterrupt(), ALONE) is None


# ---------------------------------------------------------------- end to end


def _tamper(shards: Path, tmp_path: Path, split: str) -> Path:
    """A copy of the shard set whose `split` shard no longer hashes to its manifest's sha256
    (one digit of a JSON member changed: same size, still decodes)."""
    import shutil

    bad = tmp_path / "bad_shards"
    shutil.copytree(shards, bad)
    path = next((bad / split).glob("*.tar"))
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
    data = bytearray(path.read_bytes())
    i = data.index(b'"height": ', member.offset_data) + len(b'"height": ')
    data[i] = ord("7") if data[i] != ord("7") else ord("8")
    path.write_bytes(bytes(data))
    return bad


def _our_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


@pytest.mark.slow
def test_a_second_run_on_a_run_dir_is_refused_and_the_first_is_untouched(tmp_path) -> None:
    shards = scenes_shards(tmp_path)
    run_dir = tmp_path / "run"
    a = args(shards, run_dir, "schedule.iterations=12", "checkpoint.every=4", "eval.every=0")
    first = subprocess.Popen(
        python_cmd(a),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        p = probe(python_cmd(a), tmp_path)
        line = p.one_refusal()
        assert line.startswith(f"error: run dir {run_dir} is in use by pid {first.pid} on host ")
        assert p.seconds < 30 and p.peak_mb < 1024
        _, err = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in records] == list(range(1, 13))  # one writer


def _env() -> dict[str, str]:
    from tests.launch.train_utils import env

    return env()


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_shard_refused_while_training_is_one_line_from_one_rank(tmp_path, ranks) -> None:
    """After the process group started: the tampered shard is found when read (its sha256),
    every rank meets it, one prints it; no rank prints a traceback."""
    bad = _tamper(scenes_shards(tmp_path), tmp_path, "train")
    a = args(bad, tmp_path / "run", "schedule.iterations=20", "eval.every=0")
    cmd = python_cmd(a) if ranks == 1 else torchrun_cmd(a, 2)
    p = probe(cmd, tmp_path, timeout=180)
    errors = _our_lines(p.stderr)
    assert len(errors) == 1, p.stderr[-4000:]
    assert (
        "scenes-train-000000.tar: sha256 " in errors[0] and "differs from the manifest" in errors[0]
    )
    assert 'launch/train.py", line' not in p.stderr and "ShardError" not in p.stderr
    assert p.returncode == (2 if ranks == 1 else 1)  # torchrun's agent exits 1 for a failed worker
    assert p.peak_mb < 1024 and p.seconds < 60


@pytest.mark.slow
def test_a_shard_refused_in_evaluate_is_one_line(tmp_path) -> None:
    shards = scenes_shards(tmp_path)
    bad = _tamper(shards, tmp_path, "val")
    from cdgcnet.model import build_model
    from launch.config import load_config, to_dict
    from launch.export import save_exported

    cfg = load_config("scenes", ["model.depth=18", "model.channels=16", "model.aspp=false"])
    model_pt = tmp_path / "model.pt"
    save_exported(build_model(cfg.model).state_dict(), to_dict(cfg), model_pt)
    evaluate = str(Path(__file__).parents[2] / "launch" / "evaluate.py")
    p = probe([sys.executable, evaluate, "--checkpoint", str(model_pt), "--no-mlflow",
               "--no-progress", f"data.root={bad}"], tmp_path)  # fmt: skip
    line = p.one_refusal()
    assert "scenes-val-000000.tar: sha256 " in line


@pytest.mark.parametrize("kind", ["pickled", "wrong shape", "truncated", "1 TiB header"])
def test_unusable_pretrained_weights_are_one_line(tmp_path, kind) -> None:
    from cdgcnet.backbone import DilatedResNet

    shards = scenes_shards(tmp_path)
    state = DilatedResNet(18).state_dict()
    weights = tmp_path / ("w.safetensors" if kind == "1 TiB header" else "w.pth")
    if kind == "pickled":
        torch.save({**state, "x": WeightsPayload()}, weights)
    elif kind == "wrong shape":
        torch.save({**state, "conv1.weight": torch.zeros(7)}, weights)
    elif kind == "truncated":
        torch.save(state, weights)
        weights.write_bytes(weights.read_bytes()[:100_000])
    else:
        weights.write_bytes(struct.pack("<Q", 1 << 40) + b'{"a": 1}')
    a = args(shards, tmp_path / "run", "schedule.iterations=2", f"model.pretrained={weights}")
    p = probe(python_cmd(a), tmp_path)
    line = p.one_refusal()
    assert line.startswith(f"error: {weights}: ")
    assert "False" not in line and p.peak_mb < 1024 and p.seconds < 30
    assert not (tmp_path / "PWNED").exists()


class WeightsPayload:
    def __reduce__(self):
        return (open, ("PWNED", "w"))


@pytest.mark.slow
def test_a_full_disk_at_the_export_is_one_line_naming_the_path(tmp_path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    # The final checkpoint (133 MB) fits, the 45 MB model.pt after it does not.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=165m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root)")
    try:
        run_dir = mnt / "run"
        a = args(scenes_shards(tmp_path), run_dir, "schedule.iterations=2", "checkpoint.every=0",
                 "eval.every=0")  # fmt: skip
        p = probe(python_cmd(a), tmp_path, timeout=180)
        errors = _our_lines(p.stderr)
        assert errors == [
            f"error: {run_dir / 'model.pt'}: writing failed: the disk is full (no space left on "
            f"the device holding {run_dir}); free space and rerun"
        ], p.stderr[-3000:]
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert not list(run_dir.glob(".model.pt.tmp-*")) and not (run_dir / "model.pt").exists()
        assert (run_dir / "checkpoints" / "iter_00000002" / "COMPLETE").is_file()
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


RANKS = """
import os, sys
import torch.distributed as dist
from launch.distributed import init_process_group, world_from_env
from launch.refusal import exit_code
from pipeline.shards import ShardError

world = world_from_env()
init_process_group(world, "gloo")
try:
    if world.rank == 1:
        raise ShardError("/s/a.tar: met by rank 1 only")
    dist.barrier()  # rank 0 waits for a peer that has left
    dist.barrier()
    code = 0
except BaseException as e:
    code = exit_code(e, world)
    if code is None:
        raise
sys.stdout.flush()
os._exit(code)
"""


def test_a_refusal_one_rank_meets_is_said_once_and_the_others_exit_quietly(tmp_path) -> None:
    """Rank 1 meets the refusal alone and says it; rank 0, whose collective breaks when rank 1
    leaves, finds the refusal counted in the store and exits with status 2 without a word."""
    from tests.launch.train_utils import env, free_port

    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANKS],
            cwd=Path(__file__).parents[2],
            env=env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    err = "".join(o[1] for o in outs)
    assert codes == [2, 2], err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["error: /s/a.tar: met by rank 1 only"]
