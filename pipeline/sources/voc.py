"""PASCAL VOC 2012 with the SBD augmentation.

VOC: ``VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/{train,val}.txt}``
(also found under ``VOCdevkit/VOC2012``); labels are palette PNGs whose indices are the 21 class
ids, 255 marking object borders (kept as ignore).
SBD: ``dataset/{cls/*.mat, train.txt, val.txt}`` (under ``SBD/``, ``benchmark_RELEASE/`` or
``--src`` itself); labels are ``GTcls.Segmentation`` in the same 21 ids.

Splits: ``train`` and ``val`` (VOC), ``train_aug`` = SBD train + SBD val + VOC train minus VOC
val (10582 images in the real data). A train_aug image in VOC train keeps its VOC label (with the
border); the others take the SBD label. Images come from VOC JPEGImages, else SBD ``img/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cdgcnet.labels import VOC
from pipeline.shards import Limits

from .base import (
    DatasetSource,
    SourceError,
    SourceSample,
    load_mat_field,
    make_key,
    read_id_list,
    read_palette_png,
    to_uint8_ids,
)

LAYOUT = (
    "VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/{train,val}.txt} "
    "(+ SBD dataset/{cls/*.mat,train.txt,val.txt} for train_aug)"
)


def read_sbd_mat(path: Path, limits: Limits) -> np.ndarray:
    """SBD ``cls/*.mat``: the ``GTcls.Segmentation`` map of 0..20 class ids."""
    seg = load_mat_field(path, "GTcls", "Segmentation", limits)
    return to_uint8_ids(path, seg, "GTcls.Segmentation")


def find_voc_root(src: Path) -> Path | None:
    for cand in (src / "VOC2012", src / "VOCdevkit" / "VOC2012", src):
        if (cand / "JPEGImages").is_dir() and (cand / "ImageSets" / "Segmentation").is_dir():
            return cand
    return None


def find_sbd_root(src: Path) -> Path | None:
    for cand in (
        src / "SBD" / "dataset",
        src / "benchmark_RELEASE" / "dataset",
        src / "dataset",
        src / "SBD",
    ):
        if (cand / "cls").is_dir():
            return cand
    return None


def _voc_sample(voc: Path, sid: str) -> SourceSample:
    return SourceSample(
        key=make_key(sid),
        image_path=voc / "JPEGImages" / f"{sid}.jpg",
        label_path=voc / "SegmentationClass" / f"{sid}.png",
        read_label=read_palette_png,
    )


def list_split(src: Path, split: str) -> list[SourceSample]:
    voc = find_voc_root(src)
    if voc is None:
        raise SourceError(
            src, f"no VOC2012 folder with JPEGImages/ and ImageSets/; expected {LAYOUT}"
        )
    lists = voc / "ImageSets" / "Segmentation"
    if split in ("train", "val"):
        return [
            _voc_sample(voc, sid) for sid in sorted(read_id_list(lists / f"{split}.txt", LAYOUT))
        ]
    if split != "train_aug":
        raise SourceError(src, f"unknown VOC split {split!r}")
    sbd = find_sbd_root(src)
    if sbd is None:
        raise SourceError(
            src, f"train_aug needs SBD (dataset/cls/*.mat) under --src; expected {LAYOUT}"
        )
    voc_train = set(read_id_list(lists / "train.txt", LAYOUT))
    voc_val = set(read_id_list(lists / "val.txt", LAYOUT))
    sbd_ids = set(read_id_list(sbd / "train.txt", LAYOUT, True)) | set(
        read_id_list(sbd / "val.txt", LAYOUT, True)
    )
    samples = []
    for sid in sorted((sbd_ids | voc_train) - voc_val):
        if sid in voc_train:
            samples.append(_voc_sample(voc, sid))
            continue
        image = voc / "JPEGImages" / f"{sid}.jpg"
        if not image.exists() and (sbd / "img" / f"{sid}.jpg").exists():
            image = sbd / "img" / f"{sid}.jpg"
        samples.append(SourceSample(make_key(sid), image, sbd / "cls" / f"{sid}.mat", read_sbd_mat))
    return samples


VOC_SOURCE = DatasetSource(
    name="voc",
    known_splits=("train_aug", "train", "val"),
    list_split=list_split,
    valid_ids=frozenset(VOC.label_map) | {VOC.ignore_index},  # 0..20 and the 255 border
    layout=LAYOUT,
)
