"""Tiny hand-built datasets in the original layouts, for the packing tests.

Each writer returns {key: source-id label array} so tests can compare what was packed.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import scipy.io
from PIL import Image

from cdgcnet.labels import voc_colormap


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def encode_jpg(img: np.ndarray) -> np.ndarray:
    ok, jpg = cv2.imencode(".jpg", img)
    assert ok
    return jpg


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)


def write_cityscapes(
    root: Path, split: str = "train", n: int = 3, h: int = 16, w: int = 24, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(n):
        city = ("aachen", "bochum")[i % 2]
        stem = f"{city}_{i:06d}_000019"
        write_png(
            root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _image(rng, h, w)
        )
        ids = rng.integers(0, 34, size=(h, w), dtype=np.uint8)
        write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
        labels[stem] = ids
    return labels


def write_voc_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids, mode="P")
    im.putpalette(voc_colormap(256).ravel().tolist())
    im.save(path)


def write_voc(
    root: Path,
    train: tuple[str, ...] = ("2007_000001", "2007_000002"),
    val: tuple[str, ...] = ("2007_000003",),
    sbd_train: tuple[str, ...] = ("2008_000010", "2007_000003"),
    sbd_val: tuple[str, ...] = ("2008_000011", "2007_000001"),
    h: int = 12,
    w: int = 20,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """VOC2012 + SBD. Returns the label each id should get in train_aug/train/val."""
    rng = np.random.default_rng(seed)
    voc = root / "VOC2012"
    sbd = root / "SBD" / "dataset"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (sbd / "cls").mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(train) + "\n")
    (lists / "val.txt").write_text("\n".join(val) + "\n")
    (sbd / "train.txt").write_text("\n".join(sbd_train) + "\n")
    (sbd / "val.txt").write_text("\n".join(sbd_val) + "\n")
    labels = {}
    for sid in sorted(set(train) | set(val) | set(sbd_train) | set(sbd_val)):
        (voc / "JPEGImages").mkdir(exist_ok=True)
        jpg = encode_jpg(_image(rng, h, w))
        (voc / "JPEGImages" / f"{sid}.jpg").write_bytes(jpg.tobytes())
        if sid in train or sid in val:
            ids = rng.integers(0, 21, size=(h, w), dtype=np.uint8)
            ids[0, :] = 255  # the object border
            write_voc_png(voc / "SegmentationClass" / f"{sid}.png", ids)
            labels[sid] = ids
        if sid in sbd_train or sid in sbd_val:
            seg = rng.integers(0, 21, size=(h, w), dtype=np.uint8)
            write_sbd_mat(sbd / "cls" / f"{sid}.mat", seg)
            labels.setdefault(sid, seg)  # a VOC label takes precedence
    return labels


def write_sbd_mat(path: Path, seg: np.ndarray) -> None:
    gtcls = {
        "Segmentation": seg,
        "Boundaries": np.zeros((21, 1), dtype=object),
        "CategoriesPresent": np.unique(seg),
    }
    scipy.io.savemat(str(path), {"GTcls": gtcls})


def write_cocostuff10k(
    root: Path,
    train: tuple[str, ...] = ("COCO_train2014_000000000077",),
    test=("COCO_train2014_000000000078",),
    h: int = 10,
    w: int = 14,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Returns the 1-based S maps (0 = unlabeled)."""
    rng = np.random.default_rng(seed)
    (root / "imageLists").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    (root / "imageLists" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "imageLists" / "test.txt").write_text("\n".join(test) + "\n")
    labels = {}
    for name in (*train, *test):
        jpg = encode_jpg(_image(rng, h, w))
        (root / "images" / f"{name}.jpg").write_bytes(jpg.tobytes())
        s = rng.integers(0, 183, size=(h, w)).astype(np.uint16)
        scipy.io.savemat(str(root / "annotations" / f"{name}.mat"), {"S": s})
        labels[name] = s
    return labels


def write_cocostuff164k(
    root: Path, split: str = "train", n: int = 2, h: int = 10, w: int = 14, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(n):
        stem = f"{i + 139:012d}"
        img_dir = root / "images" / f"{split}2017"
        img_dir.mkdir(parents=True, exist_ok=True)
        jpg = encode_jpg(_image(rng, h, w))
        (img_dir / f"{stem}.jpg").write_bytes(jpg.tobytes())
        ids = rng.integers(0, 182, size=(h, w), dtype=np.uint8)
        ids[0, 0] = 255
        write_png(root / "stuffthingmaps" / f"{split}2017" / f"{stem}.png", ids)
        labels[stem] = ids
    return labels


def read_split(split_dir: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of every shard in a packed split, in manifest order."""
    import json
    import tarfile

    manifest = json.loads((split_dir / "manifest.json").read_text())
    out: dict[str, dict[str, bytes]] = {}
    for s in manifest["shards"]:
        with tarfile.open(split_dir / s["name"]) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def decode_label(data: bytes) -> np.ndarray:
    label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert label is not None and label.ndim == 2 and label.dtype == np.uint8
    return label
