"""verify: a sound shard set passes; a flipped byte, a missing, truncated, extra or re-keyed
shard fails naming the shard; a missing manifest is its own error."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from pipeline.datasets import DATASETS
from pipeline.pack import pack_split, sha256_file
from pipeline.verify import main, verify_split

from .packdata import write_cityscapes


@pytest.fixture
def packed(tmp_path):
    write_cityscapes(tmp_path / "src", "train", n=5)
    write_cityscapes(tmp_path / "src", "val", n=2, seed=1)
    for split in ("train", "val"):
        pack_split(DATASETS["cityscapes"], tmp_path / "src", tmp_path / "shards", split,
                   max_count=2, progress=False)  # fmt: skip
    return tmp_path / "shards"


def test_sound_shards_pass(packed, capsys):
    assert main([str(packed), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "train: 3 shards, 5 samples verified: ok" in out
    assert "val: 1 shards, 2 samples verified: ok" in out
    assert main([str(packed / "val")]) == 0  # a split folder works too


def test_flipped_byte_fails_naming_the_shard(packed, capsys):
    shard = packed / "train/cityscapes-train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main([str(packed)]) == 1
    err = capsys.readouterr().err
    assert f"BAD {shard}: sha256 differs from the manifest" in err
    assert err.count("BAD ") == 1  # the other shards are fine


def test_missing_truncated_and_extra_shards(packed, capsys):
    split = packed / "train"
    (split / "cityscapes-train-000000.tar").unlink()
    t = split / "cityscapes-train-000002.tar"
    t.write_bytes(t.read_bytes()[:1000])
    (split / "cityscapes-train-000009.tar").write_bytes(b"x" * 512)
    report = verify_split(split)
    assert not report.ok
    problems = "\n".join(report.problems)
    assert "cityscapes-train-000000.tar: shard file missing" in problems
    assert "cityscapes-train-000002.tar: 1000 bytes, manifest says" in problems
    assert "cityscapes-train-000009.tar: shard not listed in manifest.json" in problems
    assert main([str(packed)]) == 1


def test_keys_that_differ_from_the_manifest_fail(packed):
    """A shard rewritten with other keys but a matching manifest hash is still caught."""
    split = packed / "val"
    m = json.loads((split / "manifest.json").read_text())
    shard = split / m["shards"][0]["name"]
    buf = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith(".json"):
                continue  # drop the metadata of every sample
            dst.addfile(member, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    m["shards"][0].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    (split / "manifest.json").write_text(json.dumps(m))
    report = verify_split(split)
    assert any("expected image + label.png + json" in p for p in report.problems)


def test_missing_manifest_is_exit_2(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    assert main([str(tmp_path)]) == 2
    assert "no <split>/manifest.json found" in capsys.readouterr().err
    (tmp_path / "train/manifest.json").write_text("{}")
    assert main([str(tmp_path)]) == 2
    assert "missing field 'dataset'" in capsys.readouterr().err
