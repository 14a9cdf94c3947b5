"""Pictures for MLflow: colour masks, overlays, confusion matrices and the paper's Fig. 4 / Fig. 6.

All picture functions return RGB uint8 arrays (H, W', 3) except ``confusion_figure`` (a
matplotlib Figure, drawn on the Agg canvas; pyplot is not used).
Legend: H x W image, h x w feature grid, M classes, C channels.

- Fig. 4 style (``sampling_picture``): the dynamic-sampling node set V_m of one class drawn on
  the image, each feature-grid node as the block of image pixels it covers (nearest resize):
  easy positives (C_m and G_m) green, hard positives (G_m only) red, hard negatives (C_m only)
  blue; pixels outside V_m show the dimmed image, so a marker colour never occurs by chance.
- Fig. 6 style (``feature_picture``): image | ground truth | feature X | refined feature R, the
  two features shown as their first principal component over the pixels of one class (PCA per
  feature), min-max scaled inside the class and drawn with a colour map; other pixels grey.
- Both carry a legend strip below the panels (``legend``): the class by name and palette colour,
  the marker colours of the three parts (Fig. 4), the classes of the ground truth (Fig. 6).
- ``pictures_for_sample`` draws them from what ``launch.evaluation.picture_inputs`` took from one
  forward of the model; nothing here runs the model or re-derives the module's node sets.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import matplotlib
import numpy as np
from matplotlib.figure import Figure  # pyplot-free: no global backend or figure registry

from cdgcnet.labels import LabelSpec
from pipeline.atomic import write_atomic

EASY_COLOUR = (0, 255, 0)
HARD_POS_COLOUR = (255, 0, 0)
HARD_NEG_COLOUR = (0, 0, 255)
OUTSIDE_GREY = (64, 64, 64)
PART_COLOURS = {"easy": EASY_COLOUR, "hard_pos": HARD_POS_COLOUR, "hard_neg": HARD_NEG_COLOUR}
PART_NAMES = {"easy": "easy positive", "hard_pos": "hard positive", "hard_neg": "hard negative"}
LEGEND_BACKGROUND = (255, 255, 255)
_DIM = 0.35  # dimmed image stays <= 90 per channel, below every marker colour's 255


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_colour=(0, 0, 0)):
    """(H, W) class ids -> (H, W, 3) uint8 RGB; ids outside the palette get ignore_colour."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:] = ignore_colour
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"colorize: mask must be (H, W), got shape {mask.shape}")
    if mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError("colorize: mask ids must lie in 0..255")
    return table[mask.astype(np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised mask over an (H, W, 3) uint8 RGB image."""
    _check_image(image, mask.shape)
    colour = colorize(mask, palette).astype(np.float32)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def prediction_panel(image: np.ndarray, label: np.ndarray, pred: np.ndarray, palette) -> np.ndarray:
    """image | ground truth | prediction | overlay, side by side: (H, 4W, 3)."""
    _check_image(image, pred.shape)
    return np.concatenate(
        [image, colorize(label, palette), colorize(pred, palette), overlay(image, pred, palette)],
        axis=1,
    )


def sampling_picture(image: np.ndarray, parts: dict[str, np.ndarray]) -> np.ndarray:
    """Fig. 4 style: (H, W, 3) dimmed image with the node-set cells painted by part."""
    h_img, w_img = image.shape[:2]
    _check_image(image, (h_img, w_img))
    out = np.rint(image.astype(np.float32) * _DIM).astype(np.uint8)
    for name, grid in parts.items():
        cells = upsample_mask(grid, (h_img, w_img))
        out[cells] = PART_COLOURS[name]
    return out


def upsample_mask(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) bool -> (H, W) bool by nearest neighbour (the same rule as cv2 INTER_NEAREST)."""
    resized = cv2.resize(grid.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return resized.astype(bool)


def first_component(feature: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """First principal component of a (C, h, w) feature over the pixels in mask -> (h, w).

    Scaled to [0, 1] inside the mask (0 elsewhere). The sign of a principal direction is
    arbitrary; it is fixed so the largest-magnitude projection is positive.
    """
    c, h, w = feature.shape
    out = np.zeros((h, w), dtype=np.float32)
    if mask.sum() < 2:
        return out
    x = feature.reshape(c, -1).T[mask.reshape(-1)].astype(np.float64)  # (n, C)
    x = x - x.mean(0, keepdims=True)
    # Right singular vector of the centred pixels = first PCA direction.
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[0]
    if np.abs(proj.max()) < np.abs(proj.min()):
        proj = -proj
    span = proj.max() - proj.min()
    scaled = (proj - proj.min()) / span if span > 0 else np.zeros_like(proj)
    out.reshape(-1)[mask.reshape(-1)] = scaled
    return out


def feature_picture(
    image: np.ndarray,
    label: np.ndarray,
    feature: np.ndarray,
    refined: np.ndarray,
    class_mask: np.ndarray,
    palette,
) -> np.ndarray:
    """Fig. 6 style: image | ground truth | X (first PC in class) | R (first PC) -> (H, 4W, 3).

    label (H, W) train ids; feature, refined (C, h, w) on the feature grid; class_mask (h, w)
    bool: the grid cells of the class (the ground truth as the CDGC module resizes it).
    """
    h_img, w_img = label.shape
    _check_image(image, label.shape)
    panels = [image, colorize(label, palette)]
    cmap = matplotlib.colormaps["viridis"]
    inside = upsample_mask(class_mask, (h_img, w_img))
    for f in (feature, refined):
        pc = first_component(f, class_mask)  # (h, w)
        pc_img = cv2.resize(pc, (w_img, h_img), interpolation=cv2.INTER_NEAREST)
        rgb = (cmap(pc_img)[..., :3] * 255).round().astype(np.uint8)
        rgb[~inside] = OUTSIDE_GREY
        panels.append(rgb)
    return np.concatenate(panels, axis=1)


def legend(width: int, entries: Sequence[tuple[str, Sequence[int]]]) -> np.ndarray:
    """A white (h, width, 3) strip of colour swatches with their names, wrapped into rows."""
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1
    row_h, swatch, gap = 16, 10, 8
    placed, x, row = [], gap // 2, 0
    for text, colour in entries:
        text_w = cv2.getTextSize(text, font, scale, thick)[0][0]
        item_w = swatch + 4 + text_w + gap
        if x > gap // 2 and x + item_w > width:  # wrap; an item wider than a row gets its own
            x, row = gap // 2, row + 1
        placed.append((x, row, text, colour))
        x += item_w
    out = np.empty((row_h * (row + 1) + 2, width, 3), np.uint8)
    out[:] = LEGEND_BACKGROUND
    for x, row, text, colour in placed:
        top = row * row_h + 3
        out[top : top + swatch, x : x + swatch] = colour
        cv2.putText(out, text, (x + swatch + 4, top + swatch - 1), font, scale, (0, 0, 0), thick)
    return out


def with_legend(picture: np.ndarray, entries: Sequence[tuple[str, Sequence[int]]]) -> np.ndarray:
    """The picture with its legend strip below: (H + h, W, 3)."""
    return np.concatenate([picture, legend(picture.shape[1], entries)], axis=0)


def confusion_figure(mat: np.ndarray, class_names: Sequence[str], normalize: bool = True) -> Figure:
    """Row-normalised (recall) confusion matrix plot; rows = ground truth, cols = prediction."""
    m = len(class_names)
    mat = np.asarray(mat, dtype=np.float64)
    if mat.shape != (m, m):
        raise ValueError(f"confusion_figure: matrix {mat.shape} does not fit {m} class names")
    if normalize:
        rows = mat.sum(1, keepdims=True)
        mat = np.divide(mat, rows, out=np.zeros_like(mat), where=rows > 0)
    size = min(4 + 0.35 * m, 24)  # inches; COCO-Stuff's 171 classes stay legible-ish
    fig = Figure(figsize=(size, size), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mat, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(m)
    fontsize = 8 if m <= 40 else 4
    ax.set_xticks(ticks, labels=list(class_names), rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels=list(class_names), fontsize=fontsize)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if m <= 30:
        for i in range(m):
            for j in range(m):
                if mat[i, j] >= 0.01:
                    colour = "white" if mat[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=5, color=colour
                    )
    fig.tight_layout()
    return fig


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB (or single-channel) uint8 array as PNG atomically."""
    arr = rgb[..., ::-1] if rgb.ndim == 3 else rgb  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    write_atomic(path, buf.tobytes())


def _check_image(image: np.ndarray, shape: Sequence[int]) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    if tuple(image.shape[:2]) != tuple(shape):
        raise ValueError(f"image {image.shape[:2]} and mask {tuple(shape)} differ in size")


def pictures_for_sample(data: dict[str, np.ndarray], spec: LabelSpec) -> dict[str, np.ndarray]:
    """The pictures of one validation sample, from ``launch.evaluation.picture_inputs``:
    "prediction" (image | ground truth | prediction | overlay), and when the data holds the CDGC
    module's node parts, "sampling" (Fig. 4) and "features" (Fig. 6) with their legends, both for
    the class with the most hard samples in this image."""
    image, label = data["image"], data["label"]
    pictures = {"prediction": prediction_panel(image, label, data["pred"], spec.palette)}
    parts = {name: data[name] for name in PART_COLOURS if name in data}
    cls = _most_interesting_class(parts, data["grid_label"]) if parts else None
    if cls is None:
        return pictures
    name, colour = spec.class_names[cls], _rgb(spec.palette[cls])
    sampling = np.concatenate(
        [image, sampling_picture(image, {k: v[cls] for k, v in parts.items()})], axis=1
    )
    pictures["sampling"] = with_legend(
        sampling,
        [(f"node set of {name}:", colour), *((PART_NAMES[k], PART_COLOURS[k]) for k in parts)],
    )
    features = feature_picture(
        image, label, data["feature"], data["refined"], data["grid_label"] == cls, spec.palette
    )
    present = [int(c) for c in np.unique(label) if c < len(spec.class_names)]
    pictures["features"] = with_legend(
        features,
        [
            (f"X, R: 1st principal component inside {name}", colour),
            *((spec.class_names[c], _rgb(spec.palette[c])) for c in present),
        ],
    )
    return pictures


def _rgb(colour: Sequence[int]) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in colour)
    return r, g, b


def _most_interesting_class(parts: dict[str, np.ndarray], grid_label: np.ndarray) -> int | None:
    """The class with the most hard samples (then most ground-truth cells) that has nodes.
    parts: name -> (M, h, w) bool; grid_label (h, w)."""
    zeros = np.zeros_like(next(iter(parts.values())))
    hard = parts.get("hard_pos", zeros) | parts.get("hard_neg", zeros)  # (M, h, w)
    nodes = np.logical_or.reduce(list(parts.values()))  # (M, h, w)
    best, best_key = None, (-1, -1)
    for m in range(nodes.shape[0]):
        truth = int((grid_label == m).sum())
        if not nodes[m].any() or truth == 0:
            continue
        key = (int(hard[m].sum()), truth)
        if key > best_key:
            best, best_key = m, key
    return best
