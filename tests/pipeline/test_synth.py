"""The generators write each dataset's original layout, deterministically and atomically."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image  # reads the palette indices of VOC PNGs (OpenCV expands them to colours)

from cdgcnet.labels import CITYSCAPES_LABELS, COCOSTUFF_UNUSED_IDS, voc_colormap
from pipeline import synth


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"unreadable {path}"
    return image


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory) -> Path:
    return synth.generate(
        "cityscapes", tmp_path_factory.mktemp("cs") / "cityscapes", train=2, val=1
    )


def test_cityscapes_layout_and_formats(cityscapes_root: Path):
    root = cityscapes_root
    images = sorted((root / "leftImg8bit").rglob("*_leftImg8bit.png"))
    assert [p.relative_to(root).as_posix() for p in images] == [
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "leftImg8bit/train/bochum/bochum_000000_000019_leftImg8bit.png",
        "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png",
    ]
    color_lut = {lab.id: lab.color for lab in CITYSCAPES_LABELS}
    seen_ids: set[int] = set()
    for image_path in images:
        stem = image_path.name.removesuffix("_leftImg8bit.png")
        gt = root / "gtFine" / image_path.parent.relative_to(root / "leftImg8bit")
        image = _read(image_path)
        assert image.shape == (128, 256, 3) and image.dtype == np.uint8
        label = _read(gt / f"{stem}_gtFine_labelIds.png")
        assert label.shape == (128, 256) and label.dtype == np.uint8 and label.max() <= 33
        seen_ids |= set(np.unique(label).tolist())
        color = _read(gt / f"{stem}_gtFine_color.png")
        assert color.shape == (128, 256, 4)  # RGBA as released (read back as BGRA)
        for label_id in (7, 26, 5):
            r, g, b = color_lut[label_id]
            assert (color[label == label_id] == (b, g, r, 255)).all()
        inst = _read(gt / f"{stem}_gtFine_instanceIds.png")
        assert inst.dtype == np.uint16 and inst.shape == (128, 256)
        np.testing.assert_array_equal(np.where(inst >= 1000, inst // 1000, inst), label)
        assert {v // 1000 for v in np.unique(inst).tolist() if v >= 1000} == set(range(24, 34))
        polygons = json.loads((gt / f"{stem}_gtFine_polygons.json").read_text())
        assert (polygons["imgHeight"], polygons["imgWidth"]) == (128, 256)
        labels = [o["label"] for o in polygons["objects"]]
        assert "license plate" in labels and all(len(o["polygon"]) >= 3 for o in polygons["objects"])  # fmt: skip
    assert seen_ids == set(range(34))  # every id, the ignored ones included
    info = json.loads((root / synth.INFO_FILE).read_text())
    assert info["num_samples"] == {"train": 2, "val": 1}


def test_odd_cityscapes_image_has_groups_with_plain_instance_ids(cityscapes_root: Path):
    # sample 1 (bochum) draws "<class>group" crowds: their instanceIds pixels are the bare id
    gt = cityscapes_root / "gtFine" / "train" / "bochum"
    objects = json.loads((gt / "bochum_000000_000019_gtFine_polygons.json").read_text())["objects"]
    assert "cargroup" in {o["label"] for o in objects}
    inst = _read(gt / "bochum_000000_000019_gtFine_instanceIds.png")
    assert 26 in np.unique(inst) and 26000 in np.unique(inst)


@pytest.mark.parametrize("dataset", synth.DATASETS)
def test_regeneration_is_byte_identical(dataset: str, tmp_path: Path):
    a = synth.generate(dataset, tmp_path / "a", train=3, val=2, seed=5, size=(96, 64))
    b = synth.generate(dataset, tmp_path / "b", train=3, val=2, seed=5, size=(96, 64))
    c = synth.generate(dataset, tmp_path / "c", train=3, val=2, seed=6, size=(96, 64))
    tree_a, tree_b = _tree(a), _tree(b)
    assert len(tree_a) > 5 and tree_a == tree_b
    assert tree_a != _tree(c)
    assert not list(tmp_path.glob(".*partial*"))


def test_val_images_do_not_depend_on_train_count(tmp_path: Path):
    a = synth.generate("scenes", tmp_path / "a", train=1, val=2, size=(64, 32))
    b = synth.generate("scenes", tmp_path / "b", train=3, val=2, size=(64, 32))
    val_a = {k: v for k, v in _tree(a).items() if "/val/" in k}
    assert len(val_a) == 2 * 5 and val_a == {k: v for k, v in _tree(b).items() if "/val/" in k}


def test_scenes_classes_and_sizes(tmp_path: Path):
    root = synth.generate("scenes", tmp_path / "scenes", train=6, val=2)
    labels = sorted(root.glob("gtFine/*/*/*_labelIds.png"))
    assert len(labels) == 8
    seen: set[int] = set()
    for path in labels:
        label = _read(path)
        assert label.shape == (128, 256)
        seen |= set(np.unique(label).tolist())
    # road, sidewalk, building, pole, vegetation, sky, person, car (+ ego vehicle, ignored)
    assert {7, 8, 11, 21, 23, 24, 26} <= seen <= {1, 7, 8, 11, 17, 21, 23, 24, 26}
    image = _read(next(root.glob("leftImg8bit/train/*/*.png")))
    assert image.shape == (128, 256, 3) and image.std() > 20


def _palette_vote(rgb: np.ndarray) -> int:
    """The CONTEXT_PALETTE colour most of these (K, 3) pixels are closest to in direction
    (exposure and shading scale a colour; a pixel-wise vote ignores the few clipped ones)."""
    palette = synth.CONTEXT_PALETTE / np.linalg.norm(synth.CONTEXT_PALETTE, axis=1, keepdims=True)
    rgb = rgb / np.maximum(np.linalg.norm(rgb, axis=1, keepdims=True), 1e-6)
    return int(np.bincount((rgb @ palette.T).argmax(1), minlength=len(palette)).argmax())


def test_context_colours_link_the_regions_of_a_class_within_an_image(tmp_path: Path):
    root = synth.generate("context", tmp_path / "context", train=4, val=0, seed=3)
    ids = {lab.name: lab.id for lab in CITYSCAPES_LABELS}
    palette_index = {tuple(c): i for i, c in enumerate(synth.CONTEXT_PALETTE.tolist())}
    mappings = []
    for index in range(4):
        city, stem = synth.cityscapes_stem("train", index)
        label = _read(root / "gtFine/train" / city / f"{stem}_gtFine_labelIds.png")
        image = _read(root / "leftImg8bit/train" / city / f"{stem}_leftImg8bit.png")
        image = image[..., ::-1].astype(np.float32)  # BGR -> RGB
        objects = json.loads((root / "gtFine/train" / city / f"{stem}_gtFine_polygons.json")
                             .read_text())["objects"]  # fmt: skip
        # The image's own colours, as the generator deals them (its first draw).
        colours = synth.context_colors(synth._rng(3, "train", index))
        mapping = {name: palette_index[tuple(c.tolist())] for name, c in colours.items()}
        for name in synth.CONTEXT_CLASSES:  # every region of a class shares the class's colour
            pixels = label == ids[name]
            if pixels.sum() >= 30:
                assert _palette_vote(image[pixels]) == mapping[name], name
        # The trailing rectangles are the 3-6 patches, each of a class with a region before them.
        n_patches = 0
        while (
            len(objects[-1 - n_patches]["polygon"]) == 4
            and objects[-1 - n_patches]["label"] in synth.CONTEXT_CLASSES
        ):
            n_patches += 1
        patches, regions = objects[-n_patches:], objects[:-n_patches]
        assert 3 <= n_patches <= 6
        assert {p["label"] for p in patches} <= {r["label"] for r in regions}
        mappings.append(mapping)
    # Across images a colour names no class: the classes get other colours in other images.
    assert len({tuple(sorted(m.items())) for m in mappings}) == 4


def test_voc_and_sbd_layout(tmp_path: Path):
    root = synth.generate("voc", tmp_path / "voc", train=6, val=4)
    seg_sets = root / "VOC2012" / "ImageSets" / "Segmentation"
    voc_train = (seg_sets / "train.txt").read_text().split()
    voc_val = (seg_sets / "val.txt").read_text().split()
    sbd_train = (root / "SBD" / "dataset" / "train.txt").read_text().split()
    sbd_val = (root / "SBD" / "dataset" / "val.txt").read_text().split()
    assert len(voc_train) == 6 and len(voc_val) == 4 and not set(voc_train) & set(voc_val)
    assert set(sbd_train) & set(voc_val) and set(sbd_val) & set(voc_val)  # train_aug must drop them
    assert set(sbd_train) - set(voc_train) - set(voc_val)  # SBD-only images exist
    train_aug = (set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val)
    info = json.loads((root / synth.INFO_FILE).read_text())
    assert info["num_samples"]["train_aug"] == len(train_aug)

    cmap = voc_colormap()
    saw_border = False
    for image_id in voc_train + voc_val:
        png = Image.open(root / "VOC2012" / "SegmentationClass" / f"{image_id}.png")
        assert png.mode == "P"
        assert np.array_equal(np.array(png.getpalette(), np.uint8).reshape(-1, 3), cmap)
        index = np.array(png)
        assert set(np.unique(index).tolist()) <= set(range(21)) | {255}
        saw_border |= bool((index == 255).any())
        image = _read(root / "VOC2012" / "JPEGImages" / f"{image_id}.jpg")
        assert image.shape[:2] == index.shape and image.shape[2] == 3
        # OpenCV expands the palette: each pixel has its index's colour
        bgr = _read(root / "VOC2012" / "SegmentationClass" / f"{image_id}.png")
        np.testing.assert_array_equal(bgr[..., ::-1], cmap[index])
    assert saw_border

    for image_id in sbd_train + sbd_val:
        mat = scipy.io.loadmat(root / "SBD" / "dataset" / "cls" / f"{image_id}.mat")
        gtcls = mat["GTcls"]
        assert gtcls.shape == (1, 1)
        assert set(gtcls.dtype.names) == {"Segmentation", "Boundaries", "CategoriesPresent"}
        seg = gtcls["Segmentation"][0][0]
        assert seg.dtype == np.uint8 and seg.max() <= 20
        present = gtcls["CategoriesPresent"][0][0].ravel().tolist()
        assert present == sorted(set(np.unique(seg).tolist()) - {0}) and present
        assert gtcls["Boundaries"][0][0].shape == (20, 1)
        assert (root / "VOC2012" / "JPEGImages" / f"{image_id}.jpg").is_file()
        if image_id in voc_train + voc_val:  # same objects as VOC; VOC adds the 255 band
            voc = np.array(Image.open(root / "VOC2012" / "SegmentationClass" / f"{image_id}.png"))
            np.testing.assert_array_equal(seg[voc != 255], voc[voc != 255])


def test_cocostuff10k_layout(tmp_path: Path):
    root = synth.generate("cocostuff10k", tmp_path / "c10k", train=3, val=2)
    train = (root / "imageLists" / "train.txt").read_text().split()
    test = (root / "imageLists" / "test.txt").read_text().split()
    assert len(train) == 3 and len(test) == 2
    assert sorted(train + test) == (root / "imageLists" / "all.txt").read_text().split()
    valid = {0} | {i + 1 for i in range(182) if i not in COCOSTUFF_UNUSED_IDS}
    for name in train + test:
        mat = scipy.io.loadmat(root / "annotations" / f"{name}.mat")
        s = mat["S"]
        assert s.dtype == np.uint16 and set(np.unique(s).tolist()) <= valid and 0 in s
        assert mat["names"].size == 182 and str(mat["names"].ravel()[0][0]) == "person"
        assert _read(root / "images" / f"{name}.jpg").shape[:2] == s.shape


def test_cocostuff164k_layout(tmp_path: Path):
    root = synth.generate("cocostuff164k", tmp_path / "c164k", train=3, val=2)
    valid = {i for i in range(182) if i not in COCOSTUFF_UNUSED_IDS} | {255}
    for split, n in (("train", 3), ("val", 2)):
        labels = sorted((root / "stuffthingmaps" / f"{split}2017").glob("*.png"))
        assert len(labels) == n
        for path in labels:
            label = _read(path)
            assert label.ndim == 2 and label.dtype == np.uint8
            assert set(np.unique(label).tolist()) <= valid and (label == 255).any()
            image = _read(root / "images" / f"{split}2017" / f"{path.stem}.jpg")
            assert image.shape == (*label.shape, 3)


def test_cli_help_errors_and_overwrite(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exc:
        synth.main(["--help"])
    assert exc.value.code == 0 and "--overwrite" in capsys.readouterr().out

    out = tmp_path / "cs"
    assert synth.main(["cityscapes", "--out", str(out), "--train", "1", "--val", "0", "--quiet"]) == 0  # fmt: skip
    with pytest.raises(SystemExit) as exc:  # non-empty without --overwrite
        synth.main(["cityscapes", "--out", str(out), "--train", "1", "--quiet"])
    assert exc.value.code == 2 and "not empty" in capsys.readouterr().err
    assert synth.main(["cityscapes", "--out", str(out), "--train", "2", "--val", "0", "--overwrite", "--quiet"]) == 0  # fmt: skip
    assert len(list(out.glob("leftImg8bit/train/*/*.png"))) == 2

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"without SYNTH_INFO\.json"):
        synth.generate("voc", foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(SystemExit):
        synth.main(["voc", "--out", str(tmp_path / "x"), "--size", "big"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least one sample"):
        synth.generate("voc", tmp_path / "y", train=0, val=0)


def test_crash_leaves_no_partial_dataset(tmp_path: Path, monkeypatch):
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(*args)

    original = synth._scenes_sample
    monkeypatch.setattr(synth, "_scenes_sample", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        synth.generate("scenes", tmp_path / "scenes", train=3, val=0, size=(64, 32))
    assert list(tmp_path.iterdir()) == []


def test_palette_png_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8 index image"):
        synth.palette_png_bytes(np.zeros((4, 4), np.int32), voc_colormap())


def test_workers_give_the_same_files(tmp_path: Path):
    a = synth.generate("voc", tmp_path / "a", train=3, val=2, size=(64, 48))
    b = synth.generate("voc", tmp_path / "b", train=3, val=2, size=(64, 48), workers=2)
    assert _tree(a) == _tree(b)
