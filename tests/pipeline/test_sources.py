"""Dataset readers: label mapping equals the official tables on hand-built pixels, split
composition (VOC train_aug), untouched image bytes, and named errors for wrong layouts."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import scipy.io

from pipeline.datasets import DATASETS
from pipeline.pack import pack_split
from pipeline.sources import SourceError

from .packdata import (
    decode_label,
    read_split,
    write_cityscapes,
    write_cocostuff10k,
    write_cocostuff164k,
    write_png,
    write_sbd_mat,
    write_voc,
    write_voc_png,
)

# cityscapesScripts helpers/labels.py: id -> trainId for the 19 evaluated classes; every other
# id 0..33 is ignored (255).
CITYSCAPES_OFFICIAL = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

# COCO-Stuff 182 (0-based) -> 171 train ids, entries of the usual conversion table around the
# 11 unused thing ids (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90 -> ignore).
COCOSTUFF_OFFICIAL = {
    0: 0, 10: 10, 11: 255, 12: 11, 24: 23, 25: 255, 26: 24, 27: 25, 28: 255, 29: 255, 30: 26,
    43: 39, 44: 255, 45: 40, 64: 59, 65: 255, 66: 60, 67: 255, 68: 255, 69: 61, 70: 255, 71: 62,
    81: 72, 82: 255, 83: 73, 89: 79, 90: 255, 91: 80, 181: 170, 255: 255,
}  # fmt: skip


def pack(dataset: str, src, out, split: str, **kw) -> dict:
    return pack_split(DATASETS[dataset], src, out, split, workers=1, progress=False, **kw)


def test_cityscapes_label_ids_map_to_official_train_ids(tmp_path):
    write_cityscapes(tmp_path / "src", "train", n=1, h=2, w=34)
    ids = np.tile(np.arange(34, dtype=np.uint8), (2, 1))  # every label id, (2, 34)
    stem = "aachen_000000_000019"
    write_png(tmp_path / "src/gtFine/train/aachen" / f"{stem}_gtFine_labelIds.png", ids)
    m = pack("cityscapes", tmp_path / "src", tmp_path / "out", "train")
    label = decode_label(read_split(tmp_path / "out/train")[stem]["label.png"])
    expected = np.array([CITYSCAPES_OFFICIAL.get(i, 255) for i in range(34)], np.uint8)
    np.testing.assert_array_equal(label, np.tile(expected, (2, 1)))
    # histogram: 2 pixels per evaluated class, the 15 ignored ids x 2 pixels are ignore
    assert m["class_histogram"] == [2] * 19
    assert m["ignore_pixels"] == 2 * 15
    assert m["label_map"]["7"] == 0 and m["label_map"]["0"] == 255


def test_voc_palette_indices_and_border_kept(tmp_path):
    write_voc(tmp_path / "src", train=("2007_000001",), val=("2007_000002",), sbd_train=(),
              sbd_val=("2008_000001",))  # fmt: skip
    ids = np.array([[*range(21), 255]], np.uint8).repeat(3, axis=0)  # (3, 22)
    voc = tmp_path / "src/VOC2012"
    write_voc_png(voc / "SegmentationClass/2007_000002.png", ids)
    from .packdata import _image, encode_jpg

    img = encode_jpg(_image(np.random.default_rng(0), 3, 22))
    (voc / "JPEGImages/2007_000002.jpg").write_bytes(img.tobytes())
    pack("voc", tmp_path / "src", tmp_path / "out", "val")
    label = decode_label(read_split(tmp_path / "out/val")["2007_000002"]["label.png"])
    np.testing.assert_array_equal(label, ids)  # VOC indices are train ids; 255 stays ignore


def test_sbd_mat_segmentation_is_read(tmp_path):
    write_voc(tmp_path / "src", train=("2007_000001",), val=("2007_000002",), sbd_train=(),
              sbd_val=("2008_000001",), h=3, w=21)  # fmt: skip
    seg = np.tile(np.arange(21, dtype=np.uint8), (3, 1))
    write_sbd_mat(tmp_path / "src/SBD/dataset/cls/2008_000001.mat", seg)
    pack("voc", tmp_path / "src", tmp_path / "out", "train_aug")
    label = decode_label(read_split(tmp_path / "out/train_aug")["2008_000001"]["label.png"])
    np.testing.assert_array_equal(label, seg)


def test_voc_train_aug_composition_and_label_source(tmp_path):
    expected = write_voc(
        tmp_path / "src",
        train=("2007_000001", "2007_000002"),
        val=("2007_000003", "2007_000004"),
        sbd_train=("2008_000010", "2007_000003", "2007_000001"),
        sbd_val=("2008_000011", "2007_000004"),
    )
    m = pack("voc", tmp_path / "src", tmp_path / "out", "train_aug")
    got = read_split(tmp_path / "out/train_aug")
    # (SBD train + SBD val + VOC train) - VOC val, sorted
    assert list(got) == ["2007_000001", "2007_000002", "2008_000010", "2008_000011"]
    assert m["num_samples"] == 4
    for key, fields in got.items():
        # VOC train images keep their VOC label (with the border), the rest come from SBD
        np.testing.assert_array_equal(decode_label(fields["label.png"]), expected[key])
        meta = json.loads(fields["json"])
        assert meta["label_path"].endswith(".png" if key.startswith("2007") else ".mat")
    m_val = pack("voc", tmp_path / "src", tmp_path / "out", "val")
    assert [k for s in m_val["shards"] for k in s["keys"]] == ["2007_000003", "2007_000004"]


def test_cocostuff_10k_and_164k_map_182_ids_to_171(tmp_path):
    ids0 = np.array(sorted(COCOSTUFF_OFFICIAL), dtype=np.uint8)[None, :].repeat(2, axis=0)
    expected = np.vectorize(COCOSTUFF_OFFICIAL.get)(ids0).astype(np.uint8)
    h, w = ids0.shape
    # 164k: 0-based PNG, 255 unlabeled
    write_cocostuff164k(tmp_path / "c164", "val", n=1, h=h, w=w)
    write_png(tmp_path / "c164/stuffthingmaps/val2017/000000000139.png", ids0)
    pack("cocostuff164k", tmp_path / "c164", tmp_path / "o164", "val")
    got = decode_label(read_split(tmp_path / "o164/val")["000000000139"]["label.png"])
    np.testing.assert_array_equal(got, expected)
    # 10k: 1-based S with 0 unlabeled
    name = "COCO_train2014_000000000077"
    write_cocostuff10k(tmp_path / "c10", train=(name,), test=("COCO_x",), h=h, w=w)
    s = np.where(ids0 == 255, 0, ids0.astype(np.uint16) + 1)
    scipy.io.savemat(str(tmp_path / f"c10/annotations/{name}.mat"), {"S": s})
    m = pack("cocostuff10k", tmp_path / "c10", tmp_path / "o10", "train")
    got = decode_label(read_split(tmp_path / "o10/train")[name]["label.png"])
    np.testing.assert_array_equal(got, expected)
    assert m["num_classes"] == 171 and len(m["class_histogram"]) == 171


@pytest.mark.parametrize("dataset", ["cityscapes", "voc", "cocostuff10k", "cocostuff164k"])
def test_image_bytes_are_copied_untouched(tmp_path, dataset):
    writers = {
        "cityscapes": lambda r: write_cityscapes(r, "val", n=2),
        "voc": lambda r: write_voc(r),
        "cocostuff10k": lambda r: write_cocostuff10k(r, test=("COCO_val2014_000000000001",)),
        "cocostuff164k": lambda r: write_cocostuff164k(r, "val"),
    }
    writers[dataset](tmp_path / "src")
    split = {"cityscapes": "val", "voc": "val", "cocostuff10k": "test", "cocostuff164k": "val"}[
        dataset
    ]
    pack(dataset, tmp_path / "src", tmp_path / "out", split)
    got = read_split(tmp_path / "out" / split)
    assert got
    for key, fields in got.items():
        meta = json.loads(fields["json"])
        ext = "png" if dataset == "cityscapes" else "jpg"
        assert fields[ext] == (tmp_path / "src" / meta["image_path"]).read_bytes()
        assert meta["key"] == key and meta["split"] == split and "." not in key
        assert decode_label(fields["label.png"]).shape == (meta["height"], meta["width"])


def test_listing_order_is_sorted_and_stable(tmp_path):
    write_cityscapes(tmp_path / "src", "train", n=5)
    a = [s.key for s in DATASETS["cityscapes"].source.list_split(tmp_path / "src", "train")]
    assert a == sorted(a) and len(a) == 5
    assert a == [s.key for s in DATASETS["cityscapes"].source.list_split(tmp_path / "src", "train")]


@pytest.mark.parametrize(
    ("dataset", "setup", "message"),
    [
        ("cityscapes", lambda r: None, "leftImg8bit/train: folder missing"),
        ("cityscapes", lambda r: (r / "leftImg8bit/train/x").mkdir(parents=True)
         or (r / "gtFine/train").mkdir(parents=True), "no *_leftImg8bit.png images found"),
        ("voc", lambda r: None, "no VOC2012 folder"),
        ("voc", lambda r: write_voc(r) and __import__("shutil").rmtree(r / "SBD"),
         "train_aug needs SBD"),
        ("cocostuff10k", lambda r: None, "images: folder missing"),
        ("cocostuff10k", lambda r: write_cocostuff10k(r) and (r / "imageLists/train.txt").unlink(),
         "train.txt: split list missing"),
        ("cocostuff164k", lambda r: (r / "images/train2017").mkdir(parents=True), "stuffthingmaps"),
    ],
)  # fmt: skip
def test_wrong_layout_is_a_named_error(tmp_path, dataset, setup, message):
    src = tmp_path / "src"
    src.mkdir()
    setup(src)
    split = "train_aug" if dataset == "voc" else "train"
    with pytest.raises(SourceError) as e:
        pack(dataset, src, tmp_path / "out", split)
    assert message in str(e.value)
    assert str(src) in str(e.value)
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_jpeg_end_marker_check(tmp_path):
    """Bytes after the end-of-image marker are fine; a JPEG cut before it is refused."""
    from pipeline.sources.base import SampleError, check_complete

    from .packdata import _image, encode_jpg

    jpg = encode_jpg(_image(np.random.default_rng(1), 32, 48)).tobytes()
    check_complete(tmp_path / "a.jpg", jpg + b"\x00trailing metadata", "jpg")
    progressive = cv2.imencode(".jpg", _image(np.random.default_rng(2), 32, 48),
                               [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()  # fmt: skip
    check_complete(tmp_path / "p.jpg", progressive, "jpg")
    for cut in (len(jpg) - 2, len(jpg) // 2, 300):
        with pytest.raises(SampleError, match=r"a\.jpg: truncated JPEG"):
            check_complete(tmp_path / "a.jpg", jpg[:cut], "jpg")
