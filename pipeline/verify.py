"""Check packed shards against their manifests.

    python -m pipeline.verify shards/<name> [--decode]

For every split folder (one holding manifest.json; the path may also be a split folder itself):
re-hash each shard and compare size and sha256 with the manifest, read it as a tar and check that
it holds exactly the manifest's keys, in order, each with an image, a label and JSON metadata.
Every member's size and every image's header are checked against the sample limits
(pipeline.shards.Limits; --max-pixels, --max-member-bytes). With --decode also decode every label
and check its values (train ids or ignore).
Exits 1 naming each bad shard, 2 when a manifest itself is missing or invalid, 0 when all is well.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from . import shards
from .manifest import MANIFEST_NAME, ManifestError, read_manifest
from .pack import sha256_file
from .shards import DEFAULT_LIMITS, LABEL_FIELD, META_FIELD, Limits, ShardError, add_limit_args


@dataclass
class SplitReport:
    split_dir: Path
    num_shards: int = 0
    num_samples: int = 0
    problems: list[str] = field(default_factory=list)  # "shard: reason"

    @property
    def ok(self) -> bool:
        return not self.problems


def split_dirs(root: str | Path) -> list[Path]:
    """The split folders under root (root itself if it holds a manifest)."""
    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        return [root]
    if not root.is_dir():
        raise ManifestError(f"{root}: no such folder")
    found = sorted(p.parent for p in root.glob(f"*/{MANIFEST_NAME}"))
    if not found:
        raise ManifestError(f"{root}: no <split>/{MANIFEST_NAME} found (nothing packed here?)")
    return found


def _check_members(
    path: Path, keys: list[str], num_classes: int, ignore: int, decode: bool, limits: Limits
) -> list[str]:
    """Problems found reading one shard with the training reader's tar parser (empty: sound).

    Every sample's members and image headers are checked against the schema and the limits;
    with `decode`, labels are decoded and checked too.
    """
    order: list[str] = []
    problems: list[str] = []
    try:
        for sample in shards.iter_samples(str(path), limits=limits):
            key = sample["__key__"]
            order.append(key)
            try:
                shards.check_sample(sample, limits)
            except ShardError as e:
                problems.append(str(e).removeprefix(f"{path}: "))
                continue
            if decode:
                problems += _check_label(key, sample, num_classes, ignore)
    except ShardError as e:
        return [*problems, str(e).removeprefix(f"{path}: ")]
    except (tarfile.TarError, OSError, EOFError) as e:
        return [*problems, f"not a readable tar: {e}"]
    if order != keys:
        missing = sorted(set(keys) - set(order))[:5]
        extra = sorted(set(order) - set(keys))[:5]
        problems.insert(
            0,
            f"keys differ from the manifest ({len(order)} in tar, {len(keys)} listed; "
            f"missing {missing}, unexpected {extra})"
            if set(order) != set(keys)
            else "keys are in another order than the manifest",
        )
    return problems


def _check_label(key: str, sample: dict, num_classes: int, ignore: int) -> list[str]:
    label = cv2.imdecode(np.frombuffer(sample[LABEL_FIELD], np.uint8), cv2.IMREAD_UNCHANGED)
    if label is None or label.ndim != 2 or label.dtype != np.uint8:
        return [f"sample {key!r}: {LABEL_FIELD} is not a single-channel 8-bit PNG"]
    bad = shards.foreign_labels(label, num_classes, ignore)
    if bad:
        return [f"sample {key!r}: label values {bad[:10]} are not train ids"]
    try:
        meta = json.loads(sample[META_FIELD])
    except ValueError as e:
        return [f"sample {key!r}: {META_FIELD} is not valid JSON ({e})"]
    if not isinstance(meta, dict) or (meta.get("height"), meta.get("width")) != label.shape:
        return [f"sample {key!r}: json size does not match the {label.shape} label"]
    return []


def verify_split(
    split_dir: str | Path, decode: bool = False, limits: Limits | None = None
) -> SplitReport:
    """Check every shard of one split against its manifest (and the sample limits)."""
    limits = limits or DEFAULT_LIMITS
    split_dir = Path(split_dir)
    m = read_manifest(split_dir)
    report = SplitReport(split_dir, num_shards=len(m["shards"]))
    listed = set()
    for s in m["shards"]:
        path = split_dir / s["name"]
        listed.add(s["name"])
        if not path.is_file():
            report.problems.append(f"{path}: shard file missing")
            continue
        size = path.stat().st_size
        if size != s["bytes"]:
            report.problems.append(f"{path}: {size} bytes, manifest says {s['bytes']}")
            continue
        if sha256_file(path) != s["sha256"]:
            report.problems.append(f"{path}: sha256 differs from the manifest (corrupt shard)")
            continue
        checks = (s["keys"], m["num_classes"], m["ignore_index"], decode, limits)
        for p in _check_members(path, *checks):
            report.problems.append(f"{path}: {p}")
        report.num_samples += s["num_samples"]
    for extra in sorted(split_dir.glob("*.tar")):
        if extra.name not in listed:
            report.problems.append(f"{extra}: shard not listed in {MANIFEST_NAME}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.verify", description=__doc__.split("\n")[0]
    )
    p.add_argument("paths", nargs="+", help="shards/<name> or shards/<name>/<split>")
    p.add_argument("--decode", action="store_true", help="also decode and check every label")
    add_limit_args(p)
    args = p.parse_args(argv)
    try:
        limits = Limits(args.max_pixels, args.max_member_bytes)
    except ValueError as e:
        p.error(str(e))
    bad = 0
    for root in args.paths:
        try:
            dirs = split_dirs(root)
            reports = [verify_split(d, decode=args.decode, limits=limits) for d in dirs]
        except ManifestError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for r in reports:
            for problem in r.problems:
                print(f"BAD {problem}", file=sys.stderr)
            status = "ok" if r.ok else f"{len(r.problems)} problem(s)"
            print(
                f"{r.split_dir}: {r.num_shards} shards, {r.num_samples} samples verified: {status}"
            )
            bad += len(r.problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
