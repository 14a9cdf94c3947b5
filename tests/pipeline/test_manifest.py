"""Manifest schema: atomic write, read back, and a named error for each kind of bad manifest."""

from __future__ import annotations

import copy
import json

import pytest

from pipeline.manifest import ManifestError, read_manifest, validate_manifest, write_manifest


def good_manifest() -> dict:
    return {
        "dataset": "voc",
        "split": "val",
        "packer_version": "pipeline.pack/1",
        "num_classes": 2,
        "ignore_index": 255,
        "class_names": ["background", "cat"],
        "palette": [[0, 0, 0], [64, 0, 0]],
        "label_map": {"0": 0, "1": 1},
        "num_samples": 3,
        "shards": [
            {"name": "voc-val-000000.tar", "num_samples": 2, "keys": ["a_1", "a_2"], "bytes": 10240,
             "sha256": "0" * 64},
            {"name": "voc-val-000001.tar", "num_samples": 1, "keys": ["b_1"], "bytes": 10240,
             "sha256": "f" * 64},
        ],
        "class_histogram": [10, 20],
        "ignore_pixels": 5,
        "skipped": [{"file": "/x/y.png", "reason": "label file is missing"}],
    }  # fmt: skip


def test_write_then_read_round_trip(tmp_path):
    m = good_manifest()
    path = write_manifest(tmp_path, m)
    assert path == tmp_path / "manifest.json"
    assert read_manifest(tmp_path) == m
    assert read_manifest(path) == m  # the file itself is accepted too
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary left


def _break(path_expr: str, value):
    m = good_manifest()
    target = m
    *parents, last = path_expr.split("/")
    for p in parents:
        target = target[int(p) if p.isdigit() else p]
    if value is KeyError:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return m


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("dataset", KeyError, "missing field 'dataset'"),
        ("num_classes", "2", "'num_classes' must be"),
        ("num_classes", True, "got bool"),
        ("class_names", ["background"], "class_names must be 2 strings"),
        ("palette", [[0, 0, 0], [300, 0, 0]], "palette must be 2"),
        ("label_map", {"0": 7}, "maps 0 to 7"),
        ("num_samples", 4, "num_samples is 4 but the shards hold 3"),
        ("shards/0/keys", ["a_1"], "num_samples is 2 but 1 keys"),
        ("shards/0/keys", ["a.1", "a_2"], "without '.'"),
        ("shards/1/keys", ["a_1"], "'a_1' appears more than once"),
        ("shards/1/name", "voc-val-000000.tar", "unique file name"),
        ("shards/0/sha256", "abc", "sha256 is not 64"),
        ("shards/0/bytes", 0, "bytes must be positive"),
        ("class_histogram", [1], "class_histogram must be 2"),
        ("ignore_index", 1, "ignore_index 1 must be"),
        ("skipped/0/reason", KeyError, "missing field skipped[0].'reason'"),
    ],
)
def test_validation_names_the_problem(tmp_path, where, value, message):
    m = _break(where, value)
    with pytest.raises(ManifestError, match=r"manifest\.json: .*") as e:
        validate_manifest(m, tmp_path / "manifest.json")
    assert message in str(e.value)
    # write_manifest refuses to write it
    with pytest.raises(ManifestError):
        write_manifest(tmp_path, copy.deepcopy(m))
    assert not (tmp_path / "manifest.json").exists()


def test_missing_and_unparsable_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"dataset": ')
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ManifestError, match="top level must be a JSON object"):
        read_manifest(tmp_path)


def test_rewrite_replaces_atomically(tmp_path):
    write_manifest(tmp_path, good_manifest())
    m = good_manifest()
    m["skipped"] = []
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path)["skipped"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
