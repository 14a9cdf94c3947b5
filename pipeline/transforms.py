"""Training augmentations of the paper (section 4.2), with OpenCV and numpy.

Legend: image (H, W, 3) uint8 RGB; label (H, W) uint8 train ids, 255 = ignore.

Order: random scale (0.5-2.0; image bilinear, label nearest) -> random crop window of at most
the crop size -> horizontal flip -> optional photometric jitter -> normalise (ImageNet mean/std,
RGB, 0-255 scale) -> pad bottom/right to the crop size. Padding comes after normalisation so
that padded image pixels are exactly 0, i.e. the dataset mean (padding a uint8 image with the
mean would round it); padded label pixels are 255 and so ignored by the losses and metrics.

Every random draw comes from the numpy Generator passed in, so a sample's augmentation is
reproducible from its seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cdgcnet.labels import IGNORE_INDEX

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale
IMAGENET_STD = (58.395, 57.12, 57.375)

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_INV_STD = 1.0 / np.asarray(IMAGENET_STD, dtype=np.float32)


def as_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """A crop size given as int or (h, w) -> (h, w); positive ints only."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(
            f"crop size must be a positive int or (h, w) of positive ints, got {size!r}"
        )
    return int(size[0]), int(size[1])


def random_scale(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, scale_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize both by one factor drawn uniformly from ``scale_range``."""
    s = rng.uniform(scale_range[0], scale_range[1])
    h, w = label.shape
    size = (max(1, round(w * s)), max(1, round(h * s)))  # cv2 wants (w, h)
    if size == (w, h):
        return image, label
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    # INTER_NEAREST_EXACT samples pixel centres like INTER_LINEAR does; plain INTER_NEAREST is
    # shifted by up to half a pixel, which would misalign label and image.
    label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST_EXACT)
    return image, label


def random_crop(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, crop_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Crop a random window of size min(crop, image) along each axis (views, no copy)."""
    h, w = label.shape
    ch, cw = crop_hw
    y0 = int(rng.integers(0, max(h - ch, 0) + 1))
    x0 = int(rng.integers(0, max(w - cw, 0) + 1))
    return image[y0 : y0 + ch, x0 : x0 + cw], label[y0 : y0 + ch, x0 : x0 + cw]


def random_hflip(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, p: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Mirror both left-right with probability ``p`` (views, no copy)."""
    if rng.random() < p:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def photometric_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter, each applied with probability 0.5.

    Ranges follow the common segmentation recipe (mmseg PhotoMetricDistortion): brightness
    +-32, contrast and saturation x[0.5, 1.5], hue +-18 (OpenCV hue units, 0-179). All values
    are drawn every time so the number of draws does not depend on the outcome.
    """
    on = rng.random(4) < 0.5
    delta = rng.uniform(-32.0, 32.0)
    contrast = rng.uniform(0.5, 1.5)
    saturation = rng.uniform(0.5, 1.5)
    hue = int(rng.integers(-18, 19))
    if not on.any():
        return image
    x = image.astype(np.float32)
    if on[0]:
        x += delta
    if on[1]:
        x *= contrast
    x = np.clip(x, 0, 255).astype(np.uint8)
    if on[2] or on[3]:
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
        if on[2]:
            hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * saturation, 0, 255)
        if on[3]:
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + hue) % 180
        x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return x


def normalize(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, (x - mean) / std with ImageNet statistics."""
    x = image.astype(np.float32)
    x -= _MEAN
    x *= _INV_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def pad_to(
    image_chw: np.ndarray, label: np.ndarray, crop_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Pad a normalised (3, h, w) image with 0 (= the mean) and the label with 255, bottom/right."""
    ch, cw = crop_hw
    h, w = label.shape
    if (h, w) == (ch, cw):
        return image_chw, np.ascontiguousarray(label)
    if h > ch or w > cw:
        raise ValueError(f"cannot pad {h}x{w} to the smaller crop {ch}x{cw}")
    out_img = np.zeros((3, ch, cw), dtype=np.float32)
    out_img[:, :h, :w] = image_chw
    out_lbl = np.full((ch, cw), IGNORE_INDEX, dtype=np.uint8)
    out_lbl[:h, :w] = label
    return out_img, out_lbl


@dataclass(frozen=True)
class TrainAugment:
    """The training transform: (image uint8 RGB, label uint8) -> (3, ch, cw) float32, (ch, cw) uint8."""

    crop_size: int | tuple[int, int]
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    jitter: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_size", as_hw(self.crop_size))
        lo, hi = (float(v) for v in self.scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range!r}")
        object.__setattr__(self, "scale_range", (lo, hi))

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape} sizes differ")
        image, label = random_scale(image, label, rng, self.scale_range)
        image, label = random_crop(image, label, rng, self.crop_size)
        if self.flip:
            image, label = random_hflip(image, label, rng)
        if self.jitter:
            image = photometric_jitter(np.ascontiguousarray(image), rng)
        return pad_to(normalize(image), label, self.crop_size)
