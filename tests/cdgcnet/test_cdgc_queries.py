"""The three readings of section 3.3 (all_queries.py, members.py, masked.py): each against a
pixel-by-pixel statement of itself, what each one's class maps look like, that they differ,
and what autograd keeps for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cdgcnet.cdgc import IMPLS, QUERIES, CDGCModule
from cdgcnet.config import ModelConfig
from tests.cdgcnet.test_cdgc import (
    C,
    M,
    _blob_labels,
    _case,
    _coarse_from_labels,
    _module,
    _run,
)


def _loop_reference(mod: CDGCModule, x: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """Eq. 1-3 image by image and class by class, as each reading's docstring states it:
    R before BN (B, C, H, W). nodes (B, M, H, W)."""
    b, c, h, w = x.shape
    n = h * w
    w_graph = mod.graph_weight.view(M, c, c)
    w_agg = mod.aggregate_weight.view(c, M, c)
    out = torch.zeros(b, n, c, dtype=x.dtype)
    for i in range(b):
        xf = x[i].flatten(1).t()  # (N, C)
        q, k = mod.phi(xf), mod.phi_prime(xf)  # (N, C)
        for m in range(M):
            member = nodes[i, m].flatten()  # (N,)
            keys = member.nonzero().squeeze(1)
            if not len(keys):  # no node of class m in this image: no context
                continue
            scores = q @ k[keys].t()  # (N, |V_m|)
            if mod.queries == "masked":
                # the N - |V_m| zero features outside V_m are keys of score 0 and value 0
                top = scores.amax(-1, keepdim=True).clamp_min(0.0)
                e = (scores - top).exp()
                total = e.sum(-1, keepdim=True) + (n - len(keys)) * (-top).exp()
                ctx = e @ xf[keys] / total
                ctx[~member] = xf[keys].sum(0) / n  # a zero query attends uniformly
            else:
                ctx = scores.softmax(-1) @ xf[keys]  # (N, C), every node a query
                if mod.queries == "members":
                    ctx[~member] = 0.0
            out[i] += F.relu(ctx @ w_graph[m].t()) @ w_agg[:, m].t()
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


def _pre_bn(mod: CDGCModule, x, coarse, target) -> torch.Tensor:
    """The module's R before BN (B, C, H, W), with the seed _run uses."""
    captured = {}
    handle = mod.bn.register_forward_hook(lambda _m, inp, _o: captured.update(pre=inp[0]))
    try:
        torch.manual_seed(7)
        with torch.no_grad():
            mod(x, coarse, target)
    finally:
        handle.remove()
    return captured["pre"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("queries", QUERIES)
@pytest.mark.parametrize("name", ["eval", "ds_ratio_1.0", "empty_class", "pixel_in_two_sets"])
def test_each_reading_matches_its_pixel_by_pixel_statement(name, queries, impl):
    kw, training, x, coarse, target = _case(name)
    mod = _module(queries=queries, impl=impl, **kw).train(training)
    torch.manual_seed(7)
    nodes = mod.node_sets(coarse, target)
    with torch.no_grad():
        expected = _loop_reference(mod, x, nodes)
    torch.testing.assert_close(_pre_bn(mod, x, coarse, target), expected, rtol=0, atol=1e-10)


def _class_maps(queries: str, impl: str, training: bool):
    """A_m X_m of every class, read off the module: with W_m = I, x > 0 (so the ReLU keeps
    everything) and the aggregation selecting class m alone, R before BN is A_m X_m.
    Returns maps (B, M, N, C), node sets (B, M, N) and x as (B, N, C)."""
    kw, _, x, coarse, target = _case("ds_ratio_1.0")
    x = x.abs() + 0.1
    mod = _module(queries=queries, impl=impl, **kw).train(training)
    eye = torch.eye(C, dtype=torch.float64)
    with torch.no_grad():
        mod.graph_weight.copy_(eye.repeat(M, 1).view(M * C, C, 1, 1))
    maps = []
    for m in range(M):
        agg = torch.zeros(C, M, C, dtype=torch.float64)
        agg[:, m] = eye
        with torch.no_grad():
            mod.aggregate_weight.copy_(agg.view(C, M * C, 1, 1))
        maps.append(_pre_bn(mod, x, coarse, target).flatten(2).transpose(1, 2))  # (B, N, C)
    torch.manual_seed(7)
    nodes = mod.node_sets(coarse, target).flatten(2)
    return torch.stack(maps, 1), nodes, x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("queries", QUERIES)
def test_class_maps_follow_the_reading(queries, impl, training):
    """ "members": a class map is non-zero exactly on V_m, so the layers after it can read a
    pixel's membership (its label, with "ds"). "all" and "masked": every pixel of an image gets
    a context from each class with nodes in that image, so they cannot."""
    maps, nodes, _ = _class_maps(queries, impl, training)
    nonzero = maps.abs().amax(-1) > 0  # (B, M, N)
    has_keys = nodes.any(-1, keepdim=True).expand_as(nonzero)  # (B, M, N)
    assert not torch.equal(nodes, has_keys)  # some class misses some node: not vacuous
    if queries == "members":
        assert torch.equal(nonzero, nodes)
    else:
        assert torch.equal(nonzero, has_keys)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_non_members_attend_uniformly(impl):
    """ "masked": a node outside V_m has feature 0, so it scores 0 against every key and its
    context is the mean over all N nodes of X_m: sum over V_m of x, divided by N. Members get a
    softmax whose denominator counts the N - |V_m| zero keys, so they differ from "all"."""
    maps, nodes, x = _class_maps("masked", impl, True)
    n = x.shape[1]
    uniform = torch.einsum("bmn,bnc->bmc", nodes.double(), x) / n  # (B, M, C)
    outside = ~nodes & nodes.any(-1, keepdim=True)  # non-members of classes present
    assert outside.sum() > 10
    expected = uniform[:, :, None].expand_as(maps)
    torch.testing.assert_close(maps[outside], expected[outside], rtol=0, atol=1e-12)
    all_maps, _, _ = _class_maps("all", impl, True)
    assert (maps[nodes] - all_maps[nodes]).abs().max() > 1e-3
    # ... and members attend to members more than a uniform mean would
    assert not torch.allclose(maps[nodes], expected[nodes])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_three_readings_differ(training):
    kw, _, x, coarse, target = _case("ds_ratio_1.0")
    outs = {}
    for queries in QUERIES:
        mod = _module(queries=queries, **kw).train(training)
        outs[queries] = _run(mod, "fast", x, coarse, target)
    for a, b in (("all", "members"), ("all", "masked"), ("members", "masked")):
        (out_a, gx_a, _), (out_b, gx_b, _) = outs[a], outs[b]
        assert (out_a - out_b).abs().max() > 1e-2, (a, b)
        assert (gx_a - gx_b).abs().max() > 1e-3, (a, b)


def test_all_queries_at_inference_depend_on_membership_through_the_keys_only():
    """At inference the output at pixel i changes with the key sets and x only: two coarse maps
    that give the same node sets give the same output, and the readings differ."""
    b, h, w = 2, 6, 7
    labels = _blob_labels(b, h, w)
    x = torch.randn(b, C, h, w, dtype=torch.float64)
    mod = _module(queries="all").eval()
    with torch.no_grad():
        out = mod(x, _coarse_from_labels(labels, seed=0))
        same_sets = mod(x, _coarse_from_labels(labels, seed=5))  # other logits, same argmax
        mod.queries = "members"
        members = mod(x, _coarse_from_labels(labels, seed=0))
    torch.testing.assert_close(same_sets, out, rtol=0, atol=1e-12)
    assert (members - out).abs().max() > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_plain_gcn_is_the_same_under_every_reading(impl):
    for name in ("plain_train", "plain_eval"):
        kw, training, x, coarse, target = _case(name)
        outs = [
            _run(_module(queries=q, **kw).train(training), impl, x, coarse, target)[0]
            for q in QUERIES
        ]
        for other in outs[1:]:
            torch.testing.assert_close(other, outs[0], rtol=0, atol=0)


def test_model_config_reaches_the_module():
    from cdgcnet.model import CDGCNet

    cfg = ModelConfig(num_classes=3, depth=18, channels=8, aspp_channels=8)
    module = CDGCNet(cfg).context
    assert (module.queries, module.impl, module.precision) == ("all", "fast", "split")
    for queries in QUERIES:
        assert CDGCNet(cfg.replace(queries=queries)).context.queries == queries
    module = CDGCNet(cfg.replace(impl="dense", cdgc_precision="fp32", checkpoint=True)).context
    assert (module.impl, module.precision, module.checkpoint) == ("dense", "fp32", True)
    assert CDGCNet(cfg.replace(impl="jagged")).context.impl == "fast"
    assert not CDGCNet(cfg.replace(context="plain_gcn")).context.class_wise


def _saved_bytes(mod: CDGCModule, x, coarse, target) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mod(x.detach().requires_grad_(True), coarse, target)
    return sum(storages.values())


@pytest.mark.parametrize("queries", QUERIES)
def test_what_is_kept_for_backward_does_not_grow_per_class(queries):
    # The fast path keeps q, k, v and per (class, query) softmax statistics; no (B, N, C) map per
    # class. Checkpointed, it keeps the module's input and BN's, whatever M.
    b, h, w, c = 2, 12, 12, 16
    x = torch.randn(b, c, h, w)
    per_map = b * h * w * c * 4  # one (B, N, C) fp32 tensor
    saved = {}
    for m in (4, 32):
        labels = _blob_labels(b, h, w, m)
        coarse = _coarse_from_labels(labels, m).float()
        for ckpt in (False, True):
            torch.manual_seed(0)
            mod = CDGCModule(c, m, graph="sim", queries=queries, checkpoint=ckpt).train()
            saved[m, ckpt] = _saved_bytes(mod, x, coarse, labels)
        assert labels.unique().numel() >= min(m, 16)
    weights = 2 * (32 - 4) * c * c * 4  # W_m and the aggregation's columns of 28 more classes
    assert saved[32, False] - saved[4, False] < weights + per_map
    assert saved[32, True] == saved[4, True] < 4 * per_map < saved[4, False] / 2
