"""Atrous spatial pyramid pooling (DeepLabv3): 1x1 branch, three atrous 3x3 branches, image pooling."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Atrous rates per output stride (DeepLabv3: rates double when the stride halves).
ASPP_RATES: dict[int, tuple[int, int, int]] = {8: (12, 24, 36), 16: (6, 12, 18)}


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool, 1x1 conv, broadcast back to the grid.

    No BatchNorm here: on a 1x1 map BN needs more than one image per rank in training, and the
    paper's Cityscapes setting (batch 8) runs one image per GPU on 8 GPUs.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))  # (B, cout, 1, 1)
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """(B, cin, h, w) -> (B, cout, h, w): five parallel branches, concatenated and projected."""

    def __init__(self, cin: int, cout: int = 256, output_stride: int = 8) -> None:
        super().__init__()
        if output_stride not in ASPP_RATES:
            raise ValueError(f"ASPP output_stride must be 8 or 16, got {output_stride!r}")
        self.rates = ASPP_RATES[output_stride]
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, cout, 1)]
            + [_conv_bn_relu(cin, cout, 3, dilation=r) for r in self.rates]
            + [ASPPPooling(cin, cout)]
        )
        self.project = _conv_bn_relu(5 * cout, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.cat([branch(x) for branch in self.branches], dim=1)  # (B, 5*cout, h, w)
        return self.project(out)


__all__ = ["ASPP", "ASPP_RATES", "ASPPPooling"]
