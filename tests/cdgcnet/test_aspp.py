"""ASPP: the DeepLabV3 R-101-D8 head of mmsegmentation, up to its classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cdgcnet.aspp import ASPP, ASPPPooling, pool_groups
from cdgcnet.config import ModelConfig
from cdgcnet.model import CDGCNet


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_reference_layout_and_parameter_count():
    # The R-101-D8 head: in 2048, five branches of 512, a 3x3 bottleneck 2560 -> 512.
    aspp = ASPP(2048, 512, 512, output_stride=8)
    assert aspp.rates == (12, 24, 36)
    pool, one, *atrous = aspp.branches
    assert isinstance(pool, ASPPPooling) and pool.norm.num_groups == 32
    assert one[0].kernel_size == (1, 1)
    assert [b[0].dilation for b in atrous] == [(12, 12), (24, 24), (36, 36)]
    assert [b[0].padding for b in atrous] == [(12, 12), (24, 24), (36, 36)]
    neck = aspp.bottleneck[0]
    assert (neck.in_channels, neck.out_channels, neck.kernel_size) == (2560, 512, (3, 3))
    assert isinstance(aspp.bottleneck[1], nn.BatchNorm2d)
    # Convs have no bias (each is followed by a norm); BN / GN add 2 x 512 each.
    convs = 2 * 2048 * 512 + 3 * 9 * 2048 * 512 + 9 * 2560 * 512
    norms = 6 * 2 * 512
    assert _count(aspp) == convs + norms == 42_211_328


def test_model_has_no_extra_reduction_after_aspp():
    cfg = ModelConfig(num_classes=5, depth=18, channels=32, aspp_channels=16)
    with_aspp, without = CDGCNet(cfg), CDGCNet(ModelConfig(**{**vars(cfg), "aspp": False}))
    assert isinstance(with_aspp.head.reduce, nn.Identity)
    assert with_aspp.aspp.bottleneck[0].in_channels == 5 * 16
    assert with_aspp.aspp.bottleneck[0].out_channels == 32
    assert without.aspp is None and without.head.reduce[0].out_channels == 32
    feature = with_aspp.eval()(torch.randn(1, 3, 32, 32), return_features=True)["feature"]
    assert tuple(feature.shape) == (1, 32, 4, 4)


def test_pooling_branch_trains_at_one_image_per_rank():
    # BatchNorm on the (1, K, 1, 1) pooled map of one image would raise in training.
    torch.manual_seed(0)
    aspp = ASPP(8, 32, 16, output_stride=16).train()
    x = torch.randn(1, 8, 6, 5, requires_grad=True)
    out = aspp(x)
    assert tuple(out.shape) == (1, 16, 6, 5)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in aspp.parameters())
    pooled = aspp.branches[0](x)
    assert torch.equal(pooled, pooled[:, :, :1, :1].expand_as(pooled))  # constant over the grid
    # GroupNorm has no running statistics: the branch is the same function in eval.
    assert torch.equal(aspp.branches[0].eval()(x), pooled)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm2d(32).train()(torch.randn(1, 32, 1, 1))


@pytest.mark.parametrize(("channels", "groups"), [(512, 32), (64, 4), (24, 1)])
def test_pool_groups(channels: int, groups: int):
    assert pool_groups(channels) == groups


def test_bad_output_stride_is_named():
    with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
        ASPP(8, 8, 8, output_stride=32)
