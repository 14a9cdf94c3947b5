"""Generators of small datasets in each dataset's ORIGINAL on-disk layout and file formats.

No dataset can be downloaded in tests or on a laptop, so these write look-alikes that exercise the
real packers: Cityscapes (gtFine), PASCAL VOC 2012 + SBD, COCO-Stuff 10k (.mat) and 164k (PNG),
ADE20K (SceneParse150), `scenes`, a learnable street-scene task in Cityscapes layout that the demo
trains on, and `context`, the same scenes recoloured so that some regions can only be labelled from
other regions of the same class in the same image.

    python -m pipeline.synth cityscapes --out data/cityscapes --train 8 --val 4
    python -m pipeline.synth scenes --out data/scenes              # 200 train / 40 val

Every file is a pure function of (--seed, split, index): regenerating gives byte-identical files,
and changing --train does not change the val images. The dataset is written into a temporary
sibling directory and renamed onto --out only when complete, so a crash leaves no half dataset.
A SYNTH_INFO.json at the root records the arguments and the expected sample count per split.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import scipy.io
import scipy.sparse
from tqdm import tqdm

from cdgcnet.labels import (
    ADE20K_CLASS_NAMES,
    CITYSCAPES_LABELS,
    CITYSCAPES_NAME_TO_LABEL,
    COCOSTUFF_182_NAMES,
    COCOSTUFF_UNUSED_IDS,
    voc_colormap,
)

GENERATOR_VERSION = "1"
INFO_FILE = "SYNTH_INFO.json"
DATASETS = ("cityscapes", "voc", "cocostuff10k", "cocostuff164k", "scenes", "ade20k", "context")


@dataclass(frozen=True)
class Defaults:
    train: int
    val: int
    size: tuple[int, int]  # (width, height); VOC/COCO images vary up to this size


DEFAULTS: dict[str, Defaults] = {
    "cityscapes": Defaults(train=6, val=4, size=(256, 128)),
    "voc": Defaults(train=8, val=6, size=(160, 120)),
    "cocostuff10k": Defaults(train=6, val=4, size=(160, 120)),
    "cocostuff164k": Defaults(train=6, val=4, size=(160, 120)),
    "scenes": Defaults(train=200, val=40, size=(256, 128)),
    "ade20k": Defaults(train=6, val=4, size=(160, 120)),
    "context": Defaults(train=200, val=40, size=(256, 128)),
}


# ---------------------------------------------------------------------------------------------
# File writers: all deterministic (no timestamps), all via OpenCV / scipy / zlib.


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _encode(ext: str, image: np.ndarray, params: Sequence[int] = ()) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} {image.dtype} image as {ext}")
    return buf.tobytes()


def write_png(path: Path, image: np.ndarray) -> None:
    """PNG of an (H,W) uint8/uint16 array or an (H,W,3|4) uint8 RGB(A) array."""
    if image.ndim == 3:
        code = cv2.COLOR_RGB2BGR if image.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        image = cv2.cvtColor(image, code)
    _write_bytes(path, _encode(".png", image))


def write_jpg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    _write_bytes(
        path,
        _encode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), (cv2.IMWRITE_JPEG_QUALITY, quality)),
    )


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def palette_png_bytes(index: np.ndarray, palette: np.ndarray) -> bytes:
    """An 8-bit palette ("P" mode) PNG, as VOC SegmentationClass files are; OpenCV cannot write one.

    index: (H, W) uint8 palette indices; palette: (256, 3) uint8 RGB.
    """
    if index.dtype != np.uint8 or index.ndim != 2:
        raise ValueError(
            f"palette PNG needs an (H, W) uint8 index image, got {index.shape} {index.dtype}"
        )
    h, w = index.shape
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)  # 8-bit, colour type 3 (palette)
    rows = np.concatenate([np.zeros((h, 1), np.uint8), index], axis=1)  # filter byte 0 per row
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"PLTE", np.ascontiguousarray(palette, dtype=np.uint8).tobytes())
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + _png_chunk(b"IEND", b"")
    )


def mat_bytes(variables: dict) -> bytes:
    """MATLAB v5 .mat bytes (scipy.io.savemat) with a fixed header instead of the creation time."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, do_compression=True, oned_as="column")
    data = bytearray(buf.getvalue())
    text = b"MATLAB 5.0 MAT-file, written by pipeline.synth"
    data[:116] = text.ljust(116, b" ")  # 116-byte descriptive text; the rest of the header stays
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# Drawing helpers.


def _rng(seed: int, split: str, index: int, salt: int = 0) -> np.random.Generator:
    # seeded per sample so a sample does not depend on how many others are generated
    return np.random.default_rng(
        [seed, sum(ord(c) << (8 * i) for i, c in enumerate(split)), index, salt]
    )


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """(H, W) float32 low-frequency noise in about [-1, 1] (bilinear upsampled random grid)."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    grid = rng.uniform(-1, 1, size=(gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _poly_mask(h: int, w: int, poly: np.ndarray) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [poly.astype(np.int32)], 1)
    return mask.astype(bool)


def _random_convex(rng: np.random.Generator, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """A random convex-ish polygon (K, 2) int32 inside the box, covering most of it."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = (x1 - x0) / 2, (y1 - y0) / 2
    k = int(rng.integers(5, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radius = rng.uniform(0.75, 1.0, k)
    xs = np.clip(np.round(cx + rx * radius * np.cos(angles)), x0, x1)
    ys = np.clip(np.round(cy + ry * radius * np.sin(angles)), y0, y1)
    return np.stack([xs, ys], axis=1).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Cityscapes layout (shared by `cityscapes` and `scenes`).

CITIES = {"train": ("aachen", "bochum", "zurich"), "val": ("frankfurt", "lindau", "munster")}
_CS_COLOR_LUT = np.zeros((256, 3), np.uint8)
for _lab in CITYSCAPES_LABELS:
    if _lab.id >= 0:
        _CS_COLOR_LUT[_lab.id] = _lab.color


@dataclass
class CsObject:
    """One polygon of a *_gtFine_polygons.json; drawn in list order, later ones on top."""

    label: str  # a Cityscapes label name, or "<name>group" for a crowd of an instance class
    polygon: np.ndarray  # (K, 2) int32 x, y


def cityscapes_stem(split: str, index: int) -> tuple[str, str]:
    """(city, file stem) of sample `index` of `split`, e.g. ("aachen", "aachen_000003_000019")."""
    cities = CITIES[split]
    city = cities[index % len(cities)]
    return city, f"{city}_{index // len(cities):06d}_000019"


def rasterize_cityscapes(
    objects: Sequence[CsObject], h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """labelIds (H, W) uint8 and instanceIds (H, W) uint16 as cityscapesScripts json2*Img draw them.

    Pixels no polygon covers are 'unlabeled' (0). License plates (id -1) are skipped, so their
    pixels keep the label underneath (the car): the real labelIds never contain them either.
    Instance classes get id * 1000 + k (k counts per class from 0); groups and stuff get the id.
    """
    label_ids = np.zeros((h, w), np.uint8)
    instance_ids = np.zeros((h, w), np.uint16)
    counts: dict[int, int] = {}
    for obj in objects:
        name, group = obj.label, False
        if name not in CITYSCAPES_NAME_TO_LABEL and name.endswith("group"):
            name, group = name[: -len("group")], True
        lab = CITYSCAPES_NAME_TO_LABEL[name]
        if lab.id < 0:
            continue
        poly = [obj.polygon.astype(np.int32)]
        cv2.fillPoly(label_ids, poly, lab.id)
        inst = lab.id
        if lab.has_instances and not group:
            inst = lab.id * 1000 + counts.get(lab.id, 0)
            counts[lab.id] = counts.get(lab.id, 0) + 1
        cv2.fillPoly(instance_ids, poly, inst)
    return label_ids, instance_ids


def write_cityscapes_sample(
    root: Path, split: str, index: int, image: np.ndarray, objects: Sequence[CsObject]
) -> None:
    """Write leftImg8bit + gtFine {labelIds, color, instanceIds, polygons} of one sample."""
    h, w = image.shape[:2]
    city, stem = cityscapes_stem(split, index)
    label_ids, instance_ids = rasterize_cityscapes(objects, h, w)
    color = np.concatenate([_CS_COLOR_LUT[label_ids], np.full((h, w, 1), 255, np.uint8)], axis=2)
    gt = root / "gtFine" / split / city
    write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
    write_png(gt / f"{stem}_gtFine_labelIds.png", label_ids)
    write_png(gt / f"{stem}_gtFine_color.png", color)  # RGBA, like the released files
    write_png(gt / f"{stem}_gtFine_instanceIds.png", instance_ids)  # 16-bit
    polygons = {
        "imgHeight": h,
        "imgWidth": w,
        "objects": [
            {
                "date": "",
                "deleted": 0,
                "id": i,
                "label": o.label,
                "polygon": o.polygon.tolist(),
                "user": "synth",
                "verified": 0,
            }
            for i, o in enumerate(objects)
        ],
    }
    _write_bytes(
        gt / f"{stem}_gtFine_polygons.json", (json.dumps(polygons, indent=4) + "\n").encode()
    )


def _cityscapes_sample(
    root: Path, split: str, index: int, seed: int, size: tuple[int, int]
) -> None:
    """Every one of the 34 ids (0..33) in its own cell over sky/building/road bands."""
    w, h = size
    rng = _rng(seed, split, index)
    horizon = int(h * rng.uniform(0.35, 0.5))
    objects = [
        CsObject("sky", np.array([[0, 0], [w - 1, 0], [w - 1, horizon], [0, horizon]])),
        CsObject(
            "building",
            np.array([[0, horizon // 3], [w // 2, horizon // 4], [w // 2, horizon], [0, horizon]]),
        ),
        CsObject("road", np.array([[0, horizon], [w - 1, horizon], [w - 1, h - 1], [0, h - 1]])),
    ]
    cols, rows = 7, 5  # 35 cells for 34 ids
    cell_w, cell_h = w / cols, h / rows
    cells = rng.permutation(cols * rows)[:34]
    for label_id, cell in enumerate(cells):
        lab = next(lab for lab in CITYSCAPES_LABELS if lab.id == label_id)
        r, c = divmod(int(cell), cols)
        x0, y0 = int(c * cell_w) + 1, int(r * cell_h) + 1
        x1, y1 = int((c + 1) * cell_w) - 2, int((r + 1) * cell_h) - 2
        if lab.has_instances:
            xm = (x0 + x1) // 2
            objects.append(CsObject(lab.name, _random_convex(rng, x0, y0, xm, y1)))
            # odd images hold a crowd ("<name>group") in the second half, as the real data does
            second = lab.name + ("group" if index % 2 else "")
            objects.append(CsObject(second, _random_convex(rng, xm + 1, y0, x1, y1)))
            if lab.name == "car":  # a license plate polygon: listed in the json, not in labelIds
                px, py = (x0 + xm) // 2, (y0 + y1) // 2
                objects.append(
                    CsObject(
                        "license plate",
                        np.array(
                            [[px - 2, py - 1], [px + 2, py - 1], [px + 2, py + 1], [px - 2, py + 1]]
                        ),
                    )
                )
        else:
            objects.append(CsObject(lab.name, _random_convex(rng, x0, y0, x1, y1)))
    label_ids, _ = rasterize_cityscapes(objects, h, w)
    image = _CS_COLOR_LUT[label_ids].astype(np.float32) * 0.8 + 30
    image += rng.normal(0, 8, size=image.shape).astype(np.float32)
    write_cityscapes_sample(root, split, index, np.clip(image, 0, 255).astype(np.uint8), objects)


# ---------------------------------------------------------------------------------------------
# scenes: a learnable street-scene task in Cityscapes layout.
#
# Classes (Cityscapes ids): road 7, sidewalk 8, building 11, pole 17, vegetation 21, sky 23,
# person 24, car 26, plus a thin ego-vehicle strip (1 -> ignore) in some images.  Each class has
# its own colour family and texture, but some cues overlap on purpose: road and sidewalk are both
# grey (tiles and position tell them apart), poles are grey like buildings (shape and what lies
# behind them decide), and some cars are painted blue like the sky or red like clothes (they stand
# on the road). Per-image brightness, per-pixel noise and random layouts keep it from being trivial.


def _texture(
    kind: str, rng: np.random.Generator, h: int, w: int, box: tuple[int, int, int, int]
) -> np.ndarray:
    """(y1-y0+1, x1-x0+1, 3) float32 RGB texture over the object's box (x0, y0, x1, y1) of an
    H x W image; only the box is computed, which keeps 2048x1024 scenes fast."""
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
    bh, bw = yy.shape
    out = np.empty((bh, bw, 3), np.float32)
    if kind == "sky":
        t = np.clip(yy / max(1, y1), 0, 1)[..., None]
        top = np.array([60, 105, 185]) + rng.uniform(-15, 15, 3)
        low = np.array([165, 200, 235]) + rng.uniform(-10, 10, 3)
        out[:] = top * (1 - t) + low * t
    elif kind == "building":
        base = rng.uniform(85, 150) + rng.uniform(-12, 12, 3)
        out[:] = base
        cw, ch = rng.integers(6, 11) * w / 256, rng.integers(7, 12) * h / 128
        win = (((xx - x0) % cw) > cw * 0.45) & (((yy - y0) % ch) > ch * 0.5)
        out[win] = base * 0.45 + np.array([10, 10, 25])
    elif kind == "vegetation":
        base = np.array([55, 115, 40]) + rng.uniform(-15, 15, 3)
        n = _smooth_noise(rng, bh, bw, max(3, w // 40))[..., None]
        out[:] = base + n * np.array([25, 40, 20]) + rng.normal(0, 14, (bh, bw, 1))
    elif kind == "road":
        out[:] = rng.uniform(70, 105) + rng.uniform(-4, 4, 3)
        lane_y = (y0 + y1) / 2 + (y1 - y0) * 0.15
        dash = (np.abs(yy - lane_y) < max(1, h / 128)) & ((xx // max(4, w // 16)) % 2 == 0)
        out[dash] = 225
    elif kind == "sidewalk":
        out[:] = np.array([160, 138, 148]) + rng.uniform(-20, 20) + rng.uniform(-6, 6, 3)
        tile = max(4, w // 32)
        out[((xx % tile) < 1) | ((yy % max(3, tile // 2)) < 1)] *= 0.72
    elif kind == "pole":
        shade = 1 - 0.5 * np.abs((xx - (x0 + x1) / 2) / max(1.0, (x1 - x0) / 2))
        out[:] = (rng.uniform(110, 160) * np.clip(shade, 0.4, 1.0))[..., None]
    elif kind == "person":
        shirt = rng.choice(
            [[200, 40, 50], [170, 60, 150], [220, 120, 40], [150, 30, 30], [90, 40, 120]]
        )
        out[:] = np.asarray(shirt, np.float32) + rng.uniform(-20, 20, 3)
        head = yy < y0 + (y1 - y0) * 0.2
        out[head] = np.array([225, 180, 150]) + rng.uniform(-20, 20, 3)
        legs = yy > y0 + (y1 - y0) * 0.62
        out[legs] = np.array([45, 45, 70]) + rng.uniform(-15, 15, 3)
    elif kind == "car":
        paints = [
            [30, 40, 130],
            [20, 20, 25],
            [200, 200, 205],
            [150, 155, 160],
            [60, 120, 200],
            [180, 25, 30],
        ]
        body = np.asarray(paints[int(rng.integers(len(paints)))], np.float32)
        out[:] = body + rng.uniform(-15, 15, 3)
        cabin = yy < y0 + (y1 - y0) * 0.45
        window = (
            cabin
            & (xx > x0 + (x1 - x0) * 0.25)
            & (xx < x1 - (x1 - x0) * 0.2)
            & (yy > y0 + (y1 - y0) * 0.08)
        )
        out[window] = np.array([40, 55, 75])
        r = max(2.0, (y1 - y0) * 0.22)
        for wx in (x0 + (x1 - x0) * 0.22, x1 - (x1 - x0) * 0.22):
            out[(xx - wx) ** 2 + (yy - (y1 - r)) ** 2 < r * r] = 15
    elif kind == "ego vehicle":
        out[:] = np.array([50, 40, 45])
    else:
        raise ValueError(f"no texture for {kind!r}")
    return out


def scenes_objects(rng: np.random.Generator, w: int, h: int) -> list[CsObject]:
    """The polygons of one random street scene, back to front."""
    sx, sy = w / 256, h / 128
    horizon = int(h * rng.uniform(0.42, 0.58))
    walk_l = horizon + int(h * rng.uniform(0.08, 0.16))
    walk_r = horizon + int(h * rng.uniform(0.08, 0.16))
    objs = [CsObject("sky", np.array([[0, 0], [w - 1, 0], [w - 1, horizon], [0, horizon]]))]
    x = 0
    while x < w:  # skyline of buildings (flat roofs) and trees (bumpy crowns)
        seg = int(rng.uniform(22, 64) * sx)
        x1 = min(w - 1, x + seg)
        top = int(rng.uniform(0.06 * h, horizon - 0.12 * h))
        if rng.random() < 0.6:
            objs.append(
                CsObject("building", np.array([[x, top], [x1, top], [x1, horizon], [x, horizon]]))
            )
        else:
            bumps = np.linspace(x, x1, int(rng.integers(3, 6)))
            crown = [[int(bx), int(top + rng.uniform(0, 0.12 * h))] for bx in bumps]
            objs.append(CsObject("vegetation", np.array([*crown, [x1, horizon], [x, horizon]])))
        x = x1 + 1
    objs.append(
        CsObject(
            "sidewalk", np.array([[0, horizon], [w - 1, horizon], [w - 1, walk_r], [0, walk_l]])
        )
    )
    objs.append(
        CsObject("road", np.array([[0, walk_l], [w - 1, walk_r], [w - 1, h - 1], [0, h - 1]]))
    )
    for _ in range(int(rng.integers(0, 3))):
        pw = max(4, int(rng.uniform(6, 10) * sx))  # >= ~1 feature cell at stride 8
        px = int(rng.uniform(0, w - pw))
        bottom = horizon + int((min(walk_l, walk_r) - horizon) * 0.7)
        top = int(rng.uniform(0.08 * h, horizon - 0.15 * h))
        objs.append(
            CsObject("pole", np.array([[px, top], [px + pw, top], [px + pw, bottom], [px, bottom]]))
        )
    things: list[tuple[int, CsObject]] = []
    for _ in range(int(rng.integers(1, 4))):  # persons stand on the sidewalk
        ph = int(rng.uniform(0.22, 0.34) * h)
        hw = max(3, int(ph * rng.uniform(0.14, 0.19)))
        cx = int(rng.uniform(hw, w - hw))
        foot = int(rng.uniform(horizon + 2, min(walk_l, walk_r)))
        top = foot - ph
        y_neck, y_sh, y_hip = top + int(0.2 * ph), top + int(0.23 * ph), top + int(0.6 * ph)
        hh = max(2, int(hw * 0.45))
        poly = np.array(
            [
                [cx - hh, top],
                [cx + hh, top],
                [cx + hh, y_neck],
                [cx + hw, y_sh],
                [cx + hw, y_hip],
                [cx + int(hw * 0.7), foot],
                [cx - int(hw * 0.7), foot],
                [cx - hw, y_hip],
                [cx - hw, y_sh],
                [cx - hh, y_neck],
            ]
        )
        things.append((foot, CsObject("person", poly)))
    for _ in range(int(rng.integers(1, 4))):  # cars stand on the road
        cw = int(rng.uniform(0.15, 0.26) * w)
        ch = int(cw * rng.uniform(0.38, 0.5) * sy / sx)
        cx0 = int(rng.uniform(0, w - cw))
        bottom = int(rng.uniform(max(walk_l, walk_r) + ch * 0.5, h - 1))
        top = bottom - ch
        roof = top + int(0.45 * ch)
        poly = np.array(
            [
                [cx0 + int(cw * 0.2), top],
                [cx0 + int(cw * 0.8), top],
                [cx0 + int(cw * 0.92), roof],
                [cx0 + cw, roof],
                [cx0 + cw, bottom],
                [cx0, bottom],
                [cx0, roof],
                [cx0 + int(cw * 0.1), roof],
            ]
        )
        things.append((bottom, CsObject("car", poly)))
    objs.extend(obj for _, obj in sorted(things, key=lambda t: t[0]))  # nearer (lower) on top
    if rng.random() < 0.5:
        eh = int(rng.uniform(2, 6) * sy)
        objs.append(
            CsObject(
                "ego vehicle",
                np.array([[0, h - 1 - eh], [w - 1, h - 1 - eh], [w - 1, h - 1], [0, h - 1]]),
            )
        )
    return objs


def _scenes_sample(root: Path, split: str, index: int, seed: int, size: tuple[int, int]) -> None:
    w, h = size
    rng = _rng(seed, split, index)
    objects = scenes_objects(rng, w, h)
    image = np.zeros((h, w, 3), np.float32)
    for obj in objects:
        x0, y0 = np.clip(obj.polygon.min(axis=0), 0, None)
        x1, y1 = np.minimum(obj.polygon.max(axis=0), (w - 1, h - 1))
        box = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        mask = _poly_mask(h, w, obj.polygon)[box]
        texture = _texture(obj.label, rng, h, w, (int(x0), int(y0), int(x1), int(y1)))
        image[box][mask] = texture[mask]
    image = image * rng.uniform(0.8, 1.2) + rng.uniform(-15, 15)  # exposure
    image += rng.normal(0, 7, size=image.shape).astype(np.float32)
    write_cityscapes_sample(root, split, index, np.clip(image, 0, 255).astype(np.uint8), objects)


# ---------------------------------------------------------------------------------------------
# context: the scenes layout, where some regions need same-class context from the whole image.
#
# Each image deals the 8 scene classes a random permutation of CONTEXT_PALETTE: every region of a
# class is painted in that image's colour for the class, so colour names no class across images
# but links the regions of one class within an image. Ordinary regions keep their class's shape,
# position and texture pattern (as brightness), so they stay recognisable. On top lie 3-6 flat,
# untextured rectangles ("patches"), each of a class that has a region in the image and painted
# in its colour: locally a patch could be any class; it is labelled only by matching its colour
# to the recognisable regions of the same class elsewhere in the image.

CONTEXT_CLASSES = (
    "sky",
    "building",
    "vegetation",
    "road",
    "sidewalk",
    "pole",
    "person",
    "car",
)
CONTEXT_PALETTE = np.array(
    [
        [205, 60, 60],
        [60, 165, 75],
        [65, 95, 205],
        [215, 195, 60],
        [170, 70, 195],
        [60, 185, 195],
        [235, 140, 55],
        [145, 145, 145],
    ],
    np.float32,
)  # RGB, one per class of CONTEXT_CLASSES after the per-image permutation


def context_colors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The per-image colour of each class: a random permutation of CONTEXT_PALETTE."""
    order = rng.permutation(len(CONTEXT_PALETTE))
    return {name: CONTEXT_PALETTE[i] for name, i in zip(CONTEXT_CLASSES, order, strict=True)}


def _context_patches(
    rng: np.random.Generator, w: int, h: int, present: Sequence[str]
) -> list[CsObject]:
    """3-6 axis-aligned rectangles of classes in `present`, anywhere in the image."""
    sx, sy = w / 256, h / 128
    patches = []
    for _ in range(int(rng.integers(3, 7))):
        pw, ph = int(rng.uniform(14, 28) * sx), int(rng.uniform(12, 22) * sy)
        x0, y0 = int(rng.uniform(0, w - pw)), int(rng.uniform(0, h - ph))
        name = present[int(rng.integers(len(present)))]
        patches.append(
            CsObject(name, np.array([[x0, y0], [x0 + pw, y0], [x0 + pw, y0 + ph], [x0, y0 + ph]]))
        )
    return patches


def _context_sample(root: Path, split: str, index: int, seed: int, size: tuple[int, int]) -> None:
    w, h = size
    rng = _rng(seed, split, index)
    colors = context_colors(rng)
    objects = scenes_objects(rng, w, h)
    present = sorted({o.label for o in objects if o.label in colors})
    patches = _context_patches(rng, w, h, present)
    image = np.zeros((h, w, 3), np.float32)
    for obj in [*objects, *patches]:
        x0, y0 = np.clip(obj.polygon.min(axis=0), 0, None)
        x1, y1 = np.minimum(obj.polygon.max(axis=0), (w - 1, h - 1))
        box = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        mask = _poly_mask(h, w, obj.polygon)[box]
        if obj.label not in colors:  # the ego-vehicle strip (ignored) keeps its own look
            paint = _texture(obj.label, rng, h, w, (int(x0), int(y0), int(x1), int(y1)))
        elif any(obj is p for p in patches):
            paint = np.broadcast_to(colors[obj.label], (*mask.shape, 3))
        else:  # the class's texture pattern as brightness, in the image's colour for the class
            texture = _texture(obj.label, rng, h, w, (int(x0), int(y0), int(x1), int(y1)))
            lum = texture.mean(-1, keepdims=True)
            # Relative to the median, so most of a region shows the colour itself; the cap keeps
            # bright details from clipping into another palette colour.
            shade = lum / max(1.0, float(np.median(lum)))
            paint = colors[obj.label] * np.clip(shade, 0.45, 1.25)
        image[box][mask] = paint[mask]
    image = image * rng.uniform(0.85, 1.15) + rng.uniform(-10, 10)  # exposure
    image += rng.normal(0, 7, size=image.shape).astype(np.float32)
    objects = [*objects, *patches]
    write_cityscapes_sample(root, split, index, np.clip(image, 0, 255).astype(np.uint8), objects)


# ---------------------------------------------------------------------------------------------
# Generic "objects on a textured background" label maps for VOC and COCO-Stuff.


def _image_size(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int]:
    w, h = size  # images vary between 3/4 of the size and the size, as real photos vary
    return int(rng.integers(max(8, w * 3 // 4), w + 1)), int(
        rng.integers(max(8, h * 3 // 4), h + 1)
    )


def _blob_label_map(
    rng: np.random.Generator, w: int, h: int, background: int, classes: Sequence[int], n: int
) -> np.ndarray:
    """(H, W) int32 map: `background` with `n` convex blobs of classes drawn from `classes`."""
    label = np.full((h, w), background, np.int32)
    for _ in range(n):
        bw, bh = int(rng.uniform(0.3, 0.6) * w), int(rng.uniform(0.3, 0.6) * h)
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        cv2.fillPoly(
            label, [_random_convex(rng, x0, y0, x0 + bw, y0 + bh)], int(rng.choice(classes))
        )
    return label


def _render_from_colors(
    rng: np.random.Generator, label: np.ndarray, colors: np.ndarray
) -> np.ndarray:
    """(H, W, 3) uint8 RGB: each class's colour + smooth shading + noise."""
    h, w = label.shape
    image = colors[np.clip(label, 0, len(colors) - 1)].astype(np.float32) * 0.75 + 30
    image += _smooth_noise(rng, h, w, 16)[..., None] * 20
    image += rng.normal(0, 6, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# PASCAL VOC 2012 + SBD.

VOC_COLORMAP = voc_colormap(256)


def voc_image_id(index: int) -> str:
    return f"2008_{index:06d}"


@dataclass
class VocPlan:
    """Which ids go where: VOC train/val, SBD train/val (overlapping VOC val on purpose)."""

    voc_train: list[str]
    voc_val: list[str]
    sbd_train: list[str]
    sbd_val: list[str]
    train_aug: list[str] = field(default_factory=list)  # (SBD train+val + VOC train) - VOC val

    @classmethod
    def build(cls, n_train: int, n_val: int) -> VocPlan:
        ids = [voc_image_id(i) for i in range(n_train + n_val + max(2, n_train // 2))]
        voc_train, voc_val = ids[:n_train], ids[n_train : n_train + n_val]
        sbd_only = ids[n_train + n_val :]
        # SBD covers half of VOC train, half of VOC val (these must be dropped from train_aug)
        # and images VOC segmentation does not annotate; both SBD splits hold some VOC val ids.
        others = sorted(voc_train[::2] + sbd_only)
        val_in_sbd = voc_val[::2]
        sbd_train = others[::3] + others[1::3] + val_in_sbd[0::2]
        sbd_val = others[2::3] + val_in_sbd[1::2]
        plan = cls(voc_train, voc_val, sorted(sbd_train), sorted(sbd_val))
        plan.train_aug = sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))
        return plan


def _voc_label(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return _blob_label_map(rng, w, h, 0, range(1, 21), int(rng.integers(1, 4))).astype(np.uint8)


def _voc_with_border(label: np.ndarray) -> np.ndarray:
    """VOC draws a void (255) band about 5 px wide along every object outline."""
    kernel = np.ones((5, 5), np.uint8)
    edge = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
    out = label.copy()
    out[edge] = 255
    return out


def _sbd_mat(label: np.ndarray) -> bytes:
    """GTcls as in SBD's cls/*.mat: 1x1 struct {Segmentation, Boundaries, CategoriesPresent}."""
    kernel = np.ones((3, 3), np.uint8)
    edge = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
    boundaries = np.empty((20, 1), dtype=object)
    for c in range(1, 21):
        boundaries[c - 1, 0] = scipy.sparse.csc_matrix(
            edge & (cv2.dilate((label == c).astype(np.uint8), kernel) > 0)
        )
    present = np.array(sorted(set(np.unique(label).tolist()) - {0}), np.uint8).reshape(-1, 1)
    return mat_bytes(
        {"GTcls": {"Segmentation": label, "Boundaries": boundaries, "CategoriesPresent": present}}
    )


def _voc_sample(root: Path, plan: VocPlan, image_id: str, seed: int, size: tuple[int, int]) -> None:
    rng = _rng(seed, "voc", int(image_id.split("_")[1]))
    w, h = _image_size(rng, size)
    label = _voc_label(rng, w, h)
    image = _render_from_colors(
        rng, label, VOC_COLORMAP[:21].astype(np.int32) // 2 + np.array([60, 70, 80])
    )
    voc = root / "VOC2012"
    write_jpg(voc / "JPEGImages" / f"{image_id}.jpg", image)
    if image_id in plan.voc_train or image_id in plan.voc_val:
        png = palette_png_bytes(_voc_with_border(label), VOC_COLORMAP)
        _write_bytes(voc / "SegmentationClass" / f"{image_id}.png", png)
    if image_id in plan.sbd_train or image_id in plan.sbd_val:
        sbd = root / "SBD" / "dataset"
        write_jpg(sbd / "img" / f"{image_id}.jpg", image)
        _write_bytes(sbd / "cls" / f"{image_id}.mat", _sbd_mat(label))


def _write_list(path: Path, ids: Sequence[str]) -> None:
    _write_bytes(path, "".join(f"{i}\n" for i in ids).encode())


# ---------------------------------------------------------------------------------------------
# COCO-Stuff.

COCOSTUFF_USED_IDS = tuple(i for i in range(182) if i not in COCOSTUFF_UNUSED_IDS)  # 0-based
_COCO_COLORS = np.array(
    [[(i * 67) % 200 + 30, (i * 131) % 200 + 30, (i * 29) % 200 + 30] for i in range(182)], np.int32
)


def _coco_label(rng: np.random.Generator, w: int, h: int, index: int) -> np.ndarray:
    """(H, W) int32 0-based ids with 255 = unlabeled; the set cycles through all 171 used ids."""
    start = (index * 7) % len(COCOSTUFF_USED_IDS)
    classes = [COCOSTUFF_USED_IDS[(start + k) % len(COCOSTUFF_USED_IDS)] for k in range(7)]
    label = _blob_label_map(rng, w, h, classes[0], classes[1:], 4)
    # a stroke of unlabeled pixels, as annotation gaps in the real data
    y = int(rng.integers(0, h))
    label[max(0, y - 1) : y + 2, : w // 2] = 255
    return label


def _coco164k_sample(root: Path, split: str, index: int, seed: int, size: tuple[int, int]) -> None:
    rng = _rng(seed, split, index)
    w, h = _image_size(rng, size)
    label = _coco_label(rng, w, h, index)
    image = _render_from_colors(rng, label, _COCO_COLORS)
    stem = cocostuff164k_stem(split, index)
    write_jpg(root / "images" / f"{split}2017" / f"{stem}.jpg", image)
    write_png(root / "stuffthingmaps" / f"{split}2017" / f"{stem}.png", label.astype(np.uint8))


def cocostuff164k_stem(split: str, index: int) -> str:
    return f"{(index * 2 + (split == 'val')) + 9:012d}"


def cocostuff10k_stem(split: str, index: int) -> str:
    return f"COCO_{'train' if split == 'train' else 'val'}2014_{index * 2 + 77:012d}"


_COCO_NAMES_CELL = np.empty((1, 182), dtype=object)
for _i, _name in enumerate(COCOSTUFF_182_NAMES):
    _COCO_NAMES_CELL[0, _i] = _name


def _coco10k_sample(root: Path, split: str, index: int, seed: int, size: tuple[int, int]) -> None:
    rng = _rng(seed, split, index)
    w, h = _image_size(rng, size)
    label = _coco_label(rng, w, h, index)
    image = _render_from_colors(rng, label, _COCO_COLORS)
    s = np.where(label == 255, 0, label + 1).astype(np.uint16)  # 1-based, 0 = unlabeled
    stem = cocostuff10k_stem(split, index)
    write_jpg(root / "images" / f"{stem}.jpg", image)
    _write_bytes(
        root / "annotations" / f"{stem}.mat", mat_bytes({"S": s, "names": _COCO_NAMES_CELL})
    )


# ---------------------------------------------------------------------------------------------
# ADE20K, the SceneParse150 release: ADEChallengeData2016/{images,annotations}/{training,validation}
# with ADE_{train,val}_%08d.{jpg,png} (ids 0 = other, 1..150), objectInfo150.csv and
# sceneCategories.txt at the root.

ADE20K_ROOT = "ADEChallengeData2016"
ADE20K_SPLITS = {"train": "training", "val": "validation"}
_ADE_COLORS = np.array(
    [[(i * 53) % 200 + 30, (i * 97) % 200 + 30, (i * 151) % 200 + 30] for i in range(151)], np.int32
)


def ade20k_stem(split: str, index: int) -> str:
    """ADE_train_00000001 (1-based, as released) for train/val index 0."""
    return f"ADE_{split}_{index + 1:08d}"


def _ade20k_label(rng: np.random.Generator, w: int, h: int, index: int) -> np.ndarray:
    """(H, W) int32 ids: a background class, objects, and an unlabeled ("other", 0) stroke."""
    n = len(ADE20K_CLASS_NAMES)
    classes = [1 + (index * 11 + k) % n for k in range(6)]  # cycles through all 150 ids
    label = _blob_label_map(rng, w, h, classes[0], classes[1:], 3)
    x = int(rng.integers(0, w))
    label[: h // 2, max(0, x - 1) : x + 2] = 0
    return label


def _ade20k_sample(root: Path, split: str, index: int, seed: int, size: tuple[int, int]) -> None:
    rng = _rng(seed, split, index)
    w, h = _image_size(rng, size)
    label = _ade20k_label(rng, w, h, index)
    image = _render_from_colors(rng, label, _ADE_COLORS)
    stem, folder = ade20k_stem(split, index), ADE20K_SPLITS[split]
    write_jpg(root / ADE20K_ROOT / "images" / folder / f"{stem}.jpg", image)
    write_png(root / ADE20K_ROOT / "annotations" / folder / f"{stem}.png", label.astype(np.uint8))


def _ade20k_index_files(root: Path, n_train: int, n_val: int) -> None:
    rows = [f"{i + 1},0.0,0,0,{name}" for i, name in enumerate(ADE20K_CLASS_NAMES)]
    _write_bytes(
        root / ADE20K_ROOT / "objectInfo150.csv",
        ("Idx,Ratio,Train,Val,Name\n" + "".join(f"{r}\n" for r in rows)).encode(),
    )
    stems = [ade20k_stem("train", i) for i in range(n_train)]
    stems += [ade20k_stem("val", i) for i in range(n_val)]
    _write_bytes(
        root / ADE20K_ROOT / "sceneCategories.txt", "".join(f"{s} street\n" for s in stems).encode()
    )


# ---------------------------------------------------------------------------------------------
# Driver.


def _run_tasks(
    tasks: list[tuple[Callable, tuple]], workers: int, progress: bool, desc: str
) -> None:
    bar = tqdm(
        total=len(tasks), desc=desc, unit="img", disable=None if progress else True, file=sys.stderr
    )  # None: a bar on a terminal only
    if workers <= 1:
        for fn, args in tasks:
            fn(*args)
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for fut in [pool.submit(fn, *args) for fn, args in tasks]:
                fut.result()
                bar.update(1)
    bar.close()


def _plan(
    dataset: str, root: Path, n_train: int, n_val: int, seed: int, size: tuple[int, int]
) -> tuple[list[tuple[Callable, tuple]], dict[str, int]]:
    """(tasks, expected sample counts per split) for one dataset."""
    if dataset in ("cityscapes", "scenes", "context"):
        fn = {"cityscapes": _cityscapes_sample, "scenes": _scenes_sample}.get(
            dataset, _context_sample
        )
        tasks = [
            (fn, (root, s, i, seed, size))
            for s, n in (("train", n_train), ("val", n_val))
            for i in range(n)
        ]
        return tasks, {"train": n_train, "val": n_val}
    if dataset == "voc":
        plan = VocPlan.build(n_train, n_val)
        all_ids = sorted(set(plan.voc_train + plan.voc_val + plan.sbd_train + plan.sbd_val))
        tasks = [(_voc_sample, (root, plan, i, seed, size)) for i in all_ids]
        seg = root / "VOC2012" / "ImageSets" / "Segmentation"
        _write_list(seg / "train.txt", plan.voc_train)
        _write_list(seg / "val.txt", plan.voc_val)
        _write_list(seg / "trainval.txt", sorted(plan.voc_train + plan.voc_val))
        _write_list(root / "SBD" / "dataset" / "train.txt", plan.sbd_train)
        _write_list(root / "SBD" / "dataset" / "val.txt", plan.sbd_val)
        counts = {"train": n_train, "val": n_val, "train_aug": len(plan.train_aug)}
        return tasks, {**counts, "sbd_train": len(plan.sbd_train), "sbd_val": len(plan.sbd_val)}
    if dataset == "cocostuff10k":
        for split, n in (("train", n_train), ("test", n_val)):
            _write_list(
                root / "imageLists" / f"{split}.txt",
                [cocostuff10k_stem(split, i) for i in range(n)],
            )
        _write_list(
            root / "imageLists" / "all.txt",
            sorted(
                cocostuff10k_stem(s, i)
                for s, n in (("train", n_train), ("test", n_val))
                for i in range(n)
            ),
        )
        tasks = [
            (_coco10k_sample, (root, s, i, seed, size))
            for s, n in (("train", n_train), ("test", n_val))
            for i in range(n)
        ]
        return tasks, {"train": n_train, "test": n_val}
    if dataset == "ade20k":
        _ade20k_index_files(root, n_train, n_val)
        tasks = [
            (_ade20k_sample, (root, s, i, seed, size))
            for s, n in (("train", n_train), ("val", n_val))
            for i in range(n)
        ]
        return tasks, dict(zip(ADE20K_SPLITS.values(), (n_train, n_val), strict=True))
    if dataset == "cocostuff164k":
        tasks = [
            (_coco164k_sample, (root, s, i, seed, size))
            for s, n in (("train", n_train), ("val", n_val))
            for i in range(n)
        ]
        return tasks, {"train": n_train, "val": n_val}
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def generate(
    dataset: str,
    out: str | os.PathLike,
    *,
    train: int | None = None,
    val: int | None = None,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write a synthetic `dataset` in its original layout under `out`; returns the root.

    `val` is the second split: val for cityscapes/scenes/voc/cocostuff164k, test for
    cocostuff10k. `size` = (width, height); VOC/COCO images vary between 3/4 of it and it.
    An existing non-empty `out` is refused unless `overwrite`, and then only if it was
    written by this generator (it holds SYNTH_INFO.json). The new dataset replaces it whole.
    """
    if dataset not in DEFAULTS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    d = DEFAULTS[dataset]
    n_train, n_val = (d.train if train is None else train), (d.val if val is None else val)
    size = d.size if size is None else tuple(size)  # type: ignore[assignment]
    if n_train < 0 or n_val < 0 or n_train + n_val == 0:
        raise ValueError(
            f"need non-negative split sizes and at least one sample, got train={n_train} val={n_val}"
        )
    if len(size) != 2 or min(size) < 32 or max(size) > 8192:
        raise ValueError(f"image size must be WIDTHxHEIGHT with sides in 32..8192, got {size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out}: directory is not empty (pass --overwrite to replace a dataset written by pipeline.synth)"
            )
        if not (out / INFO_FILE).is_file():
            raise FileExistsError(
                f"{out}: refusing to replace a directory without {INFO_FILE}: it was not written by pipeline.synth"
            )

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tasks, counts = _plan(dataset, tmp, n_train, n_val, seed, size)  # type: ignore[arg-type]
        _run_tasks(tasks, workers, progress, f"synth {dataset}")
        info = {
            "generator": "pipeline.synth",
            "version": GENERATOR_VERSION,
            "dataset": dataset,
            "seed": seed,
            "size": list(size),
            "num_samples": counts,
        }
        _write_bytes(tmp / INFO_FILE, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _size_arg(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like 256x128 (WIDTHxHEIGHT), got {text!r}"
        ) from None
    return w, h


def main(argv: Sequence[str] | None = None) -> int:
    defaults = "; ".join(
        f"{k}: --train {v.train} --val {v.val} --size {v.size[0]}x{v.size[1]}"
        for k, v in DEFAULTS.items()
    )
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.synth",
        description=(
            "Write a small synthetic dataset in the ORIGINAL layout of a real one, for tests and "
            "the demo. cityscapes: leftImg8bit/ + gtFine/ (labelIds, color RGBA, instanceIds "
            "16-bit, polygons.json), all 34 label ids in every image (license plates only in the "
            "json, as in the real labelIds). voc: VOC2012/ (JPEGImages, palette PNGs with the 255 "
            "border, ImageSets/Segmentation) + SBD/dataset/ (cls/*.mat GTcls, train.txt, val.txt; "
            "SBD holds half of VOC train, half of VOC val and max(2, train/2) images of its own). "
            "cocostuff10k: images/, annotations/*.mat (S 1-based, names), "
            "imageLists/{train,test,all}.txt. cocostuff164k: images/{train,val}2017/*.jpg + "
            "stuffthingmaps/{train,val}2017/*.png (0-based ids, 255 unlabeled). scenes: a "
            "learnable street-scene task in Cityscapes layout (road, sidewalk, building, pole, "
            "vegetation, sky, person, car). ade20k: ADEChallengeData2016/images/{training,validation}/"
            "*.jpg + annotations/{training,validation}/*.png (0 = other, 1..150), objectInfo150.csv, "
            "sceneCategories.txt. context: the scenes layout with a per-image colour per "
            "class and flat patches that only same-class regions elsewhere in the image identify. "
            "Output is byte-identical for the same arguments."
        ),
        epilog=f"Defaults: {defaults}.",
    )
    parser.add_argument("dataset", choices=DATASETS, help="which layout to write")
    parser.add_argument(
        "--out", required=True, type=Path, help="output directory (must be absent or empty)"
    )
    parser.add_argument("--train", type=int, help="number of train images (default per dataset)")
    parser.add_argument(
        "--val", type=int, help="number of val images (test images for cocostuff10k)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--size",
        type=_size_arg,
        help="image WIDTHxHEIGHT, e.g. 2048x1024 for full Cityscapes resolution; VOC/COCO images vary from 3/4 of it up to it",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes to generate with (default 1)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out, only if it was written by this generator (has SYNTH_INFO.json)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        root = generate(
            args.dataset,
            args.out,
            train=args.train,
            val=args.val,
            seed=args.seed,
            size=args.size,
            overwrite=args.overwrite,
            workers=args.workers,
            progress=not args.quiet,
        )
    except (ValueError, FileExistsError) as exc:
        parser.exit(2, f"pipeline.synth: error: {exc}\n")
    counts = json.loads((root / INFO_FILE).read_text())["num_samples"]
    print(f"wrote {args.dataset} to {root}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
