"""Pictures: colour masks, Fig. 4 sampling marks, Fig. 6 features, confusion plot, PNG writes."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch

from cdgcnet.cdgc import resize_target
from cdgcnet.config import ModelConfig
from cdgcnet.labels import CITYSCAPES
from cdgcnet.model import build_model
from launch import evaluation as E
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
    grid_label = resize_target(torch.from_numpy(label)[None], (4, 5))[0].numpy()  # (4, 5)
    pic = V.feature_picture(image, label, feature, refined, grid_label == 13, PALETTE)
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


def _real_model_and_sample(h: int = 64, w: int = 48):
    torch.manual_seed(0)
    cfg_model = ModelConfig(num_classes=19, depth=18, channels=16, aspp=False, aux=False, ratio=0.5)
    model = build_model(cfg_model)
    label = torch.randint(0, 4, (1, h, w))
    label[0, :5] = 255
    sample = {
        "key": "k0",
        "image": torch.randn(1, 3, h, w),
        "label": label,
        "image_uint8": np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8),
    }
    return model, sample


def test_picture_inputs_one_eval_forward_and_the_modules_own_node_sets():
    model, sample = _real_model_and_sample()
    modes = []
    model.context.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    model.train()
    torch.manual_seed(5)
    rng_before = torch.get_rng_state()
    data = E.picture_inputs(model, sample)
    assert torch.equal(rng_before, torch.get_rng_state())  # training randomness untouched
    assert model.training  # mode restored
    assert modes == [False]  # one forward, in eval mode: the module is never flipped to train

    # The parts are the node sets a training 'ds' module draws with the same RNG state.
    model.eval()
    out = model(sample["image"], return_features=True)
    model.context.train()
    torch.manual_seed(5)
    nodes = model.context.node_sets(out["coarse"], sample["label"])[0].numpy()  # (M, h, w)
    union = data["easy"] | data["hard_pos"] | data["hard_neg"]
    np.testing.assert_array_equal(union, nodes)
    assert data["grid_label"].shape == nodes.shape[1:] and (data["grid_label"] == 255).any()
    assert data["feature"].shape == data["refined"].shape == (16, *nodes.shape[1:])


def test_pictures_for_sample_with_a_real_model():
    model, sample = _real_model_and_sample()
    h, w = sample["label"].shape[-2:]
    pics = V.pictures_for_sample(E.picture_inputs(model, sample), CITYSCAPES)
    assert set(pics) == {"prediction", "sampling", "features"}
    assert pics["prediction"].shape == (h, 4 * w, 3)
    # The Fig. 4 and Fig. 6 pictures carry a white legend strip below the panels.
    assert pics["sampling"].shape[0] > h and pics["sampling"].shape[1:] == (2 * w, 3)
    assert pics["features"].shape[0] > h and pics["features"].shape[1:] == (4 * w, 3)
    for name in ("sampling", "features"):
        strip = pics[name][h:]
        assert np.all(strip[0] == V.LEGEND_BACKGROUND)
    sampling_strip = pics["sampling"][h:]
    for colour in (V.EASY_COLOUR, V.HARD_POS_COLOUR, V.HARD_NEG_COLOUR):
        assert np.all(sampling_strip == np.array(colour, np.uint8), axis=-1).sum() >= 100
    # The features legend shows every class of the ground truth in its palette colour.
    features_strip = pics["features"][h:]
    for c in np.unique(sample["label"][sample["label"] != 255]):
        swatch = np.all(features_strip == np.array(PALETTE[c], np.uint8), axis=-1)
        assert swatch.sum() >= 100, CITYSCAPES.class_names[c]
    # Some node cells are painted in the sampling panel.
    right = pics["sampling"][:h, w:]
    painted = np.zeros((h, w), bool)
    for c in (V.EASY_COLOUR, V.HARD_POS_COLOUR, V.HARD_NEG_COLOUR):
        painted |= np.all(right == np.array(c, np.uint8), axis=-1)
    assert painted.any()


def test_legend_swatches_names_and_wrapping():
    entries = [("road", (128, 64, 128)), ("sidewalk", (244, 35, 232)), ("car", (0, 0, 142))]
    wide = V.legend(400, entries)
    narrow = V.legend(60, entries)
    assert wide.shape[1] == 400 and narrow.shape[1] == 60
    assert narrow.shape[0] > wide.shape[0]  # wrapped into more rows
    for _, colour in entries:
        for strip in (wide, narrow):
            assert np.all(strip == np.array(colour, np.uint8), axis=-1).sum() == 100  # 10 x 10
    dark = np.all(wide < 100, axis=-1) & ~np.all(wide == np.array((0, 0, 142), np.uint8), axis=-1)
    assert dark.sum() > 20  # the names are drawn in black
    other = V.legend(400, [("road", (128, 64, 128)), ("building", (244, 35, 232))])
    assert not np.array_equal(other, V.legend(400, entries[:2]))  # the text differs
    assert V.with_legend(np.zeros((8, 400, 3), np.uint8), entries).shape == (
        8 + wide.shape[0],
        400,
        3,
    )
