"""Test-time prediction: whole image or sliding window, multi-scale and horizontal flip.

One pass (scales=(1.0,), flip=False) returns logits at input resolution. Several passes
(scales x flips) return the average of their softmax probabilities at input resolution, as in
the paper's MS/Flip evaluation. Either way argmax over dim 1 is the prediction.

The caller puts the model in eval mode; this module runs it under torch.no_grad().
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdgcnet.model import final_logits

MS_SCALES: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def _pair(value: int | Sequence[int] | None, name: str) -> tuple[int, int]:
    if value is None:
        raise ValueError(f"predict_logits: mode='slide' needs {name}")
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"predict_logits: {name} must be a positive int or (h, w), got {value!r}")
    return pair  # type: ignore[return-value]


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _logits(model: nn.Module, images: Tensor, size: tuple[int, int]) -> Tensor:
    """Final logits of one forward, resized to `size`."""
    return _resize(final_logits(model(images)), size)


def slide_logits(
    model: nn.Module, images: Tensor, crop: tuple[int, int], stride: tuple[int, int]
) -> Tensor:
    """(B, M, H, W) logits from overlapping crop windows, averaged where windows overlap.

    An image smaller than the crop is zero-padded at the bottom/right (zero = the mean colour
    after normalisation) so every window has the crop size; the padding is cut off again.
    """
    (ch, cw), (sh, sw) = crop, stride
    if sh > ch or sw > cw:
        raise ValueError(f"predict_logits: stride {stride} larger than crop {crop} leaves gaps")
    _, _, h, w = images.shape
    padded = F.pad(images, (0, max(cw - w, 0), 0, max(ch - h, 0)))
    ph, pw = padded.shape[-2:]
    rows = (ph - ch + sh - 1) // sh + 1
    cols = (pw - cw + sw - 1) // sw + 1
    total: Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, device=images.device)
    for r in range(rows):
        for c in range(cols):
            y2 = min(r * sh + ch, ph)
            x2 = min(c * sw + cw, pw)
            y1, x1 = y2 - ch, x2 - cw
            window = _logits(model, padded[:, :, y1:y2, x1:x2], (ch, cw))  # (B, M, ch, cw)
            if total is None:
                total = window.new_zeros(window.shape[0], window.shape[1], ph, pw)
            total[:, :, y1:y2, x1:x2] += window
            count[:, :, y1:y2, x1:x2] += 1
    assert total is not None
    return (total / count)[:, :, :h, :w]


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: Tensor,
    *,
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> Tensor:
    """images (B, 3, H, W) normalised -> (B, M, H, W) logits (one pass) or mean probabilities.

    mode "whole" runs the model on each (rescaled) image; "slide" runs it on crop windows
    placed every `stride` pixels. Each scale s resizes the image to round(s*H) x round(s*W).
    """
    if images.dim() != 4:
        raise ValueError(f"predict_logits expects images (B, 3, H, W), got {tuple(images.shape)}")
    if mode not in ("whole", "slide"):
        raise ValueError(f"predict_logits: mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide":
        crop_hw, stride_hw = _pair(crop, "crop"), _pair(stride, "stride")
    scales = tuple(scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"predict_logits: scales must be positive, got {scales!r}")
    _, _, h, w = images.shape
    passes = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    mean_prob: Tensor | None = None
    for scale, flipped in passes:
        size = (max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1))
        x = _resize(images, size)
        if flipped:
            x = x.flip(-1)
        if mode == "whole":
            logits = _logits(model, x, (h, w))
        else:
            logits = _resize(slide_logits(model, x, crop_hw, stride_hw), (h, w))
        if flipped:
            logits = logits.flip(-1)  # bilinear resizing commutes with the flip
        if len(passes) == 1:
            return logits
        prob = logits.float().softmax(dim=1) / len(passes)
        mean_prob = prob if mean_prob is None else mean_prob + prob
    assert mean_prob is not None
    return mean_prob
