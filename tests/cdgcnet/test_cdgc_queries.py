"""CDGC queries="all" (every node a query of every class graph): dense vs streamed, readings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cdgcnet.cdgc import CDGCModule
from cdgcnet.config import ModelConfig
from tests.cdgcnet.test_cdgc import (
    CASES,
    C,
    M,
    _blob_labels,
    _case,
    _coarse_from_labels,
    _module,
    _run,
)


def _assert_dense_and_streamed_agree(mod, x, coarse, target, atol=1e-10):
    out_d, gx_d, gp_d = _run(mod, "dense", x, coarse, target)
    out_s, gx_s, gp_s = _run(mod, "segmented", x, coarse, target)
    torch.testing.assert_close(out_s, out_d, rtol=0, atol=atol)
    torch.testing.assert_close(gx_s, gx_d, rtol=0, atol=atol)
    for name, g in gp_d.items():
        assert g is not None and gp_s[name] is not None, f"no gradient for {name}"
        scale = max(1.0, g.abs().max())
        torch.testing.assert_close(gp_s[name], g, rtol=0, atol=atol * scale, msg=name)
    return out_d, gx_d, gp_d


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_dense_and_streamed_agree(name, checkpoint):
    kw, training, x, coarse, target = _case(name)
    mod = _module(queries="all", checkpoint=checkpoint, **kw).train(training)
    out, gx, grads = _assert_dense_and_streamed_agree(mod, x, coarse, target)
    if name == "all_ignored":  # no key anywhere: every class context is zero, R = ReLU(BN(0))
        assert gx.abs().max() == 0 and grads["graph_weight"].abs().max() == 0
    else:
        assert out.abs().sum() > 0 and gx.abs().sum() > 0  # the comparison is not vacuous


def _reference(mod: CDGCModule, x: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """Eq. 1-3 with all queries, pixel by pixel and class by class: R before BN (B, C, H, W)."""
    b, c, h, w = x.shape
    w_graph = mod.graph_weight.view(M, c, c)
    w_agg = mod.aggregate_weight.view(c, M, c)
    out = torch.zeros(b, h * w, c, dtype=x.dtype)
    for i in range(b):
        xf = x[i].flatten(1).t()  # (N, C)
        for m in range(M):
            keys = nodes[i, m].flatten().nonzero().squeeze(1)
            if not len(keys):
                continue
            att = (mod.phi(xf) @ mod.phi_prime(xf[keys]).t()).softmax(-1)  # (N, |V_m|)
            z = F.relu(att @ xf[keys] @ w_graph[m].t())  # (N, C), every row
            out[i] += z @ w_agg[:, m].t()
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", ["eval", "ds_ratio_1.0", "empty_class"])
def test_streamed_matches_a_pixel_by_pixel_reference(name):
    kw, training, x, coarse, target = _case(name)
    mod = _module(queries="all", **kw).train(training)
    nodes = mod.node_sets(coarse, target)
    captured = {}
    mod.bn.register_forward_hook(lambda _m, inp, _o: captured.update(pre=inp[0]))
    with torch.no_grad():
        torch.manual_seed(7)
        mod(x, coarse, target)
        expected = _reference(mod, x, nodes)
    torch.testing.assert_close(captured["pre"], expected, rtol=0, atol=1e-10)


def _class_maps(mod: CDGCModule, x, coarse, target, monkeypatch) -> torch.Tensor:
    """Norms (B, M, N) of the class contexts A_m X that the dense path feeds W_m (before ReLU,
    so a zero is structural: a row that was not a query, not a ReLU that cut every channel)."""
    captured = {}
    conv2d = F.conv2d

    def spy(inp, weight, *args, **kwargs):
        if weight is mod.graph_weight:
            captured["z"] = inp  # (B, M*C, H, W)
        return conv2d(inp, weight, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(F, "conv2d", spy)
        mod.impl = "dense"
        torch.manual_seed(7)
        with torch.no_grad():
            mod(x, coarse, target)
    z = captured["z"]
    b, _, h, w = z.shape
    return z.view(b, M, C, h * w).norm(dim=2)


@pytest.mark.parametrize("training", [True, False])
def test_all_queries_hide_membership_from_the_aggregation(training, monkeypatch):
    """With queries="all" every pixel of an image gets the same set of non-zero class contexts
    (the classes with keys in that image), so the layers after it cannot read a pixel's own
    membership; with queries="members" the set follows each pixel's membership."""
    kw, _, x, coarse, target = _case("ds_ratio_1.0")
    for queries in ("all", "members"):
        mod = _module(queries=queries, **kw).train(training)
        nonzero = _class_maps(mod, x, coarse, target, monkeypatch) > 0  # (B, M, N)
        nodes = mod.node_sets(coarse, target).flatten(2)  # (B, M, N)
        has_keys = nodes.any(-1, keepdim=True)  # (B, M, 1)
        if queries == "all":
            assert torch.equal(nonzero, has_keys.expand_as(nonzero))
        else:
            assert torch.equal(nonzero, nodes)
            assert not torch.equal(nonzero, has_keys.expand_as(nonzero))


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


def test_plain_gcn_is_the_same_under_both_readings():
    for name in ("plain_train", "plain_eval"):
        kw, training, x, coarse, target = _case(name)
        outs = [
            _run(_module(queries=q, **kw).train(training), "segmented", x, coarse, target)[0]
            for q in ("members", "all")
        ]
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_jagged_refuses_all_queries():
    _, _, x, coarse, target = _case("ds_ratio_1.0")
    mod = _module(queries="all", impl="jagged").train()
    with pytest.raises(ValueError, match="impl='jagged' cannot run with queries='all'"):
        mod(x, coarse, target)
    with pytest.raises(ValueError, match="queries must be one of"):
        CDGCModule(C, M, queries="some")
    with pytest.raises(ValueError, match=r"ModelConfig\.queries must be one of"):
        ModelConfig(queries="some")
    with pytest.raises(ValueError, match="impl='jagged' cannot run queries='all'"):
        ModelConfig(queries="all", impl="jagged")


def test_model_config_reaches_the_module():
    from cdgcnet.model import CDGCNet

    cfg = ModelConfig(num_classes=3, depth=18, channels=8, aspp_channels=8, queries="all")
    assert CDGCNet(cfg).context.queries == "all"
    assert CDGCNet(cfg.replace(queries="members")).context.queries == "members"


def _saved_bytes(mod: CDGCModule, x, coarse, target) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mod(x.detach().requires_grad_(True), coarse, target)
    return sum(storages.values())


def test_checkpoint_keeps_less_for_backward_and_not_per_class():
    b, h, w, c, m = 2, 12, 12, 16, 8
    x = torch.randn(b, c, h, w)
    labels = _blob_labels(b, h, w, m)
    coarse = _coarse_from_labels(labels, m).float()
    saved = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        mod = CDGCModule(c, m, graph="sim", queries="all", checkpoint=ckpt).train()
        saved[ckpt] = _saved_bytes(mod, x, coarse, labels)
    per_class_map = b * h * w * c * 4  # one (B, N, C) fp32 tensor
    classes = int(labels.unique().numel())
    assert saved[False] > 2 * classes * per_class_map  # SDPA output and ReLU output per class
    assert saved[True] < 8 * per_class_map < saved[False] / 2  # inputs only, whatever M
