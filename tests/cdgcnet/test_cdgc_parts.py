"""Node sets (cdgcnet/cdgc/nodes.py): CDGCModule.node_parts (the eq. (4) parts behind the Fig. 4
pictures), memberships, resize_target and check_ratio."""

from __future__ import annotations

import pytest
import torch

from cdgcnet.cdgc import CDGCModule, check_ratio, resize_target
from cdgcnet.cdgc.nodes import Sampling, memberships


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


def test_memberships_of_plain_gcn_sim_and_ds() -> None:
    coarse, target = _inputs()
    shape = (2, 6, 8, torch.device("cpu"))
    nodes, n_bad = memberships(None, None, None, shape)  # plain-GCN: one graph of every node
    assert nodes.shape == (2, 1, 48) and nodes.all() and int(n_bad) == 0
    nodes, n_bad = memberships(coarse, None, Sampling("sim"), shape)
    assert torch.equal(nodes.sum(1), torch.ones(2, 48, dtype=torch.long)) and int(n_bad) == 0
    bad = target.clone()
    bad[0, 4:6, :6] = 9  # at label resolution: three grid pixels outside [0, 3), not ignored
    nodes, n_bad = memberships(coarse, bad, Sampling("ds", 1.0), shape)
    assert int(n_bad) == 3 and nodes.sum(1).max() == 2  # a pixel in two sets


@pytest.mark.parametrize("ratio", [True, "0.5", -0.01, 1.01, None])
def test_check_ratio_names_where(ratio) -> None:
    assert check_ratio(0) == 0.0 and check_ratio(1) == 1.0 and check_ratio(0.25) == 0.25
    with pytest.raises(ValueError, match=r"sweep\.ratio must be a number in \[0, 1\]"):
        check_ratio(ratio, "sweep.ratio")
