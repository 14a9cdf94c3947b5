"""ADE20K as the SceneParse150 benchmark release (``ADEChallengeData2016``):
``images/{training,validation}/*.jpg`` with ``annotations/{training,validation}/*.png``
(single-channel PNGs of ids: 0 = "other", ignored; 1..150 the classes).

``--src`` may be the ``ADEChallengeData2016`` folder or the folder holding it.
"""

from __future__ import annotations

from pathlib import Path

from cdgcnet.labels import ADE20K

from .base import DatasetSource, SourceError, SourceSample, make_key, read_png_ids, require_dir

LAYOUT = "[ADEChallengeData2016/]images/{training,validation}/*.jpg and annotations/{split}/*.png"
RELEASE_DIR = "ADEChallengeData2016"


def find_root(src: Path) -> Path:
    """``src`` itself or its ``ADEChallengeData2016`` subfolder, whichever holds images/."""
    nested = src / RELEASE_DIR
    return nested if not (src / "images").is_dir() and nested.is_dir() else src


def list_split(src: Path, split: str) -> list[SourceSample]:
    root = find_root(src)
    images = require_dir(root / "images" / split, LAYOUT)
    labels = require_dir(root / "annotations" / split, LAYOUT)
    samples = [
        SourceSample(make_key(p.stem), p, labels / f"{p.stem}.png", read_png_ids)
        for p in sorted(images.glob("*.jpg"))
    ]
    if not samples:
        raise SourceError(images, f"no *.jpg images found; expected layout: {LAYOUT}")
    return samples


ADE20K_SOURCE = DatasetSource(
    name="ade20k",
    known_splits=("training", "validation"),
    list_split=list_split,
    valid_ids=frozenset(range(ADE20K.num_classes + 1)),  # 0 (other) and the 150 class ids
    layout=LAYOUT,
)
