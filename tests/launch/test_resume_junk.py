"""Resume survives junk a person or a crash leaves in a run directory: entries in checkpoints/
that no save wrote (ignored with one warning, never removed), a torn last line in
metrics.jsonl (dropped with a warning), a COMPLETE marker that is not what a save writes
(the checkpoint counts as damaged), a binary `latest` file; keep-last-k counts only intact
checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from launch.checkpoint import MARKER, CheckpointError, list_complete, read_info
from launch.checkpoint_layout import parse_tag
from launch.export import load_checkpoint
from tests.launch.test_checkpoint_trust import (
    OPTIM_STATES,
    FakeEngine,
    _copy,
    _train_args,
    saved,
    trained,  # noqa: F401 (the module fixture: one real 2-iteration run)
)
from tests.launch.train_utils import python_cmd, run


def _iterations(root: Path) -> list[int]:
    return sorted(parse_tag(d.name) for d in root.iterdir() if parse_tag(d.name) is not None)


def test_tag_names() -> None:
    assert parse_tag("iter_00000100") == 100
    for name in ("iter_backup", "iter_", "iter_12a", "universal", "iter_-1", "xiter_1"):
        assert parse_tag(name) is None


def test_unknown_entries_are_ignored_with_one_warning(tmp_path, capsys) -> None:
    mgr = saved(tmp_path, (10, 20), keep=2)
    (mgr.root / "iter_backup").mkdir()
    (mgr.root / "iter_backup" / MARKER).write_text('{"iteration": 99}')
    (mgr.root / "notes.txt").write_text("mine")
    assert mgr.resolve("auto").iteration == 20
    mgr.save(FakeEngine(), 30, {"iteration": 30}, {"world_size": 1})
    mgr.save(FakeEngine(), 40, {"iteration": 40}, {"world_size": 1})
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert f"ignoring 2 entries in {mgr.root} that no checkpoint save wrote" in err
    assert "iter_backup, notes.txt" in err
    assert (mgr.root / "iter_backup" / MARKER).is_file() and (mgr.root / "notes.txt").is_file()
    assert _iterations(mgr.root) == [30, 40]


@pytest.mark.parametrize(
    "meta, reason",
    [
        ({"iteration": 20, "world_size": "two"}, "world_size must be an integer >= 1, got 'two'"),
        ({"iteration": "20", "world_size": 1}, "iteration must be an integer"),
        ({"iteration": 20, "world_size": 1, "files": ["a"]}, "its files are not a mapping"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_a_malformed_marker_is_damage(tmp_path, capsys, meta, reason) -> None:
    mgr = saved(tmp_path, (10, 20))
    (mgr.root / "iter_00000020" / MARKER).write_text(json.dumps(meta))
    assert mgr.resolve("auto").iteration == 10
    assert f"iter_00000020/{MARKER}: unreadable marker ({reason}" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="unreadable marker"):
        read_info(mgr.root / "iter_00000020")


def test_keep_last_k_counts_only_intact_checkpoints(tmp_path, capsys) -> None:
    mgr = saved(tmp_path, (10, 20, 30), keep=2)
    bad = mgr.root / "iter_00000030" / OPTIM_STATES
    bad.write_bytes(bad.read_bytes()[:50])  # the newest is damaged
    assert mgr.resolve("auto").iteration == 20  # the fallback
    mgr.save(FakeEngine(), 25, {"iteration": 25}, {"world_size": 1})
    # Intact: 20 and 25 kept (10 pruned); the damaged 30 is neither counted nor removed.
    assert _iterations(mgr.root) == [20, 25, 30]
    again = saved(tmp_path, (26,), keep=2)  # a new process: the size check finds 30 damaged
    assert again.root == mgr.root
    assert _iterations(mgr.root) == [25, 26, 30]
    assert [c.iteration for c in list_complete(mgr.root)] == [25, 26, 30]


def test_a_torn_last_jsonl_line_is_dropped_with_a_warning(tmp_path, capsys) -> None:
    from launch.config import load_config
    from launch.distributed import WorldInfo
    from launch.train_log import TrainLog, read_jsonl

    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"iteration": i, "loss": {"total": 1.0}}) for i in (1, 2, 3)]
    log.write_text("\n".join(lines) + '\n{"iteration": 4, "lo')
    assert [r["iteration"] for r in read_jsonl(log)[0]] == [1, 2, 3] and read_jsonl(log)[1] == [4]
    cfg = load_config("scenes", ["logging.enabled=false", f"runtime.run_dir={tmp_path}"])
    TrainLog(cfg, WorldInfo(0, 0, 1, 1, 1, False), tmp_path)._trim_jsonl(2)
    assert log.read_text() == "".join(ln + "\n" for ln in lines[:2])
    err = capsys.readouterr().err
    assert f"warning: {log}: dropped 1 unreadable line(s) (line 4: a write cut short" in err


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary\x00", b"../../etc", b"x" * 300, b""])
def test_a_latest_file_that_names_no_tag_is_one_error(tmp_path, content) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "latest").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{folder / 'latest'}: does not name a checkpoint"):
        load_checkpoint(folder)


@pytest.mark.slow
def test_train_resumes_past_junk_in_the_run_dir(trained, tmp_path) -> None:  # noqa: F811
    """A real run dir with a stray iter_backup/ (a copy of a checkpoint), a torn last line in
    metrics.jsonl and a newest COMPLETE with world_size "two": the rerun warns, resumes from
    iteration 1 and finishes; iter_backup/ is untouched."""
    shards, src = trained
    run_dir = _copy(src, tmp_path)
    ckpts = run_dir / "checkpoints"
    shutil.copytree(ckpts / "iter_00000001", ckpts / "iter_backup")
    marker = ckpts / "iter_00000002" / MARKER
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "world_size": "two"}))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "lr"')
    proc = run(python_cmd(_train_args(shards, run_dir, "schedule.iterations=3")), tmp_path)
    assert "ignoring 1 entry" in proc.stderr and "iter_backup" in proc.stderr
    assert "world_size must be an integer >= 1, got 'two'" in proc.stderr
    assert "dropped 1 unreadable line(s)" in proc.stderr
    assert "resumed from" in proc.stdout and "iter_00000001 at iteration 1" in proc.stdout
    assert (ckpts / "iter_backup" / MARKER).is_file()
    assert [c.iteration for c in list_complete(ckpts)] == [1, 2, 3]
