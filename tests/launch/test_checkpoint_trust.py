"""No code runs from a checkpoint file, and a damaged checkpoint never blocks resume.

A planted pickle whose __reduce__ would create a marker file is refused, with the file named, in
every file of a checkpoint and in every entry point (evaluate, predict, train --resume DIR and
--resume auto) and the world-size conversion; the marker file never appears. The COMPLETE marker
records each file's size and sha256: a truncated or altered file is named in a warning and
resume falls back to the newest intact checkpoint. A full disk during a save is one clear error,
the partial checkpoint is removed and a rerun resumes once space is freed.
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.checkpoint import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    UnsafeCheckpointError,
    file_record,
    list_complete,
    load_engine,
    read_info,
    safe_load,
    to_universal,
    verify,
)
from tests.launch.train_utils import REPO, args, env, python_cmd, run, scenes_shards

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class Payload:
    """Unpickling this creates `marker` (open(marker, "w")): the stand-in for any command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(file: Path, marker: Path, raw: int | None = None) -> None:
    """Replace a checkpoint file with a payload and, like a careful attacker, update the size and
    sha256 recorded in the tag's COMPLETE marker, so only the content check can catch it."""
    file.parent.mkdir(parents=True, exist_ok=True)
    if raw:
        file.write_bytes(pickle.dumps({"module": Payload(marker)}, protocol=raw))
    else:
        torch.save({"module": Payload(marker), "iteration": 1}, file)
    tag_dir = next(p for p in [file.parent, *file.parents] if (p / MARKER).is_file())
    meta = json.loads((tag_dir / MARKER).read_text())
    if "files" in meta:
        meta["files"][file.relative_to(tag_dir).as_posix()] = file_record(file)
        (tag_dir / MARKER).write_text(json.dumps(meta))


class FakeEngine:
    """Writes files named like DeepSpeed's (model states, optimizer partitions) plus a nested one
    like the universal form's, each a real torch.save of tensors and plain values."""

    def __init__(self, fail: OSError | None = None):
        self.module = torch.nn.Linear(2, 2)
        self.fail = fail

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        (d / "zero" / "w").mkdir(parents=True)
        torch.save({"module": self.module.state_dict(), **client_state}, d / MODEL_STATES)
        if self.fail is not None:
            (d / OPTIM_STATES).write_bytes(b"PK\x03\x04 half written")
            raise self.fail
        torch.save({"optimizer_state_dict": {"step": 3}}, d / OPTIM_STATES)
        torch.save(torch.zeros(4), d / "zero" / "w" / "fp32.pt")


def saved(tmp_path: Path, iterations=(10, 20), keep: int = 3) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path, keep=keep)
    for it in iterations:
        mgr.save(FakeEngine(), it, {"iteration": it}, {"world_size": 1})
    return mgr


# ---------------------------------------------------------------- the marker and verification


def test_marker_records_size_and_sha256_of_every_file(tmp_path) -> None:
    import hashlib

    mgr = saved(tmp_path, (10,))
    tag = mgr.root / "iter_00000010"
    files = json.loads((tag / MARKER).read_text())["files"]
    assert sorted(files) == [MODEL_STATES, "zero/w/fp32.pt", OPTIM_STATES]
    for name, rec in files.items():
        data = (tag / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    verify(tag, read_info(tag).meta)


@pytest.mark.parametrize(
    "name", [MODEL_STATES, OPTIM_STATES, "zero/w/fp32.pt", "extra_optim_states.pt"]
)
def test_payload_in_any_file_is_refused_and_never_run(tmp_path, name) -> None:
    mgr = saved(tmp_path)
    marker = tmp_path / "PWNED"
    bad = mgr.root / "iter_00000020" / name
    plant(bad, marker)
    tag = mgr.root / "iter_00000020"
    with pytest.raises(UnsafeCheckpointError, match=rf"{bad}: refused: it pickles \S*open"):
        verify(tag, read_info(tag).meta)
    # --resume auto does not quietly fall back past a planted file: it stops and names it.
    with pytest.raises(UnsafeCheckpointError, match=str(bad)):
        mgr.resolve("auto")
    with pytest.raises(UnsafeCheckpointError, match=str(bad)):
        mgr.resolve(str(mgr.root / "iter_00000020"))
    assert mgr.resolve(str(mgr.root / "iter_00000010")).iteration == 10
    assert not marker.exists()


def test_deepspeed_loads_run_weights_only_even_past_the_check(tmp_path) -> None:
    """A file swapped in after verification is still never unpickled with code execution."""
    mgr = saved(tmp_path, (10,))
    tag = mgr.root / "iter_00000010"
    marker = tmp_path / "PWNED"

    class Engine:  # what DeepSpeed's load_checkpoint does: torch.load(weights_only=False)
        def load_checkpoint(self, load_dir, tag):
            return None, torch.load(Path(load_dir) / tag / MODEL_STATES, weights_only=False)

    _, client = load_engine(Engine(), tag.parent, tag.name)
    assert client["iteration"] == 10
    plant(tag / MODEL_STATES, marker)
    with pytest.raises(pickle.UnpicklingError, match="GLOBAL"):
        load_engine(Engine(), tag.parent, tag.name)
    assert torch.load is torch.serialization.load  # restored afterwards
    assert not marker.exists()


def test_world_size_conversion_checks_before_converting(tmp_path) -> None:
    mgr = saved(tmp_path, (10,))
    marker = tmp_path / "PWNED"
    info = read_info(mgr.root / "iter_00000010")
    plant(info.path / OPTIM_STATES, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"{info.path / OPTIM_STATES}: refused"):
        to_universal(info)
    assert not marker.exists() and not (mgr.root / "universal" / info.tag).exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_legacy_pickle_payload_and_links_are_refused(tmp_path) -> None:
    mgr = saved(tmp_path)
    marker = tmp_path / "PWNED"
    tag = mgr.root / "iter_00000020"
    plant(tag / OPTIM_STATES, marker, raw=2)  # a plain pickle, not torch's zip format
    with pytest.raises(UnsafeCheckpointError, match=rf"{tag / OPTIM_STATES}: refused"):
        verify(tag, read_info(tag).meta)
    plant(tag / OPTIM_STATES, marker, raw=5)  # opcodes torch's safe unpickler does not parse
    with pytest.raises(CheckpointError, match=rf"{tag / OPTIM_STATES}: unreadable"):
        verify(tag, read_info(tag).meta)
    (tag / OPTIM_STATES).unlink()
    (tag / OPTIM_STATES).symlink_to(mgr.root / "iter_00000010" / OPTIM_STATES)
    with pytest.raises(UnsafeCheckpointError, match="not a regular file"):
        verify(tag, read_info(tag).meta)
    assert not marker.exists()


def test_truncated_file_falls_back_to_newest_intact_with_a_warning(tmp_path, capsys) -> None:
    mgr = saved(tmp_path, (10, 20, 30))
    bad = mgr.root / "iter_00000030" / OPTIM_STATES
    bad.write_bytes(bad.read_bytes()[:50])
    info = mgr.resolve("auto")
    assert info.iteration == 20
    err = capsys.readouterr().err
    assert f"{bad}: damaged: 50 bytes" in err and "newest intact checkpoint" in err
    with pytest.raises(CheckpointError, match=rf"{bad}: damaged"):
        mgr.resolve(str(mgr.root / "iter_00000030"))
    assert mgr.resolve(str(mgr.root)).iteration == 20  # a checkpoints/ root falls back too


def test_altered_missing_and_extra_files_are_damage(tmp_path, capsys) -> None:
    mgr = saved(tmp_path, (10,))
    tag = mgr.root / "iter_00000010"
    meta = read_info(tag).meta
    f = tag / "zero" / "w" / "fp32.pt"
    data = bytearray(f.read_bytes())
    torch.save(torch.ones(4), f)  # same size, other bytes
    assert f.stat().st_size == len(data)
    with pytest.raises(CheckpointError, match=rf"{f}: damaged: its sha256 differs"):
        verify(tag, meta)
    f.unlink()
    with pytest.raises(CheckpointError, match=rf"{f}: missing"):
        verify(tag, meta)
    f.write_bytes(data)
    torch.save(torch.ones(2), tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"rank_1_mp_rank_00_optim_states\.pt: not written"):
        verify(tag, meta)


def test_every_checkpoint_damaged_is_one_error_naming_them(tmp_path, capsys) -> None:
    mgr = saved(tmp_path, (10, 20))
    for it in (10, 20):
        (mgr.root / f"iter_{it:08d}" / MODEL_STATES).write_bytes(b"")
    (mgr.root / "iter_00000030").mkdir()
    (mgr.root / "iter_00000030" / MARKER).write_text("{trunc")  # a damaged marker is skipped
    with pytest.raises(
        CheckpointError, match=r"no intact checkpoint .*iter_00000020.*iter_00000010"
    ):
        mgr.resolve("auto")
    assert "iter_00000030/COMPLETE: unreadable marker" in capsys.readouterr().err


# ---------------------------------------------------------------- saving: keep-last-k, full disk


def test_keep_last_k_keeps_the_intact_one_until_a_newer_one_verifies(tmp_path) -> None:
    mgr = saved(tmp_path, (10,), keep=1)
    broken = FakeEngine()
    broken.save_checkpoint = lambda root, tag, **kw: (
        (Path(root) / tag).mkdir(),
        (Path(root) / tag / MODEL_STATES).write_bytes(b"PK\x03\x04 not a whole zip"),
    )
    with pytest.raises(CheckpointError, match=rf"iter_00000020.*{MODEL_STATES}: unreadable"):
        mgr.save(broken, 20, {}, {"world_size": 1})
    assert [c.iteration for c in list_complete(mgr.root)] == [10]
    assert not (mgr.root / "iter_00000020").exists()
    mgr.save(FakeEngine(), 30, {}, {"world_size": 1})
    assert [c.iteration for c in list_complete(mgr.root)] == [30]


def test_full_disk_during_save_is_one_clear_error_and_leaves_nothing(tmp_path) -> None:
    mgr = saved(tmp_path, (10,))
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(CheckpointError) as e:
        mgr.save(FakeEngine(fail=full), 20, {}, {"world_size": 1})
    msg = str(e.value)
    assert "disk is full" in msg and str(mgr.root / "iter_00000020") in msg
    assert "iter_00000010 is intact" in msg and "rerun the same command" in msg
    assert not (mgr.root / "iter_00000020").exists()
    assert mgr.resolve("auto").iteration == 10


# ---------------------------------------------------------------- real DeepSpeed checkpoints
# (slow: one 2-iteration training run for the module, then a subprocess or a conversion each)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(shards, run dir): a ZeRO-2 run of 2 iterations with checkpoints iter_1 and iter_2."""
    base = tmp_path_factory.getbasetemp()
    shards = scenes_shards(base)
    run_dir = base / "trust_run"
    if not (run_dir / "model.pt").is_file():
        run(python_cmd(_train_args(shards, run_dir, "schedule.iterations=2")), base)
    return shards, run_dir


def _train_args(shards: Path, run_dir: Path, *more: str) -> list[str]:
    common = ("checkpoint.every=1", "checkpoint.keep=3", "eval.every=0", "runtime.zero_stage=2")
    return args(shards, run_dir, *common, *more)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("universal"))
    return dst


@pytest.mark.slow
def test_real_checkpoint_files_load_with_the_allow_list(trained) -> None:
    _, run_dir = trained
    tag = run_dir / "checkpoints" / "iter_00000002"
    meta = read_info(tag).meta
    assert sorted(meta["files"]) == [MODEL_STATES, OPTIM_STATES]
    verify(tag, meta)
    sd = safe_load(tag / OPTIM_STATES)
    assert "optimizer_state_dict" in sd
    with pytest.raises(Exception, match="Unsupported global"):  # needs the allow-list
        torch.load(tag / OPTIM_STATES, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", [MODEL_STATES, OPTIM_STATES])
def test_zero_to_fp32_loading_refuses_a_payload(trained, tmp_path, name) -> None:
    from launch.export import CheckpointError as ExportError
    from launch.export import load_checkpoint

    run_dir = _copy(trained[1], tmp_path)
    marker = tmp_path / "PWNED"
    bad = run_dir / "checkpoints" / "iter_00000002" / name
    plant(bad, marker)
    for target in (run_dir, run_dir / "checkpoints", bad.parent):
        with pytest.raises(ExportError, match=rf"{bad}: refused"):
            load_checkpoint(target)
    assert not marker.exists()


@pytest.mark.slow
def test_evaluate_and_predict_refuse_a_payload(trained, tmp_path) -> None:
    run_dir = _copy(trained[1], tmp_path)
    marker = tmp_path / "PWNED"
    bad = run_dir / "checkpoints" / "iter_00000002" / MODEL_STATES
    plant(bad, marker)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"")  # found, never read: the checkpoint is refused first
    evaluate = [sys.executable, str(REPO / "launch" / "evaluate.py"), "--checkpoint", str(run_dir)]
    predict = [
        sys.executable,
        str(REPO / "launch" / "predict.py"),
        "--checkpoint",
        str(bad.parent),
        "--images",
        str(images),
        "--out",
        str(tmp_path / "pred"),
    ]
    for cmd in (evaluate, predict):
        proc = run(cmd, tmp_path, check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"{bad}: refused" in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("resume", ["auto", "DIR"])
def test_train_resume_refuses_a_payload(trained, tmp_path, resume) -> None:
    shards, src = trained
    run_dir = _copy(src, tmp_path)
    marker = tmp_path / "PWNED"
    tag = run_dir / "checkpoints" / "iter_00000002"
    plant(tag / MODEL_STATES, marker)
    cmd = python_cmd(_train_args(shards, run_dir, "schedule.iterations=3"))
    cmd += ["--resume", "auto" if resume == "auto" else str(tag)]
    proc = run(cmd, tmp_path, check=False, timeout=120)
    assert proc.returncode != 0
    assert f"{tag / MODEL_STATES}: refused" in proc.stderr
    assert not marker.exists()
    assert not (run_dir / "checkpoints" / "iter_00000003").exists()


@pytest.mark.slow
def test_train_resume_auto_falls_back_past_a_truncated_file(trained, tmp_path) -> None:
    shards, src = trained
    run_dir = _copy(src, tmp_path)
    bad = run_dir / "checkpoints" / "iter_00000002" / OPTIM_STATES
    bad.write_bytes(bad.read_bytes()[:1000])
    (run_dir / "model.pt").unlink()  # killed before its export: unfinished, so it resumes
    cmd = python_cmd(_train_args(shards, run_dir, "schedule.iterations=2"))
    proc = run(cmd, tmp_path, timeout=180)
    assert f"{bad}: damaged: 1000 bytes" in proc.stderr
    assert "resumed from" in proc.stdout and "iter_00000001 at iteration 1" in proc.stdout
    verify(bad.parent, read_info(bad.parent).meta)  # saved again, whole


@pytest.mark.slow
def test_world_size_conversion_refuses_payloads(trained, tmp_path) -> None:
    _, src = trained
    run_dir = _copy(src, tmp_path)
    marker = tmp_path / "PWNED"
    info = read_info(run_dir / "checkpoints" / "iter_00000001")
    plant(info.path / OPTIM_STATES, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"{info.path / OPTIM_STATES}: refused"):
        to_universal(read_info(info.path))
    assert not (run_dir / "checkpoints" / "universal" / info.tag).exists()

    good = read_info(run_dir / "checkpoints" / "iter_00000002")
    uni = to_universal(good) / good.tag
    meta = read_info(uni).meta
    assert "zero/optimizer_state.pt" in meta["files"] and len(meta["files"]) > 10
    param_file = next(f for f in sorted(meta["files"]) if f.endswith("fp32.pt"))
    plant(uni / param_file, marker)  # a planted file in the reused universal form
    with pytest.raises(UnsafeCheckpointError, match=rf"{uni / param_file}: refused"):
        to_universal(good)
    assert not marker.exists()


@pytest.mark.slow
def test_full_disk_during_save_then_resume_after_space_is_freed(trained, tmp_path) -> None:
    shards, _ = trained
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mnt)])
    if proc.returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted here (needs root)")
    try:
        ballast = mnt / "ballast"
        ballast.write_bytes(b"\0" * (100 << 20))  # the first save (139 MB) fits, the second not
        run_dir = mnt / "run"
        cmd = python_cmd(_train_args(shards, run_dir, "schedule.iterations=2", "checkpoint.keep=1"))
        proc = run(cmd, tmp_path, check=False, timeout=180)
        assert proc.returncode != 0
        tag2 = run_dir / "checkpoints" / "iter_00000002"
        assert f"{tag2}: saving iteration 2 failed: the disk is full" in proc.stderr
        assert "iter_00000001 is intact" in proc.stderr
        assert not tag2.exists() and not list(run_dir.rglob("*.tmp"))
        tag1 = run_dir / "checkpoints" / "iter_00000001"
        verify(tag1, read_info(tag1).meta)

        ballast.unlink()
        proc = run(cmd, tmp_path, timeout=180)
        assert "resumed from" in proc.stdout and "at iteration 1" in proc.stdout
        assert [c.iteration for c in list_complete(run_dir / "checkpoints")] == [2]
        assert (run_dir / "model.pt").is_file()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], env=env())
