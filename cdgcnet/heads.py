"""Heads of CDGCNet: reduction + coarse classifier, auxiliary FCN head, fusion + final classifier."""

from __future__ import annotations

import torch
from torch import Tensor, nn

FUSIONS = ("concat", "sum")


class Classifier(nn.Sequential):
    """Channel dropout then a 1x1 conv to class logits: (B, cin, h, w) -> (B, M, h, w)."""

    def __init__(self, cin: int, num_classes: int, dropout: float) -> None:
        super().__init__(nn.Dropout2d(dropout), nn.Conv2d(cin, num_classes, 1))


class ReductionHead(nn.Module):
    """3x3 conv + BN + ReLU to C channels (the feature X), then the coarse classifier (P).

    reduce=False: the input already is X (the ASPP ends in its own 3x3 reduction conv).
    """

    def __init__(
        self, cin: int, channels: int, num_classes: int, dropout: float, reduce: bool = True
    ) -> None:
        super().__init__()
        if not reduce and cin != channels:
            raise ValueError(
                f"without a reduction conv the input must have {channels} channels, got {cin}"
            )
        self.reduce: nn.Module = nn.Identity()
        if reduce:
            self.reduce = nn.Sequential(
                nn.Conv2d(cin, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.reduce(x)  # (B, C, h, w)
        return feature, self.classifier(feature)  # X, coarse logits (B, M, h, w)


class AuxHead(nn.Module):
    """FCN head on backbone stage 3: 3x3 conv to cin/4 + BN + ReLU, dropout, 1x1 classifier."""

    def __init__(self, cin: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        mid = max(cin // 4, 1)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )
        self.classifier = Classifier(mid, num_classes, dropout)

    def forward(self, stage3: Tensor) -> Tensor:
        return self.classifier(self.conv(stage3))  # (B, M, h, w)


class FusionHead(nn.Module):
    """Joins X and the CDGC output R, concat ([X, R], 2C) or sum (X + R), then classifies."""

    def __init__(self, channels: int, num_classes: int, fusion: str, dropout: float) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        cin = 2 * channels if fusion == "concat" else channels
        self.classifier = Classifier(cin, num_classes, dropout)

    def forward(self, feature: Tensor, context: Tensor) -> Tensor:
        if self.fusion == "concat":
            fused = torch.cat([feature, context], dim=1)  # (B, 2C, h, w)
        else:
            fused = feature + context  # (B, C, h, w)
        return self.classifier(fused)  # refined logits (B, M, h, w)
