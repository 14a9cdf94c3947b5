"""Atrous spatial pyramid pooling, as the DeepLabV3 head of mmsegmentation's R-101-D8 models.

Reference: mmsegmentation `mmseg/models/decode_heads/aspp_head.py` (`ASPPHead`, used by
`configs/deeplabv3/deeplabv3_r101-d8_*`: in_channels 2048, channels 512, dilations
(1, 12, 24, 36)), which follows Chen et al., "Rethinking Atrous Convolution for Semantic Image
Segmentation" (DeepLabV3, 2017). Legend: B batch, cin backbone channels, K branch width,
C output channels (the feature X of CDGCNet), h x w the feature grid.

    x (B,cin,h,w) -> [image pool, 1x1, 3x3 rate r1, 3x3 rate r2, 3x3 rate r3]  each (B,K,h,w)
                  -> concat (B,5K,h,w) -> 3x3 conv + BN + ReLU "bottleneck" -> (B,C,h,w)

With K = C = 512 this is the reference head up to its classifier. The bottleneck is the
"dimension reduction" conv of CDGCNet (the feature X), so no further reduction conv follows.

One departure: the reference normalises the image-pooling branch with SyncBN over the pooled
(B, K, 1, 1) map. BatchNorm there needs more than one image per rank in training (a 1x1 map of
one image has a single value per channel), and the paper's Cityscapes setting (batch 8 on 8 GPUs)
runs one image per rank. GroupNorm normalises over channel groups of each image instead: it works
at any batch size, behaves the same in training and evaluation, and keeps this branch's scale in
line with the BN-normalised branches it is concatenated with (no norm at all would not).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Atrous rates per output stride (DeepLabV3: rates double when the stride halves).
ASPP_RATES: dict[int, tuple[int, int, int]] = {8: (12, 24, 36), 16: (6, 12, 18)}
# Channels per GroupNorm group of the image-pooling branch (32 groups at the reference's 512).
POOL_GROUP_SIZE = 16


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def pool_groups(channels: int) -> int:
    """GroupNorm groups of the pooling branch: groups of POOL_GROUP_SIZE channels, else one."""
    return channels // POOL_GROUP_SIZE if channels % POOL_GROUP_SIZE == 0 else 1


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool, 1x1 conv + GroupNorm + ReLU, broadcast to the grid."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.norm = nn.GroupNorm(pool_groups(cout), cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)  # (B, cin, 1, 1)
        pooled = self.relu(self.norm(self.conv(pooled)))  # (B, cout, 1, 1)
        # Bilinear resize of a 1x1 map (the reference) is this broadcast.
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """(B, cin, h, w) -> (B, cout, h, w): five K-channel branches, concatenated, 3x3 bottleneck."""

    def __init__(
        self, cin: int, branch_channels: int = 512, cout: int = 512, output_stride: int = 8
    ) -> None:
        super().__init__()
        if output_stride not in ASPP_RATES:
            raise ValueError(f"ASPP output_stride must be 8 or 16, got {output_stride!r}")
        self.rates = ASPP_RATES[output_stride]
        k = branch_channels
        # The reference's order: image pool, then dilation 1 (a 1x1 conv), then the atrous rates.
        self.branches = nn.ModuleList(
            [ASPPPooling(cin, k), _conv_bn_relu(cin, k, 1)]
            + [_conv_bn_relu(cin, k, 3, dilation=r) for r in self.rates]
        )
        self.bottleneck = _conv_bn_relu(len(self.branches) * k, cout, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.cat([branch(x) for branch in self.branches], dim=1)  # (B, 5K, h, w)
        return self.bottleneck(out)  # (B, C, h, w)


__all__ = ["ASPP", "ASPP_RATES", "POOL_GROUP_SIZE", "ASPPPooling", "pool_groups"]
