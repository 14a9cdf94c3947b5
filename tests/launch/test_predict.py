"""predict.py: overlay, VOC palette and Cityscapes label-id outputs; named errors for bad inputs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from cdgcnet.inference import predict_logits
from cdgcnet.labels import CITYSCAPES, VOC
from cdgcnet.model import build_model
from launch import predict as P
from launch.config import load_config, to_dict
from launch.export import save_exported
from pipeline.transforms import normalize

SMALL = ["model.depth=18", "model.channels=16", "model.aspp=false", "model.aux=false"]
WHOLE = "eval.mode=whole"  # the cityscapes preset slides 769-pixel windows


def _export(tmp_path: Path, preset: str) -> Path:
    cfg = load_config(preset, SMALL)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path / f"{preset}.pt"
    save_exported(model.state_dict(), to_dict(cfg), path)
    return path


def _images(folder: Path, names: list[str], h: int = 20, w: int = 28) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for name in names:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), rgb[..., ::-1])
        out[name] = rgb
    return out


def _expected_pred(ckpt: Path, rgb: np.ndarray) -> np.ndarray:
    from launch.export import load_exported

    model, _ = load_exported(ckpt)
    with torch.no_grad():
        logits = predict_logits(model, torch.from_numpy(normalize(rgb))[None])
    return logits.argmax(1)[0].numpy().astype(np.uint8)


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_train_to_label_ids_inverts_the_cityscapes_table():
    table = P.train_to_label_ids(CITYSCAPES)
    want = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    assert table[:19].tolist() == want
    lut = CITYSCAPES.lut()
    assert all(lut[table[t]] == t for t in range(19))


def test_cityscapes_ids_written_for_cityscapes_scripts(tmp_path):
    ckpt = _export(tmp_path, "cityscapes")
    names = [
        "frankfurt/frankfurt_000000_000294_leftImg8bit.png",
        "lindau/lindau_000001_000019_leftImg8bit.png",
    ]
    imgs = _images(tmp_path / "in", names)
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--images", str(tmp_path / "in"), "--out", str(out)]
    assert P.main([*args, "--format", "cityscapes-ids", "--no-progress", WHOLE]) == 0
    table = P.train_to_label_ids(CITYSCAPES)
    for name, rgb in imgs.items():
        written = out / Path(name).name  # flat folder, <city>_<seq>_<frame>*.png
        ids = cv2.imread(str(written), cv2.IMREAD_UNCHANGED)
        assert ids.dtype == np.uint8 and ids.shape == rgb.shape[:2]
        pred = _expected_pred(ckpt, rgb)
        np.testing.assert_array_equal(ids, table[pred])
        np.testing.assert_array_equal(CITYSCAPES.lut()[ids], pred)  # back to train ids exactly
    _no_temporaries(out)


def test_voc_palette_png_reads_back_as_indices(tmp_path):
    ckpt = _export(tmp_path, "voc")
    imgs = _images(tmp_path / "in", ["2007_000033.jpg"])
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--images", str(tmp_path / "in"), "--out", str(out)]
    assert P.main([*args, "--format", "palette", "--no-progress"]) == 0
    im = Image.open(out / "2007_000033.png")
    assert im.mode == "P"
    jpg = cv2.imread(str(tmp_path / "in" / "2007_000033.jpg"))[..., ::-1]  # decoded JPEG
    np.testing.assert_array_equal(np.array(im), _expected_pred(ckpt, np.ascontiguousarray(jpg)))
    pal = np.array(im.getpalette()[: 3 * 21]).reshape(21, 3)
    np.testing.assert_array_equal(pal, np.array(VOC.palette))
    _no_temporaries(out)
    del imgs


def test_overlay_outputs_keep_relative_paths(tmp_path):
    ckpt = _export(tmp_path, "cityscapes")
    imgs = _images(tmp_path / "in", ["a/x.png", "b/y.png"])
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--images", str(tmp_path / "in"), "--out", str(out)]
    assert P.main([*args, "--no-progress", WHOLE]) == 0
    for name, rgb in imgs.items():
        stem = out / Path(name).with_suffix("")
        color = cv2.imread(f"{stem}_color.png")[..., ::-1]
        over = cv2.imread(f"{stem}_overlay.png")
        assert color.shape == rgb.shape and over.shape == rgb.shape
        pred = _expected_pred(ckpt, rgb)
        np.testing.assert_array_equal(color, np.array(CITYSCAPES.palette, np.uint8)[pred])


def test_bad_inputs_are_named(tmp_path, capsys):
    ckpt = _export(tmp_path, "cityscapes")
    out = str(tmp_path / "out")

    def run(images: Path, *extra: str, checkpoint: str = str(ckpt)) -> str:
        argv = [
            "--checkpoint",
            checkpoint,
            "--images",
            str(images),
            "--out",
            out,
            "--no-progress",
            WHOLE,
        ]
        assert P.main([*argv, *extra]) == 2
        return capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert f"{empty}: no images" in run(empty)
    assert "is not a folder" in run(tmp_path / "missing")
    bad = tmp_path / "bad"
    _images(bad, ["aachen_000000_000019_leftImg8bit.png"])
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    assert f"{bad / 'broken.png'}: unreadable image" in run(bad)
    assert "name does not start with <city>_<seq>_<frame>" in run(bad, "--format", "cityscapes-ids")
    good = tmp_path / "good"
    _images(good, ["aachen_000000_000019_leftImg8bit.png"])
    not_ckpt = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, not_ckpt)
    assert f"{not_ckpt}: not a cdgcnet export" in run(good, checkpoint=str(not_ckpt))
    voc = _export(tmp_path, "voc")
    assert "needs a Cityscapes model" in run(
        good, "--format", "cityscapes-ids", checkpoint=str(voc)
    )


def test_outputs_have_the_usual_permissions(tmp_path):
    import os

    ckpt = _export(tmp_path, "cityscapes")
    _images(tmp_path / "in", ["x.png"])
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--images", str(tmp_path / "in"), "--out", str(out)]
    old = os.umask(0o022)
    try:
        assert P.main([*args, "--no-progress", WHOLE]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {"x_color.png": 0o644, "x_overlay.png": 0o644}


def test_help_states_the_formats_their_default_and_output_names(capsys):
    import pytest

    with pytest.raises(SystemExit):
        P.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("{overlay,palette,cityscapes-ids}", "overlay (default)", "NAME_color.png",
                  "NAME_overlay.png", "P-mode PNG of train ids", "Cityscapes label ids"):  # fmt: skip
        assert words in text, words
