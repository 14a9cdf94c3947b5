"""The per-split shard manifest: schema, atomic writing, reading with validation.

A split directory ``shards/<dataset>/<split>/`` holds the shards and one ``manifest.json``:

    {"dataset", "split", "packer_version", "num_classes", "ignore_index", "class_names",
     "palette", "label_map", "num_samples",
     "shards": [{"name", "num_samples", "keys", "bytes", "sha256"}],
     "class_histogram", "ignore_pixels", "skipped": [{"file", "reason"}]}
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cdgcnet.labels import LABEL_SPECS, LabelSpec

from .atomic import write_json_atomic

MANIFEST_NAME = "manifest.json"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or does not follow the schema."""


def manifest_path(split_dir: str | os.PathLike) -> Path:
    """``split_dir/manifest.json`` (a path to the manifest file itself is accepted too)."""
    p = Path(split_dir)
    return p if p.name == MANIFEST_NAME else p / MANIFEST_NAME


def _fail(path: Path, reason: str) -> None:
    raise ManifestError(f"{path}: {reason}")


def _check_type(path: Path, d: dict, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        _fail(path, f"missing field {where}{key!r}")
    value = d[key]
    # bool is an int subclass; a count given as true/false is still wrong.
    if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        _fail(path, f"field {where}{key!r} must be {typ}, got bool")
    if not isinstance(value, typ):
        _fail(path, f"field {where}{key!r} must be {typ}, got {type(value).__name__}")
    return value


def validate_manifest(m: Any, path: str | os.PathLike = MANIFEST_NAME) -> dict:
    """Check ``m`` against the schema and its internal consistency; return it.

    Raises ManifestError naming ``path`` and the first problem found.
    """
    path = Path(path)
    if not isinstance(m, dict):
        _fail(path, f"top level must be a JSON object, got {type(m).__name__}")
    for key in ("dataset", "split", "packer_version"):
        if not _check_type(path, m, key, str, ""):
            _fail(path, f"field {key!r} is empty")
    num_classes = _check_type(path, m, "num_classes", int, "")
    if num_classes <= 0:
        _fail(path, f"num_classes must be positive, got {num_classes}")
    ignore = _check_type(path, m, "ignore_index", int, "")
    if not 0 <= ignore <= 255 or ignore < num_classes:
        _fail(path, f"ignore_index {ignore} must be in [num_classes, 255]")
    names = _check_type(path, m, "class_names", list, "")
    if len(names) != num_classes or not all(isinstance(n, str) for n in names):
        _fail(path, f"class_names must be {num_classes} strings, got {len(names)} entries")
    palette = _check_type(path, m, "palette", list, "")
    if len(palette) != num_classes or not all(
        isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
        for c in palette
    ):
        _fail(path, f"palette must be {num_classes} [r, g, b] triples of 0..255")
    label_map = _check_type(path, m, "label_map", dict, "")
    for src, dst in label_map.items():
        if not src.lstrip("-").isdigit() or not isinstance(dst, int):
            _fail(path, f"label_map entry {src!r}: {dst!r} is not '<int>': int")
        if not (0 <= dst < num_classes or dst == ignore):
            _fail(path, f"label_map maps {src} to {dst}, outside [0, {num_classes}) and ignore")
    num_samples = _check_type(path, m, "num_samples", int, "")
    shards = _check_type(path, m, "shards", list, "")
    total = 0
    seen_names: set[str] = set()
    seen_keys: set[str] = set()
    for i, s in enumerate(shards):
        where = f"shards[{i}]."
        if not isinstance(s, dict):
            _fail(path, f"shards[{i}] must be an object")
        name = _check_type(path, s, "name", str, where)
        if "/" in name or not name.endswith(".tar") or name in seen_names:
            _fail(path, f"{where}name {name!r} must be a unique file name ending in .tar")
        seen_names.add(name)
        n = _check_type(path, s, "num_samples", int, where)
        keys = _check_type(path, s, "keys", list, where)
        if len(keys) != n:
            _fail(path, f"{where}num_samples is {n} but {len(keys)} keys are listed")
        for k in keys:
            if not isinstance(k, str) or not k or "." in k or "/" in k:
                _fail(path, f"{where}keys holds {k!r}: keys must be non-empty, without '.' or '/'")
            if k in seen_keys:
                _fail(path, f"key {k!r} appears more than once")
            seen_keys.add(k)
        if _check_type(path, s, "bytes", int, where) <= 0:
            _fail(path, f"{where}bytes must be positive")
        if not _SHA256.match(_check_type(path, s, "sha256", str, where)):
            _fail(path, f"{where}sha256 is not 64 lowercase hex digits")
        total += n
    if total != num_samples:
        _fail(path, f"num_samples is {num_samples} but the shards hold {total}")
    hist = _check_type(path, m, "class_histogram", list, "")
    if len(hist) != num_classes or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hist
    ):
        _fail(path, f"class_histogram must be {num_classes} non-negative ints")
    if _check_type(path, m, "ignore_pixels", int, "") < 0:
        _fail(path, "ignore_pixels must be non-negative")
    skipped = _check_type(path, m, "skipped", list, "")
    for i, s in enumerate(skipped):
        if not isinstance(s, dict):
            _fail(path, f"skipped[{i}] must be an object")
        _check_type(path, s, "file", str, f"skipped[{i}].")
        _check_type(path, s, "reason", str, f"skipped[{i}].")
    return m


def read_manifest(split_dir: str | os.PathLike) -> dict:
    """Read and validate ``split_dir/manifest.json``; errors name the file and the reason."""
    path = manifest_path(split_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest (was the split packed completely?)") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from None
    return validate_manifest(m, path)


def write_manifest(split_dir: str | os.PathLike, manifest: dict) -> Path:
    """Validate and atomically write ``split_dir/manifest.json``; return its path."""
    path = manifest_path(split_dir)
    validate_manifest(manifest, path)
    write_json_atomic(path, manifest)
    return path


class DatasetMismatch(ManifestError):
    """Shards packed for one dataset (or label table) given to a run configured for another."""


def check_dataset(
    root: str | os.PathLike, splits: Sequence[str], dataset: str, num_classes: int
) -> LabelSpec:
    """Refuse shards that are not `dataset`'s, or a class count that is not its; the labels.

    For each split of the shard set `root`, compares the manifest's dataset name, class count,
    class names and label map with the dataset's label table (cdgcnet.labels), and `num_classes`
    (the model's) with its class count. The error is one line naming both sides.
    """
    if dataset not in LABEL_SPECS:
        raise DatasetMismatch(f"unknown dataset {dataset!r}; known: {sorted(LABEL_SPECS)}")
    spec = LABEL_SPECS[dataset]
    if num_classes != spec.num_classes:
        raise DatasetMismatch(
            f"model.num_classes={num_classes} but dataset {dataset!r} has {spec.num_classes} classes"
        )
    for split in splits:
        _check_manifest_labels(manifest_path(Path(root) / split), dataset, spec)
    return spec


def _check_manifest_labels(path: Path, dataset: str, spec: LabelSpec) -> None:
    m = read_manifest(path)
    label_map = {str(k): v for k, v in sorted(spec.label_map.items())}
    differs = [
        what
        for what, ok in (
            ("dataset", m["dataset"] == dataset),
            ("class count", m["num_classes"] == spec.num_classes),
            ("class names", m["class_names"] == list(spec.class_names)),
            ("label map", m["label_map"] == label_map),
            ("ignore index", m["ignore_index"] == spec.ignore_index),
        )
        if not ok
    ]
    if differs:
        raise DatasetMismatch(
            f"{path}: shards of dataset {m['dataset']!r} ({m['num_classes']} classes), but the "
            f"config trains {dataset!r} ({spec.num_classes} classes): {', '.join(differs)} differ"
        )
