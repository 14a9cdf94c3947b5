"""pipeline.atomic: whole files or none, no temporaries left, normal permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from pipeline.atomic import atomic_path, write_atomic, write_json_atomic


def test_write_replaces_whole_and_leaves_no_temporaries(tmp_path) -> None:
    target = tmp_path / "sub" / "a.json"
    write_json_atomic(target, {"x": [1, 2]})
    assert json.loads(target.read_text()) == {"x": [1, 2]} and target.read_text().endswith("}\n")
    write_atomic(target, "replaced")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert target.read_text() == "replaced" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "b.bin", "sub"]


def test_a_failed_write_keeps_the_old_file(tmp_path) -> None:
    target = tmp_path / "model.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_permissions_follow_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "out.png", b"png")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.png").stat().st_mode) == 0o644  # not mkstemp's 0600
