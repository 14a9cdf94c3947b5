"""CDGCModule.node_parts (the eq. (4) parts behind the Fig. 4 pictures) and resize_target."""

from __future__ import annotations

import pytest
import torch

from cdgcnet.cdgc import CDGCModule, resize_target


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(2, 3, 6, 8, generator=g)  # (B, M, h, w)
    target = torch.randint(0, 3, (2, 12, 16), generator=g)  # label resolution: 2x the grid
    target[:, :2] = 255
    return coarse, target


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.0])
def test_parts_are_the_training_node_sets_split(ratio) -> None:
    module = CDGCModule(in_channels=4, num_classes=3, graph="ds", ratio=ratio)
    coarse, target = _inputs()
    torch.manual_seed(3)
    parts = module.eval().node_parts(coarse, target)  # any mode: drawn as training draws
    torch.manual_seed(3)
    nodes = module.train().node_sets(coarse, target)  # (B, M, h, w)
    union = torch.zeros_like(nodes)
    for part in parts.values():
        union |= part
    assert torch.equal(union, nodes)
    c = torch.nn.functional.one_hot(coarse.argmax(1), 3).permute(0, 3, 1, 2).bool()  # C_m
    gt = resize_target(target, (6, 8))
    g = torch.stack([gt == m for m in range(3)], 1)  # G_m
    assert torch.equal(parts["hard_pos"], g & ~c)
    assert torch.equal(parts["hard_neg"], c & ~g & (gt != 255)[:, None])
    if ratio == 0.0:
        assert "easy" not in parts
    else:
        assert not (parts["easy"] & ~(c & g)).any()
        assert torch.equal(parts["easy"], c & g) == (ratio == 1.0)


def test_parts_follow_the_configured_parts_and_need_class_wise() -> None:
    coarse, target = _inputs()
    module = CDGCModule(in_channels=4, num_classes=3, parts=("hard_pos",))
    assert set(module.node_parts(coarse, target)) == {"hard_pos"}
    with pytest.raises(ValueError, match="plain-GCN has no class parts"):
        CDGCModule(in_channels=4, num_classes=3, class_wise=False).node_parts(coarse, target)
    with pytest.raises(ValueError, match=r"labels outside \[0, 3\)"):
        CDGCModule(in_channels=4, num_classes=3).node_parts(coarse, target.clamp(max=7) + 4)


def test_resize_target_is_nearest_and_keeps_ids() -> None:
    target = torch.arange(16).view(1, 4, 4)
    assert torch.equal(resize_target(target, (2, 2)), torch.tensor([[[0, 2], [8, 10]]]))
    assert torch.equal(resize_target(target, (4, 4)), target)  # already on the grid
    up = resize_target(target, (8, 8))
    assert torch.equal(up[0, ::2, ::2], target[0]) and up.unique().numel() == 16
