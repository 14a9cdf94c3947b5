"""Training augmentations: image/label alignment, padding, reproducibility, ranges."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainAugment,
    normalize,
    photometric_jitter,
    random_hflip,
    random_scale,
)

# Flat-colour blocks; the label is a function of the colour (its index in PALETTE), the last
# colour is labelled ignore. The block layout is asymmetric so a flip of one and not the other
# shows.
PALETTE = np.array(
    [[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40], [40, 220, 220], [128, 128, 128]],
    dtype=np.uint8,
)
LABEL_OF_COLOUR = np.array([0, 1, 2, 3, 4, 255], dtype=np.uint8)


def blocks_image(h: int = 60, w: int = 80) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0:h, 0:w]
    colour = (rows // 15 * 7 + cols // 16 * 3 + (cols // 16) ** 2) % len(PALETTE)
    return PALETTE[colour], LABEL_OF_COLOUR[colour]


def unnormalize(image_chw: np.ndarray) -> np.ndarray:
    x = image_chw.transpose(1, 2, 0) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return np.round(x).astype(np.int64)


def misaligned_pixels(image_chw: np.ndarray, label: np.ndarray, margin: int = 1) -> int:
    """Pixels away from label borders whose colour disagrees with their label.

    margin 1 is tight enough to catch the half-pixel shift of cv2.INTER_NEAREST labels.
    """
    k = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    interior = cv2.erode(label, k) == cv2.dilate(label, k)  # label constant around the pixel
    # a colour edge just outside the crop window is invisible to erode/dilate: skip the frame
    interior[:margin] = interior[-margin:] = False
    interior[:, :margin] = interior[:, -margin:] = False
    rgb = unnormalize(image_chw)
    padded = np.all(image_chw == 0, axis=0)
    bad = 0
    for colour, lab in zip(PALETTE, LABEL_OF_COLOUR, strict=True):
        at = interior & (label == lab) & ~padded
        bad += int(np.sum(np.abs(rgb[at] - colour).max(axis=-1) > 1))
    bad += int(np.sum(interior & padded & (label != 255)))  # padding must be ignored
    return bad


def test_alignment_after_scale_crop_flip():
    image, label = blocks_image()
    aug = TrainAugment(crop_size=(48, 56), scale_range=(0.5, 2.0), flip=True)
    checked = 0
    for seed in range(40):
        out_img, out_lbl = aug(image, label, np.random.default_rng(seed))
        assert out_img.shape == (3, 48, 56) and out_img.dtype == np.float32
        assert out_lbl.shape == (48, 56) and out_lbl.dtype == np.uint8
        assert misaligned_pixels(out_img, out_lbl) == 0, f"seed {seed}"
        checked += int(np.sum(out_lbl != 255))
    assert checked > 40 * 48 * 56 * 0.4  # the check saw plenty of labelled pixels
    # the checker does catch a misalignment: flip the image only
    out_img, out_lbl = aug(image, label, np.random.default_rng(0))
    assert misaligned_pixels(np.ascontiguousarray(out_img[:, :, ::-1]), out_lbl) > 100


def test_padding_is_mean_and_ignore():
    image, label = blocks_image(20, 24)
    aug = TrainAugment(crop_size=(32, 40), scale_range=(1.0, 1.0), flip=False)
    out_img, out_lbl = aug(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out_lbl[:20, :24], label)
    np.testing.assert_allclose(out_img[:, :20, :24], normalize(image))
    assert np.all(out_lbl[20:] == 255) and np.all(out_lbl[:, 24:] == 255)
    assert np.all(out_img[:, 20:] == 0) and np.all(out_img[:, :, 24:] == 0)


def test_reproducible_from_the_generator():
    image, label = blocks_image()
    aug = TrainAugment(crop_size=32, jitter=True)
    a = aug(image, label, np.random.default_rng(3))
    b = aug(image, label, np.random.default_rng(3))
    c = aug(image, label, np.random.default_rng(4))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_scale_range_and_interpolation():
    image, label = blocks_image(60, 80)
    sizes = set()
    for seed in range(30):
        img, lbl = random_scale(image, label, np.random.default_rng(seed), (0.5, 2.0))
        assert img.shape[:2] == lbl.shape
        assert 30 <= lbl.shape[0] <= 120 and 40 <= lbl.shape[1] <= 160
        assert abs(lbl.shape[1] / lbl.shape[0] - 80 / 60) < 0.05  # aspect kept
        assert set(np.unique(lbl)) <= set(LABEL_OF_COLOUR.tolist())  # nearest: no new ids
        sizes.add(lbl.shape)
    assert len(sizes) > 10
    img, lbl = random_scale(image, label, np.random.default_rng(0), (1.0, 1.0))
    assert img is image and lbl is label


def test_flip_mirrors_both():
    image, label = blocks_image()
    flips = 0
    for seed in range(20):
        img, lbl = random_hflip(image, label, np.random.default_rng(seed))
        if img is image:
            assert lbl is label
        else:
            flips += 1
            np.testing.assert_array_equal(img, image[:, ::-1])
            np.testing.assert_array_equal(lbl, label[:, ::-1])
    assert 3 <= flips <= 17


def test_jitter_changes_image_not_label():
    image, label = blocks_image()
    changed = 0
    for seed in range(10):
        out = photometric_jitter(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        changed += int(not np.array_equal(out, image))
    assert changed >= 5
    aug = TrainAugment(crop_size=(60, 80), scale_range=(1.0, 1.0), flip=False, jitter=True)
    _, lbl = aug(image, label, np.random.default_rng(1))
    np.testing.assert_array_equal(lbl, label)


def test_normalize():
    mean_pixel = np.broadcast_to(np.round(IMAGENET_MEAN).astype(np.uint8), (2, 3, 3))
    out = normalize(np.ascontiguousarray(mean_pixel))
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    want = (np.round(IMAGENET_MEAN) - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(out[:, 0, 0], want, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"crop_size": 0}, "crop size"),
        ({"crop_size": (10,)}, "crop size"),
        ({"crop_size": 8, "scale_range": (2.0, 1.0)}, "scale_range"),
        ({"crop_size": 8, "scale_range": (0.0, 1.0)}, "scale_range"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainAugment(**kwargs)


def test_size_mismatch_is_refused():
    image, label = blocks_image()
    with pytest.raises(ValueError, match="sizes differ"):
        TrainAugment(crop_size=8)(image, label[:-1], np.random.default_rng(0))
