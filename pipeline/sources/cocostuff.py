"""COCO-Stuff, both releases (182 ids -> 171 classes; the 11 unused thing ids -> ignore).

10k: ``images/*.jpg``, ``annotations/*.mat`` (variable ``S``, 1-based ids, 0 = unlabeled),
``imageLists/{train,test}.txt``. 164k: ``images/{train,val}2017/*.jpg`` with
``stuffthingmaps/{train,val}2017/*.png`` (0-based ids, 255 = unlabeled). Both are read into the
0-based 164k id space so one table maps them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cdgcnet.labels import COCOSTUFF
from pipeline.shards import Limits

from .base import (
    DatasetSource,
    SampleError,
    SourceError,
    SourceSample,
    load_mat_field,
    make_key,
    read_id_list,
    read_png_ids,
    require_dir,
)

LAYOUT_10K = "images/*.jpg, annotations/*.mat (S), imageLists/{train,test}.txt"
LAYOUT_164K = "images/{train,val}2017/*.jpg and stuffthingmaps/{train,val}2017/*.png"
NUM_SOURCE_IDS = 182


def read_cocostuff10k_mat(path: Path, limits: Limits) -> np.ndarray:
    """10k ``S`` (1-based, 0 unlabeled) -> 0-based ids with 255 unlabeled."""
    s = load_mat_field(path, "S", limits=limits)
    lo, hi = int(s.min()), int(s.max())
    if lo < 0 or hi > NUM_SOURCE_IDS:
        raise SampleError(
            path, f"S values {lo}..{hi} outside 0..{NUM_SOURCE_IDS} (outside the table)"
        )
    s = s.astype(np.int16)
    return np.where(s == 0, 255, s - 1).astype(np.uint8)


def list_split_10k(src: Path, split: str) -> list[SourceSample]:
    images = require_dir(src / "images", LAYOUT_10K)
    annotations = require_dir(src / "annotations", LAYOUT_10K)
    names = read_id_list(src / "imageLists" / f"{split}.txt", LAYOUT_10K)
    stems = sorted(Path(n).stem if n.endswith((".jpg", ".mat")) else n for n in names)
    return [
        SourceSample(
            make_key(s), images / f"{s}.jpg", annotations / f"{s}.mat", read_cocostuff10k_mat
        )
        for s in stems
    ]


def list_split_164k(src: Path, split: str) -> list[SourceSample]:
    images = require_dir(src / "images" / f"{split}2017", LAYOUT_164K)
    labels = src / "stuffthingmaps" / f"{split}2017"
    if not labels.is_dir() and (src / "stuffthingmaps_trainval2017" / f"{split}2017").is_dir():
        labels = src / "stuffthingmaps_trainval2017" / f"{split}2017"
    require_dir(labels, LAYOUT_164K)
    samples = [
        SourceSample(make_key(p.stem), p, labels / f"{p.stem}.png", read_png_ids)
        for p in sorted(images.glob("*.jpg"))
    ]
    if not samples:
        raise SourceError(images, f"no *.jpg images found; expected layout: {LAYOUT_164K}")
    return samples


_VALID = frozenset(range(NUM_SOURCE_IDS)) | {COCOSTUFF.ignore_index}

COCOSTUFF10K_SOURCE = DatasetSource(
    name="cocostuff10k",
    known_splits=("train", "test"),
    list_split=list_split_10k,
    valid_ids=_VALID,
    layout=LAYOUT_10K,
)
COCOSTUFF164K_SOURCE = DatasetSource(
    name="cocostuff164k",
    known_splits=("train", "val"),
    list_split=list_split_164k,
    valid_ids=_VALID,
    layout=LAYOUT_164K,
)
