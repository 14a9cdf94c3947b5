"""Label tables against the official ones, on hand-built pixels."""

from __future__ import annotations

import numpy as np
import pytest

from cdgcnet.labels import (
    ADE20K,
    CITYSCAPES,
    COCOSTUFF,
    LABEL_SPECS,
    VOC,
    LabelSpec,
    get_label_spec,
    voc_colormap,
)

# (labelId, trainId) pairs copied from cityscapesScripts helpers/labels.py, ignore ones included
CITYSCAPES_OFFICIAL = [
    (0, 255), (1, 255), (3, 255), (4, 255), (6, 255), (7, 0), (8, 1), (9, 255), (10, 255),
    (11, 2), (13, 4), (14, 255), (16, 255), (17, 5), (18, 255), (19, 6), (21, 8), (23, 10),
    (24, 11), (26, 13), (28, 15), (29, 255), (30, 255), (31, 16), (32, 17), (33, 18),
]  # fmt: skip


def test_cityscapes_34_to_19_matches_official_table():
    ids = np.array([src for src, _ in CITYSCAPES_OFFICIAL], np.uint8)
    pixels = np.tile(ids, (3, 1))  # (3, K) a tiny label image
    mapped = CITYSCAPES.lut()[pixels]
    expected = np.tile(np.array([dst for _, dst in CITYSCAPES_OFFICIAL], np.uint8), (3, 1))
    np.testing.assert_array_equal(mapped, expected)
    assert CITYSCAPES.num_classes == 19
    assert len(CITYSCAPES.label_map) == 34  # ids 0..33; license plate (-1) is no pixel value
    assert sorted(v for v in CITYSCAPES.label_map.values() if v != 255) == list(range(19))
    assert CITYSCAPES.class_names[0] == "road" and CITYSCAPES.class_names[18] == "bicycle"
    assert CITYSCAPES.class_names[11] == "person" and CITYSCAPES.class_names[13] == "car"
    assert CITYSCAPES.palette[0] == (128, 64, 128) and CITYSCAPES.palette[10] == (70, 130, 180)
    assert (CITYSCAPES.lut()[34:] == 255).all()


def test_voc_palette_and_ignore():
    assert VOC.num_classes == 21
    assert VOC.class_names[0] == "background" and VOC.class_names[15] == "person"
    assert VOC.palette[0] == (0, 0, 0)
    assert VOC.palette[1] == (128, 0, 0)  # aeroplane
    assert VOC.palette[15] == (192, 128, 128)  # person
    assert VOC.palette[20] == (0, 64, 128)  # tvmonitor
    assert tuple(voc_colormap()[255]) == (224, 224, 192)  # the object-border (void) colour
    lut = VOC.lut()
    np.testing.assert_array_equal(lut[:21], np.arange(21))
    assert lut[255] == 255 and lut[21] == 255


def test_cocostuff_182_to_171():
    lut = COCOSTUFF.lut()
    assert COCOSTUFF.num_classes == 171
    unused = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
    assert (lut[unused] == 255).all()
    assert lut[0] == 0 and lut[10] == 10 and lut[12] == 11  # fire hydrant, then stop sign
    assert lut[181] == 170 and lut[91] == 80  # wood (last stuff), banner (first stuff)
    assert lut[255] == 255 and (lut[182:] == 255).all()
    used = [i for i in range(182) if i not in unused]
    np.testing.assert_array_equal(lut[used], np.arange(171))
    assert COCOSTUFF.class_names[0] == "person" and COCOSTUFF.class_names[170] == "wood"
    assert COCOSTUFF.class_names[80] == "banner"
    assert len(set(COCOSTUFF.palette)) == 171  # distinct colours


def test_label_specs_registry_and_validation():
    # keyed by dataset name; the synthetic scenes and both COCO-Stuff releases share a table
    assert LABEL_SPECS == {
        "cityscapes": CITYSCAPES, "scenes": CITYSCAPES, "context": CITYSCAPES, "voc": VOC, "cocostuff10k": COCOSTUFF,
        "cocostuff164k": COCOSTUFF, "ade20k": ADE20K,
    }  # fmt: skip
    assert get_label_spec("voc") is VOC
    with pytest.raises(KeyError, match="unknown dataset 'ade'"):
        get_label_spec("ade")
    with pytest.raises(ValueError, match="1 palette entries for 2 classes"):
        LabelSpec("x", ("a", "b"), ((0, 0, 0),), {0: 0})
    with pytest.raises(ValueError, match="maps to invalid train id 7"):
        LabelSpec("x", ("a",), ((0, 0, 0),), {3: 7})
    with pytest.raises(ValueError, match="source id 300"):
        LabelSpec("x", ("a",), ((0, 0, 0),), {300: 0})


def test_ade20k_sceneparse150_ids():
    """0 ("other") is ignored, 1..150 become train ids 0..149, names in the benchmark's order."""
    assert ADE20K.num_classes == 150 and len(set(ADE20K.class_names)) == 150
    assert ADE20K.class_names[:5] == ("wall", "building", "sky", "floor", "tree")
    assert ADE20K.class_names[-1] == "flag" and ADE20K.class_names[12] == "person"
    pixels = np.array([[0, 1, 2, 150], [151, 255, 13, 75]], np.uint8)
    np.testing.assert_array_equal(ADE20K.lut()[pixels], [[255, 0, 1, 149], [255, 255, 12, 74]])
    assert len(set(ADE20K.palette)) == 150
