"""Predict segmentation masks for a folder of images.

    python launch/predict.py --checkpoint runs/cityscapes/model.pt --images DIR --out DIR \\
        [--format overlay|palette|cityscapes-ids] [--ms] [--flip] [--sliding] [key=value ...]

Formats (file names keep the input's path relative to --images, with a .png suffix):
- overlay: <name>_color.png (mask in the dataset palette) and <name>_overlay.png (over the image).
- palette: <name>.png, a "P"-mode PNG whose pixel values are the train ids and whose palette is
  the dataset's (the PASCAL VOC submission format for VOC models).
- cityscapes-ids: <name>.png in one flat folder, single-channel uint8 Cityscapes label ids mapped
  back from the train ids, for the official cityscapesScripts evaluation / benchmark server: it
  finds the prediction of ``<city>_<seq>_<frame>_gtFine_labelIds.png`` as the one file matching
  ``<city>_<seq>_<frame>*.png`` under the results folder, so input names must start that way
  (``aachen_000000_000019_leftImg8bit.png`` -> ``aachen_000000_000019_leftImg8bit.png``).

Every file is written to a temporary name and renamed. A missing folder, a folder without
images, an unreadable image or a bad checkpoint stops the job with an error naming it.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np
import torch

from launch.config import ConfigError
from launch.export import CheckpointError, load_checkpoint
from pipeline.atomic import DiskFullError
from pipeline.shards import DEFAULT_LIMITS, Limits, add_limit_args

FORMATS = ("overlay", "palette", "cityscapes-ids")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CITYSCAPES_NAME = re.compile(r"^[A-Za-z_]+_\d{6}_\d{6}")


class PredictError(ValueError):
    """Bad input to predict.py; the message names the file or folder and the reason."""


def find_images(folder: Path) -> list[Path]:
    """Image files under folder (recursive), sorted."""
    if not folder.is_dir():
        raise PredictError(f"{folder}: --images is not a folder")
    found = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not found:
        raise PredictError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return found


_HEADER_BYTES = 1 << 20  # where a PNG/JPEG states its size (after EXIF and other segments)


def check_image(
    path: Path, limits: Limits = DEFAULT_LIMITS, scales: Sequence[float] = (), data=None
) -> None:
    """PredictError naming the file when its bytes (from its stat) or its pixels (from its
    PNG/JPEG header: `data`, else the file's first MiB) are over the sample limits (the packer's
    and the shard reader's), or it is too large to run at the largest of `scales` in this
    machine's memory. Nothing is decoded."""
    from pipeline.shards import image_size

    too_big = limits.check_bytes(path.stat().st_size, "image file")
    if too_big:
        raise PredictError(f"{path}: {too_big}")
    if data is None:
        with open(path, "rb") as f:
            data = f.read(_HEADER_BYTES)
    size = image_size(data)
    if size is None:
        return  # not a PNG/JPEG, or its header is further in: read_image says so
    reason = limits.check_image(data, "image")
    if reason:
        raise PredictError(f"{path}: {reason}")
    if scales:
        from launch.resources import inference_memory_problem

        reason = inference_memory_problem(size[0] * size[1], max(scales))
        if reason:
            raise PredictError(f"{path}: eval.scales: {max(scales):g} {reason}")


def read_image(
    path: Path, limits: Limits = DEFAULT_LIMITS, scales: Sequence[float] = ()
) -> np.ndarray:
    """(H, W, 3) uint8 RGB; PredictError naming the file when `check_image` refuses it or it
    cannot be decoded."""
    from pipeline.shards import image_size
    from pipeline.sources.base import SampleError, read_bytes

    try:
        raw = read_bytes(path, "image", limits)
    except SampleError as e:
        raise PredictError(str(e)) from None
    check_image(path, limits, scales, raw)
    bgr = (
        None
        if image_size(raw) is None
        else cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    )
    if bgr is None:
        raise PredictError(f"{path}: unreadable image (not a decodable PNG/JPEG)")
    return np.ascontiguousarray(bgr[..., ::-1])


def train_to_label_ids(spec) -> np.ndarray:
    """(256,) uint8: train id -> the dataset's source (label) id; ids without one -> 0."""
    inverse: dict[int, list[int]] = {}
    for src, dst in spec.label_map.items():
        if dst != spec.ignore_index:
            inverse.setdefault(dst, []).append(src)
    table = np.zeros(256, dtype=np.uint8)
    for train_id in range(spec.num_classes):
        sources = inverse.get(train_id, [])
        if len(sources) != 1:
            raise PredictError(
                f"{spec.name}: train id {train_id} comes from label ids {sources}; "
                "cannot map predictions back to one label id"
            )
        table[train_id] = sources[0]
    return table


def palette_png(mask: np.ndarray, palette, ignore_colour=(224, 224, 192)) -> bytes:
    """A "P"-mode PNG of class indices with the dataset palette (255 -> ignore_colour)."""
    from PIL import Image

    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    flat[255] = ignore_colour
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(flat.reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def output_names(images: Sequence[Path], root: Path, fmt: str) -> list[Path]:
    """Output path stem (no suffix) per image, relative to --out; checks the naming rules."""
    names = []
    for p in images:
        rel = p.relative_to(root).with_suffix("")
        if fmt == "cityscapes-ids":
            if not _CITYSCAPES_NAME.match(p.stem):
                raise PredictError(
                    f"{p}: name does not start with <city>_<seq>_<frame> (e.g. "
                    "aachen_000000_000019_leftImg8bit.png), which cityscapesScripts uses to "
                    "match a prediction to its ground truth"
                )
            rel = Path(p.stem)
        names.append(rel)
    seen: dict[Path, Path] = {}
    for p, n in zip(images, names, strict=True):
        if n in seen:
            raise PredictError(f"{p}: its output name {n}.png clashes with that of {seen[n]}")
        seen[n] = p
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from launch.evaluate import add_model_args

    p = argparse.ArgumentParser(
        prog="launch/predict.py", description="Predict segmentation masks for a folder of images."
    )
    add_model_args(p)
    p.add_argument("--images", required=True, help="folder of .png/.jpg images (recursive)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="overlay",
        help="overlay (default): NAME_color.png (mask in the dataset palette) and "
        "NAME_overlay.png (over the image); palette: NAME.png, a P-mode PNG of train ids (the "
        "VOC submission format); cityscapes-ids: NAME.png of Cityscapes label ids in one flat "
        "folder (the cityscapesScripts / benchmark format). NAME is the input's path under "
        "--images without its suffix",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_limit_args(p)
    args = p.parse_args(argv)
    args.split = None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from launch.evaluate import resolve_config

    try:
        images_root = Path(args.images)
        images = find_images(images_root)
        names = output_names(images, images_root, args.format)
        model, ckpt_cfg, _ = load_checkpoint(args.checkpoint)
        cfg, spec = resolve_config(args, ckpt_cfg)
        to_label_ids = None
        if args.format == "cityscapes-ids":
            if spec.name != "cityscapes":
                raise PredictError(
                    f"--format cityscapes-ids needs a Cityscapes model; {args.checkpoint} is "
                    f"a {spec.name} model"
                )
            to_label_ids = train_to_label_ids(spec)
        try:
            limits = Limits(args.max_pixels, args.max_member_bytes)
        except ValueError as e:
            raise PredictError(str(e)) from None
        for path in images:  # before any output: every image within the limits
            check_image(path, limits, cfg.eval.scales)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device).eval()
        count = predict_folder(
            model, cfg, spec, images, names, Path(args.out), args.format, to_label_ids, device,
            progress=not args.no_progress, limits=limits,
        )  # fmt: skip
    except (PredictError, CheckpointError, ConfigError, DiskFullError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {args.format} predictions for {count} image(s) to {args.out}", flush=True)
    return 0


def predict_folder(
    model, cfg, spec, images, names, out: Path, fmt: str, to_label_ids, device, progress=True,
    limits: Limits = DEFAULT_LIMITS,
) -> int:  # fmt: skip
    from tqdm import tqdm

    from cdgcnet.inference import predict_logits
    from launch.visualize import colorize, overlay, save_png
    from pipeline.atomic import write_atomic
    from pipeline.transforms import normalize

    e = cfg.eval
    kwargs = {"mode": e.mode, "scales": e.scales, "flip": e.flip}
    if e.mode == "slide":
        kwargs.update(crop=e.crop, stride=e.stride)
    for path, name in tqdm(
        list(zip(images, names, strict=True)), disable=None if progress else True
    ):
        rgb = read_image(path, limits, e.scales)
        x = torch.from_numpy(normalize(rgb))[None].to(device)  # (1, 3, H, W)
        with torch.no_grad():
            pred = predict_logits(model, x, **kwargs).argmax(1)[0].cpu().numpy().astype(np.uint8)
        if fmt == "overlay":
            save_png(out / f"{name}_color.png", colorize(pred, spec.palette))
            save_png(out / f"{name}_overlay.png", overlay(rgb, pred, spec.palette))
        elif fmt == "palette":
            write_atomic(out / f"{name}.png", palette_png(pred, spec.palette))
        else:
            save_png(out / f"{name}.png", to_label_ids[pred])
    return len(images)


if __name__ == "__main__":
    sys.exit(main())
