"""Check packed shards against their manifests.

    python -m pipeline.verify shards/<name> [--decode]

For every split folder (one holding manifest.json; the path may also be a split folder itself):
re-hash each shard and compare size and sha256 with the manifest, read it as a tar and check that
it holds exactly the manifest's keys, in order, each with an image, a label and JSON metadata.
With --decode also decode every label and check its values (train ids or ignore).
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

from .manifest import MANIFEST_NAME, ManifestError, read_manifest
from .pack import sha256_file

IMAGE_EXTS = ("jpg", "png")


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


def _check_members(path: Path, keys: list[str], num_classes: int, ignore: int, decode: bool):
    """Problems found reading one shard as a tar (empty list when it is sound)."""
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    return [f"member {m.name!r} is not a regular file"]
                key, _, ext = m.name.partition(".")
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                f = tar.extractfile(m)
                samples[key][ext] = f.read() if decode and ext in ("label.png", "json") else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        return [f"not a readable tar: {e}"]
    problems = []
    if order != keys:
        missing = sorted(set(keys) - set(order))[:5]
        extra = sorted(set(order) - set(keys))[:5]
        problems.append(
            f"keys differ from the manifest ({len(order)} in tar, {len(keys)} listed; "
            f"missing {missing}, unexpected {extra})"
            if set(order) != set(keys)
            else "keys are in another order than the manifest"
        )
    for key in order:
        fields = samples[key]
        images = [e for e in IMAGE_EXTS if e in fields]
        if len(images) != 1 or "label.png" not in fields or "json" not in fields:
            problems.append(
                f"sample {key!r} has members {sorted(fields)}, expected image + label.png + json"
            )
            continue
        if decode:
            problems += _check_label(key, fields, num_classes, ignore)
    return problems


def _check_label(key: str, fields: dict[str, bytes], num_classes: int, ignore: int) -> list[str]:
    label = cv2.imdecode(np.frombuffer(fields["label.png"], np.uint8), cv2.IMREAD_UNCHANGED)
    if label is None or label.ndim != 2 or label.dtype != np.uint8:
        return [f"sample {key!r}: label.png is not a single-channel 8-bit PNG"]
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != ignore)]
    if bad.size:
        return [f"sample {key!r}: label values {bad.tolist()[:10]} are not train ids"]
    meta = json.loads(fields["json"])
    if (meta.get("height"), meta.get("width")) != label.shape:
        return [f"sample {key!r}: json size {meta.get('height')}x{meta.get('width')} != label"]
    return []


def verify_split(split_dir: str | Path, decode: bool = False) -> SplitReport:
    """Check every shard of one split against its manifest."""
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
        for p in _check_members(path, s["keys"], m["num_classes"], m["ignore_index"], decode):
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
    args = p.parse_args(argv)
    bad = 0
    for root in args.paths:
        try:
            dirs = split_dirs(root)
            reports = [verify_split(d, decode=args.decode) for d in dirs]
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
