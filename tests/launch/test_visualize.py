"""Pictures: colour masks, Fig. 4 sampling marks, Fig. 6 features, confusion plot, PNG writes."""

from __future__ import annotations

import io
import types

import cv2
import numpy as np
import pytest
import torch

from cdgcnet.cdgc import CDGCModule
from cdgcnet.config import ModelConfig
from cdgcnet.labels import CITYSCAPES
from cdgcnet.model import build_model
from launch import visualize as V

PALETTE = CITYSCAPES.palette


def _read_png(path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, f"{path} is not a readable PNG"
    return img


def test_colorize_uses_palette_and_ignore_colour():
    mask = np.array([[0, 1], [18, 255]], dtype=np.uint8)
    rgb = V.colorize(mask, PALETTE, ignore_colour=(1, 2, 3))
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == PALETTE[0]
    assert tuple(rgb[0, 1]) == PALETTE[1]
    assert tuple(rgb[1, 0]) == PALETTE[18]
    assert tuple(rgb[1, 1]) == (1, 2, 3)


def test_overlay_blends_half_and_half():
    image = np.full((3, 4, 3), 100, dtype=np.uint8)
    mask = np.zeros((3, 4), dtype=np.int64)  # class 0 = road (128, 64, 128)
    out = V.overlay(image, mask, PALETTE, alpha=0.5)
    assert tuple(out[1, 2]) == (114, 82, 114)


def test_overlay_rejects_size_mismatch():
    with pytest.raises(ValueError, match="differ in size"):
        V.overlay(np.zeros((3, 4, 3), np.uint8), np.zeros((4, 4), np.int64), PALETTE)


def test_sampling_picture_marks_exactly_the_node_cells():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    kind = rng.integers(0, 4, (6, 8))  # 0 none, 1 easy, 2 hard_pos, 3 hard_neg
    parts = {"easy": kind == 1, "hard_pos": kind == 2, "hard_neg": kind == 3}
    pic = V.sampling_picture(image, parts)
    assert pic.shape == image.shape
    block = np.ones((8, 8), dtype=np.int64)  # 48/6 = 64/8 = 8 pixels per node
    kind_px = np.kron(kind, block)
    colours = {1: V.EASY_COLOUR, 2: V.HARD_POS_COLOUR, 3: V.HARD_NEG_COLOUR}
    for k, colour in colours.items():
        is_colour = np.all(pic == np.array(colour, np.uint8), axis=-1)
        np.testing.assert_array_equal(is_colour, kind_px == k)
    dimmed = np.rint(image.astype(np.float32) * 0.35).astype(np.uint8)
    np.testing.assert_array_equal(pic[kind_px == 0], dimmed[kind_px == 0])


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_sampling_parts_partition_the_real_node_set(ratio):
    torch.manual_seed(0)
    cdgc = CDGCModule(in_channels=4, num_classes=3, graph="ds", ratio=ratio).train()
    coarse = torch.randn(1, 3, 6, 8)
    target = torch.randint(0, 3, (1, 6, 8))
    target[0, 0, :3] = 255
    nodes = cdgc.node_sets(coarse, target)[0].numpy()  # (3, 6, 8)
    coarse_pred = coarse.argmax(1)[0].numpy()
    for cls in range(3):
        parts = V.sampling_parts(coarse_pred, target[0].numpy(), nodes[cls], cls)
        union = parts["easy"] | parts["hard_pos"] | parts["hard_neg"]
        np.testing.assert_array_equal(union, nodes[cls])
        assert not (parts["easy"] & parts["hard_pos"]).any()
        assert not (parts["hard_neg"] & (target[0].numpy() == cls)).any()


def test_first_component_recovers_a_linear_gradient():
    h, w = 5, 6
    ramp = np.arange(h * w, dtype=np.float32).reshape(h, w)
    feature = np.stack([ramp, 2 * ramp, -ramp])  # (3, h, w): one direction of variation
    mask = np.zeros((h, w), bool)
    mask[1:4, 1:5] = True
    pc = V.first_component(feature, mask)
    inside = pc[mask]
    assert inside.min() == pytest.approx(0.0) and inside.max() == pytest.approx(1.0)
    order = np.argsort(ramp[mask])
    assert np.all(np.diff(inside[order]) > 0)  # monotone in the ramp
    assert np.all(pc[~mask] == 0)


def test_feature_picture_size_and_grey_outside_class():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    label = np.zeros((32, 40), np.int64)
    label[8:24, 10:30] = 13
    feature = rng.standard_normal((8, 4, 5)).astype(np.float32)
    refined = rng.standard_normal((8, 4, 5)).astype(np.float32)
    pic = V.feature_picture(image, label, feature, refined, 13, PALETTE)
    assert pic.shape == (32, 160, 3)
    np.testing.assert_array_equal(pic[:, :40], image)
    assert tuple(pic[0, 80]) == V.OUTSIDE_GREY and tuple(pic[0, 120]) == V.OUTSIDE_GREY
    assert tuple(pic[16, 100]) != V.OUTSIDE_GREY  # inside the class: colour-mapped


def test_confusion_figure_png_size(tmp_path):
    mat = np.array([[5, 1, 0], [0, 3, 2], [0, 0, 0]], dtype=np.int64)
    fig = V.confusion_figure(mat, ["a", "b", "c"])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    img = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR)
    w_in, h_in = fig.get_size_inches()
    assert img.shape[:2] == (round(h_in * fig.dpi), round(w_in * fig.dpi))
    with pytest.raises(ValueError, match="does not fit 2 class names"):
        V.confusion_figure(mat, ["a", "b"])


def test_save_png_round_trip_leaves_no_temporaries(tmp_path):
    rgb = np.zeros((7, 9, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB
    out = tmp_path / "sub" / "x.png"
    V.save_png(out, rgb)
    back = _read_png(out)
    assert back.shape == (7, 9, 3) and tuple(back[0, 0]) == (0, 0, 200)  # BGR on disk
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.png"]


def test_pictures_for_sample_with_a_real_model():
    torch.manual_seed(0)
    cfg_model = ModelConfig(num_classes=19, depth=18, channels=16, aspp=False, aux=False)
    model = build_model(cfg_model)
    cfg = types.SimpleNamespace(dataset="cityscapes")
    h, w = 64, 48
    label = torch.randint(0, 4, (1, h, w))
    label[0, :5] = 255
    sample = {
        "key": "k0",
        "image": torch.randn(1, 3, h, w),
        "label": label,
        "image_uint8": np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8),
    }
    model.train()
    rng_before = torch.get_rng_state()
    pics = V.pictures_for_sample(model, sample, cfg)
    assert torch.equal(rng_before, torch.get_rng_state())  # training randomness untouched
    assert model.training  # mode restored
    assert set(pics) == {"prediction", "sampling", "features"}
    assert pics["prediction"].shape == (h, 4 * w, 3)
    assert pics["sampling"].shape == (h, 2 * w, 3)
    assert pics["features"].shape == (h, 4 * w, 3)
    # Some node cells are painted in the sampling panel.
    right = pics["sampling"][:, w:]
    painted = np.zeros((h, w), bool)
    for c in (V.EASY_COLOUR, V.HARD_POS_COLOUR, V.HARD_NEG_COLOUR):
        painted |= np.all(right == np.array(c, np.uint8), axis=-1)
    assert painted.any()
