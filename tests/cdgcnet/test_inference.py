import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdgcnet.config import ModelConfig
from cdgcnet.inference import MS_SCALES, predict_logits
from cdgcnet.model import build_model


class Pointwise(nn.Module):
    """Stride-1 per-pixel model: its logits at a pixel depend on that pixel only."""

    def __init__(self, m: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, m, 1)

    def forward(self, images):
        return {"coarse": self.conv(images)}


class WindowMean(nn.Module):
    """Logits (mean, -mean) of the whole window at every pixel: exposes how windows are averaged."""

    def forward(self, images):
        mean = images.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *images.shape[-2:])
        return {"coarse": torch.cat([mean, -mean], dim=1)}


class Asymmetric(nn.Module):
    """A 3x3 conv with a left/right asymmetric kernel at stride 2: flip and scale both matter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 3, 3, stride=2, padding=1)

    def forward(self, images):
        return {"coarse": self.conv(images), "refined": 2.0 * self.conv(images)}


def _tiny_cdgcnet():
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=4, depth=18, channels=8, aspp_channels=8)
    return build_model(cfg).eval()


def test_defaults():
    assert MS_SCALES == (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def test_slide_and_single_scale_equal_whole_on_cdgcnet():
    model = _tiny_cdgcnet()
    images = torch.randn(2, 3, 40, 56)
    whole = predict_logits(model, images)
    assert whole.shape == (2, 4, 40, 56)
    with torch.no_grad():
        direct = F.interpolate(
            model(images)["refined"], size=(40, 56), mode="bilinear", align_corners=False
        )
    torch.testing.assert_close(whole, direct, rtol=0, atol=0)
    slide = predict_logits(model, images, mode="slide", crop=(40, 56), stride=(20, 30))
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)
    ms = predict_logits(model, images, mode="whole", scales=[1.0], flip=False)
    torch.testing.assert_close(ms, whole, rtol=0, atol=0)


def test_overlapping_windows_and_padding_stitch_exactly():
    model = Pointwise()
    images = torch.randn(1, 3, 23, 37)
    whole = predict_logits(model, images)
    for crop, stride in [(8, 5), ((16, 10), (7, 3)), (64, 32)]:  # the last pads the image
        slide = predict_logits(model, images, mode="slide", crop=crop, stride=stride)
        torch.testing.assert_close(slide, whole, rtol=1e-6, atol=1e-6)


def test_overlaps_are_averaged():
    images = torch.zeros(1, 3, 4, 6)
    images[..., :2] = 3.0  # window [0, 4) has mean 1.5, window [2, 6) mean 0
    out = predict_logits(WindowMean(), images, mode="slide", crop=4, stride=2)
    expected_row = torch.tensor([1.5, 1.5, 0.75, 0.75, 0.0, 0.0])
    torch.testing.assert_close(out[0, 0], expected_row.expand(4, 6))
    torch.testing.assert_close(out[0, 1], -expected_row.expand(4, 6))


def test_multiscale_flip_average_by_hand():
    model = Asymmetric().eval()
    torch.manual_seed(2)
    images = torch.randn(2, 3, 15, 22)
    scales = (0.5, 1.0, 1.5)
    out = predict_logits(model, images, scales=scales, flip=True)
    expected = torch.zeros(2, 3, 15, 22)
    for s in scales:
        size = (int(15 * s + 0.5), int(22 * s + 0.5))
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True):
            inp = torch.flip(x, dims=[3]) if flipped else x
            logits = 2.0 * model.conv(inp)  # the refined head
            logits = F.interpolate(logits, size=(15, 22), mode="bilinear", align_corners=False)
            if flipped:
                logits = torch.flip(logits, dims=[3])
            expected += torch.softmax(logits, dim=1) / 6
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 15, 22))
    # Flip matters for this model, and the flipped pass is mirrored back before averaging.
    no_flip = predict_logits(model, images, scales=scales, flip=False)
    assert not torch.allclose(no_flip, out, atol=1e-3)


def test_multiscale_slide_shapes():
    model = _tiny_cdgcnet()
    images = torch.randn(1, 3, 33, 45)
    out = predict_logits(
        model, images, mode="slide", crop=32, stride=24, scales=(0.75, 1.25), flip=True
    )
    assert out.shape == (1, 4, 33, 45)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 33, 45))


def test_bad_arguments():
    model = Pointwise()
    images = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="mode must be"):
        predict_logits(model, images, mode="tile")
    with pytest.raises(ValueError, match="needs crop"):
        predict_logits(model, images, mode="slide", stride=4)
    with pytest.raises(ValueError, match="leaves gaps"):
        predict_logits(model, images, mode="slide", crop=4, stride=5)
    with pytest.raises(ValueError, match="scales must be positive"):
        predict_logits(model, images, scales=())
