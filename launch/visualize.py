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
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import matplotlib
import numpy as np
from matplotlib.figure import Figure  # pyplot-free: no global backend or figure registry

EASY_COLOUR = (0, 255, 0)
HARD_POS_COLOUR = (255, 0, 0)
HARD_NEG_COLOUR = (0, 0, 255)
OUTSIDE_GREY = (64, 64, 64)
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


def sampling_parts(
    coarse_pred: np.ndarray, target: np.ndarray, nodes: np.ndarray, cls: int
) -> dict[str, np.ndarray]:
    """Split V_m of class cls into easy / hard_pos / hard_neg, all (h, w) bool on the grid.

    coarse_pred (h, w) argmax of the coarse logits, target (h, w) ground truth on the grid,
    nodes (h, w) bool: V_m from CDGCModule.node_sets.
    """
    c = coarse_pred == cls
    g = target == cls
    return {"easy": nodes & c & g, "hard_pos": nodes & g & ~c, "hard_neg": nodes & c & ~g}


def sampling_picture(image: np.ndarray, parts: dict[str, np.ndarray]) -> np.ndarray:
    """Fig. 4 style: (H, W, 3) dimmed image with the node-set cells painted by part."""
    h_img, w_img = image.shape[:2]
    _check_image(image, (h_img, w_img))
    out = np.rint(image.astype(np.float32) * _DIM).astype(np.uint8)
    colours = {"easy": EASY_COLOUR, "hard_pos": HARD_POS_COLOUR, "hard_neg": HARD_NEG_COLOUR}
    for name, grid in parts.items():
        cells = upsample_mask(grid, (h_img, w_img))
        out[cells] = colours[name]
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
    cls: int,
    palette,
) -> np.ndarray:
    """Fig. 6 style: image | ground truth | X (first PC in class) | R (first PC) -> (H, 4W, 3).

    label (H, W) train ids; feature, refined (C, h, w) on the feature grid.
    """
    h_img, w_img = label.shape
    _check_image(image, label.shape)
    grid_mask = _grid_mask(label == cls, feature.shape[-2:])
    panels = [image, colorize(label, palette)]
    cmap = matplotlib.colormaps["viridis"]
    for f in (feature, refined):
        pc = first_component(f, grid_mask)  # (h, w)
        pc_img = cv2.resize(pc, (w_img, h_img), interpolation=cv2.INTER_NEAREST)
        inside = upsample_mask(grid_mask, (h_img, w_img))
        rgb = (cmap(pc_img)[..., :3] * 255).round().astype(np.uint8)
        rgb[~inside] = OUTSIDE_GREY
        panels.append(rgb)
    return np.concatenate(panels, axis=1)


def _grid_mask(mask: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """(H, W) bool -> (h, w) bool by nearest resize (as the CDGC module resizes targets)."""
    h, w = int(grid[0]), int(grid[1])
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rgb[..., ::-1] if rgb.ndim == 3 else rgb  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    write_atomic(path, buf.tobytes())


def _umask() -> int:
    """The process umask (reading it means setting it; put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a temporary file beside path, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_image(image: np.ndarray, shape: Sequence[int]) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    if tuple(image.shape[:2]) != tuple(shape):
        raise ValueError(f"image {image.shape[:2]} and mask {tuple(shape)} differ in size")


def pictures_for_sample(model, sample: dict, cfg) -> dict[str, np.ndarray]:
    """The pictures logged for one EvalStream sample: "prediction", and with a class-wise CDGC
    module also "sampling" (Fig. 4) and "features" (Fig. 6), all for the class with the most
    hard samples in this image.

    The model runs in eval mode under a forked RNG, so training randomness is untouched; the
    dynamic-sampling node sets are those the module would use in training (graph, ratio and
    parts from its config, target = this sample's label). Under ZeRO-3 call this on every rank
    (the forward gathers parameters) or pass an unpartitioned copy.
    """
    import torch
    import torch.nn.functional as F

    from cdgcnet.cdgc import CDGCModule
    from cdgcnet.labels import LABEL_SPECS
    from cdgcnet.model import final_logits

    net = getattr(model, "module", model)
    palette = LABEL_SPECS[cfg.dataset].palette
    device = next(net.parameters()).device
    image_u8 = np.asarray(sample["image_uint8"], dtype=np.uint8)  # (H, W, 3)
    label = sample["label"].long()  # (1, H, W)
    label_np = label[0].cpu().numpy()
    was_training = net.training
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
        net.eval()
        try:
            out = net(sample["image"].to(device), return_features=True)
            logits = F.interpolate(
                final_logits(out).float(),
                size=label.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )
            pred = logits.argmax(1)[0].cpu().numpy()  # (H, W)
            pictures = {"prediction": prediction_panel(image_u8, label_np, pred, palette)}
            ctx = getattr(net, "context", None)
            if isinstance(ctx, CDGCModule) and ctx.class_wise and "context" in out:
                coarse = out["coarse"]  # (1, M, h, w)
                ctx.train()  # node sets as in training: dynamic sampling with the target
                nodes = ctx.node_sets(coarse, label.to(device))[0].cpu().numpy()  # (M, h, w)
                grid = coarse.shape[-2:]
                target_grid = F.interpolate(label[:, None].double(), size=grid, mode="nearest")
                target_grid = target_grid[0, 0].long().numpy()  # (h, w)
                coarse_pred = coarse.argmax(1)[0].cpu().numpy()
                cls = _most_interesting_class(coarse_pred, target_grid, nodes)
                if cls is not None:
                    parts = sampling_parts(coarse_pred, target_grid, nodes[cls], cls)
                    pictures["sampling"] = np.concatenate(
                        [image_u8, sampling_picture(image_u8, parts)], axis=1
                    )
                    pictures["features"] = feature_picture(
                        image_u8,
                        label_np,
                        out["feature"][0].float().cpu().numpy(),
                        out["context"][0].float().cpu().numpy(),
                        cls,
                        palette,
                    )
        finally:
            net.train(was_training)
    return pictures


def _most_interesting_class(coarse_pred, target_grid, nodes) -> int | None:
    """The class with the most hard samples (then most ground-truth cells) that has nodes."""
    best, best_key = None, (-1, -1)
    for m in range(nodes.shape[0]):
        if not nodes[m].any() or not (target_grid == m).any():
            continue
        parts = sampling_parts(coarse_pred, target_grid, nodes[m], m)
        key = (
            int(parts["hard_pos"].sum() + parts["hard_neg"].sum()),
            int((target_grid == m).sum()),
        )
        if key > best_key:
            best, best_key = m, key
    return best
