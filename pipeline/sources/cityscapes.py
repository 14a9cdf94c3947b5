"""Cityscapes: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
``gtFine/{split}/{city}/*_gtFine_labelIds.png`` (34 label ids -> 19 train ids).

The synthetic ``scenes`` dataset is written in this layout too.
"""

from __future__ import annotations

from pathlib import Path

from cdgcnet.labels import CITYSCAPES

from .base import DatasetSource, SourceError, SourceSample, make_key, read_png_ids, require_dir

LAYOUT = (
    "leftImg8bit/{split}/{city}/*_leftImg8bit.png and gtFine/{split}/{city}/*_gtFine_labelIds.png"
)
_IMG_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


def list_split(src: Path, split: str) -> list[SourceSample]:
    image_root = require_dir(src / "leftImg8bit" / split, LAYOUT)
    label_root = src / "gtFine" / split
    require_dir(label_root, LAYOUT)
    samples = []
    for image_path in sorted(image_root.glob(f"*/*{_IMG_SUFFIX}")):
        city = image_path.parent.name
        stem = image_path.name[: -len(_IMG_SUFFIX)]
        samples.append(
            SourceSample(
                key=make_key(stem),
                image_path=image_path,
                label_path=label_root / city / f"{stem}{_LABEL_SUFFIX}",
                read_label=read_png_ids,
            )
        )
    if not samples:
        raise SourceError(image_root, f"no *{_IMG_SUFFIX} images found; expected layout: {LAYOUT}")
    return samples


CITYSCAPES_SOURCE = DatasetSource(
    name="cityscapes",
    known_splits=("train", "val", "test"),
    list_split=list_split,
    # Every id of the official table that can be a pixel (0..33; license plate -1 cannot).
    valid_ids=frozenset(CITYSCAPES.label_map),
    layout=LAYOUT,
)
