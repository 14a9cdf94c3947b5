"""CDGC module: dense vs segmented agreement, node sets (eq. 4), isolation, checkpointing."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from cdgcnet.cdgc import PARTS, CDGCModule

C, M = 6, 4


def _coarse_from_labels(labels: torch.Tensor, m: int = M, seed: int = 0) -> torch.Tensor:
    """Logits (B, M, H, W) whose argmax is `labels`, with noise so they are not trivial."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(*labels.shape[:1], m, *labels.shape[1:], generator=g, dtype=torch.float64)
    return 3.0 * F.one_hot(labels, m).permute(0, 3, 1, 2).double() + noise


def _blob_labels(b: int, h: int, w: int, m: int = M, seed: int = 0) -> torch.Tensor:
    """Smooth random class blobs (B, H, W), like a real coarse map."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(b, m, 3, 3, generator=g)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).argmax(1)


def _module(**kw) -> CDGCModule:
    torch.manual_seed(0)
    mod = CDGCModule(C, M, **{"queries": "members", **kw}).double()
    # Non-trivial BN state so eval mode is a real affine map.
    mod.bn.running_mean.uniform_(-0.5, 0.5)
    mod.bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        mod.bn.weight.uniform_(0.5, 1.5)
        mod.bn.bias.uniform_(-0.5, 0.5)
    return mod


def _run(mod: CDGCModule, impl: str, x: torch.Tensor, coarse, target, seed: int = 7):
    """Output, input gradient and parameter gradients (None -> missing) for one impl."""
    mod.impl = impl
    mod.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same Bernoulli sample for both impls
    out = mod(xx, coarse, target)
    weight = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view_as(out).sin()
    (out * weight).sum().backward()
    grads = {name: p.grad for name, p in mod.named_parameters()}
    return out.detach(), xx.grad, grads


def _assert_impls_agree(mod, x, coarse, target, atol=1e-10):
    """Both segmented implementations ("segmented", "jagged") against the dense reference."""
    out_d, gx_d, gp_d = _run(mod, "dense", x, coarse, target)
    for impl in ("segmented", "jagged"):
        out_s, gx_s, gp_s = _run(mod, impl, x, coarse, target)
        torch.testing.assert_close(out_s, out_d, rtol=0, atol=atol, msg=impl)
        torch.testing.assert_close(gx_s, gx_d, rtol=0, atol=atol, msg=impl)
        for name, g in gp_d.items():
            assert g is not None and gp_s[name] is not None, f"{impl}: no gradient for {name}"
            scale = max(1.0, g.abs().max())
            torch.testing.assert_close(gp_s[name], g, rtol=0, atol=atol * scale, msg=impl)
    return out_d, gx_d, gp_d


def _case(name: str):
    """(module kwargs, training, x, coarse logits, target) for one edge case."""
    b, h, w = 2, 5, 6
    labels = _blob_labels(b, h, w)
    target = labels.clone()
    target[:, 0, :] = (target[:, 0, :] + 1) % M  # some hard positives / negatives
    target[0, 1, 1:3] = 3
    kw, training = {"graph": "ds", "ratio": 1.0}, True
    if name == "empty_class":
        labels[labels == 2] = 1
        target[target == 2] = 0
        kw["graph"] = "sim"
    elif name == "empty_class_ds":
        labels[labels == 2] = 1
        target[target == 2] = 0
    elif name == "one_node_class":
        labels[labels == 3] = 0
        labels[1, 2, 4] = 3
        kw["graph"] = "sim"
    elif name == "one_class_covers":
        labels.zero_()
        target.zero_()
    elif name == "one_class_covers_eval":
        labels.zero_()
        training = False
    elif name == "ignore_pixels":
        target[:, 3:, :2] = 255
        target[1] = 255  # a fully ignored image
    elif name == "all_ignored":  # no node set has a node: R = ReLU(BN(0))
        target.fill_(255)
    elif name == "batch3":
        b = 3
        labels = _blob_labels(b, h, w, seed=3)
        target = torch.randint(0, M, (b, h, w))
    elif name == "eval":
        training = False
    elif name == "target_upsampled":
        target = target.repeat_interleave(2, 1).repeat_interleave(2, 2)  # (B, 2H, 2W)
    elif name.startswith("ds_ratio_"):
        kw["ratio"] = float(name.removeprefix("ds_ratio_"))
        target[:, 2:4, :] = 255
    elif name == "sim_train":
        kw["graph"] = "sim"
    elif name in ("plain_train", "plain_eval"):
        kw["class_wise"] = False
        training = name == "plain_train"
    else:
        raise AssertionError(name)
    x = torch.randn(b, C, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return kw, training, x, _coarse_from_labels(labels), target


CASES = [
    "empty_class",
    "empty_class_ds",
    "one_node_class",
    "one_class_covers",
    "one_class_covers_eval",
    "ignore_pixels",
    "all_ignored",
    "batch3",
    "eval",
    "target_upsampled",
    "ds_ratio_0.0",
    "ds_ratio_0.5",
    "ds_ratio_1.0",
    "sim_train",
    "plain_train",
    "plain_eval",
]


@pytest.mark.parametrize("name", CASES)
def test_dense_and_segmented_agree(name):
    kw, training, x, coarse, target = _case(name)
    mod = _module(**kw).train(training)
    out, gx, _ = _assert_impls_agree(mod, x, coarse, target)
    if name == "all_ignored":
        assert not mod.node_sets(coarse, target).any() and gx.abs().max() == 0
    else:
        assert out.abs().sum() > 0 and gx.abs().sum() > 0  # the comparison is not vacuous


@pytest.mark.parametrize(
    "parts", [p for r in (1, 2, 3) for p in itertools.combinations(PARTS, r)], ids=str
)
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_dense_and_segmented_agree_for_each_parts_subset(parts, ratio):
    _, _, x, coarse, target = _case("ignore_pixels")
    mod = _module(graph="ds", ratio=ratio, parts=parts).train()
    _assert_impls_agree(mod, x, coarse, target)


@pytest.mark.parametrize("queries", ["members", "all"])
def test_dense_and_fast_path_agree_in_float32(queries):
    b, h, w, c, m = 2, 12, 12, 32, 5
    torch.manual_seed(0)
    mod = CDGCModule(c, m, graph="ds", ratio=0.5, queries=queries).train()
    x = torch.randn(b, c, h, w)
    coarse = 3.0 * F.one_hot(_blob_labels(b, h, w, m), m).permute(0, 3, 1, 2).float()
    target = _blob_labels(b, h, w, m, seed=5)
    target[:, :2] = 255
    out_d, gx_d, gp_d = _run(mod, "dense", x, coarse, target)
    out_s, gx_s, gp_s = _run(mod, "segmented", x, coarse, target)

    def close(a, b):  # fp32: absolute tolerance relative to the tensor's scale
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * max(1.0, b.abs().max().item()))

    close(out_s, out_d)
    close(gx_s, gx_d)
    for name, g in gp_d.items():
        close(gp_s[name], g)


def test_every_parameter_gets_a_gradient_with_an_empty_class():
    kw, training, x, coarse, target = _case("empty_class")
    mod = _module(**kw).train(training)
    _, _, grads = _run(mod, "segmented", x, coarse, target)
    assert all(g is not None for g in grads.values())
    w = grads["graph_weight"].view(M, C, C)
    assert w[2].abs().max() == 0 and w[0].abs().max() > 0  # class 2 is empty


@pytest.mark.parametrize("impl", ["dense", "segmented", "jagged"])
def test_class_isolation_at_inference(impl):
    b, h, w = 2, 6, 7
    labels = _blob_labels(b, h, w)
    a = int(labels[0, 0, 0])
    mod = _module(graph="ds", impl=impl).eval()
    x = torch.randn(b, C, h, w, dtype=torch.float64)
    coarse = _coarse_from_labels(labels)
    in_a = (labels == a)[:, None]  # (B, 1, H, W)
    x2 = x + 0.7 * torch.randn_like(x) * in_a
    with torch.no_grad():
        diff = (mod(x2, coarse) - mod(x, coarse)).abs()
    assert diff.masked_select(~in_a).max() == 0  # class-b pixels untouched
    assert diff.masked_select(in_a).max() > 1e-3  # class-a pixels do change
    # The same perturbation leaks everywhere in plain-GCN, so the check above can fail.
    plain = _module(class_wise=False, impl=impl).eval()
    with torch.no_grad():
        leak = (plain(x2, coarse) - plain(x, coarse)).abs()
    assert leak.masked_select(~in_a).max() > 1e-6


# Hand-built 1 x 3 x 4 example with M = 3, ignore = 255.
_COARSE = torch.tensor([[[0, 0, 1, 1], [0, 2, 1, 1], [2, 2, 2, 0]]])
_TARGET = torch.tensor([[[0, 1, 1, 255], [0, 2, 2, 1], [2, 0, 255, 0]]])
# Per class, from eq. (4) by hand: E easy (C & G), P hard positive (G - C),
# N hard negative (C - G, not ignore).
_EXPECTED = {
    "easy": [
        [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]],
        [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]],
        [[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]],
    ],
    "hard_pos": [
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]],
        [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]],
    ],
    "hard_neg": [
        [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]],
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]],
    ],
}


@pytest.mark.parametrize(
    "parts", [p for r in (1, 2, 3) for p in itertools.combinations(PARTS, r)], ids=str
)
def test_ds_node_sets_equal_eq4_on_hand_built_masks(parts):
    mod = CDGCModule(4, 3, graph="ds", ratio=1.0, parts=parts).train()
    nodes = mod.node_sets(_coarse_from_labels(_COARSE, 3), _TARGET)
    expected = torch.zeros(1, 3, 3, 4, dtype=torch.bool)
    for p in parts:
        expected |= torch.tensor(_EXPECTED[p], dtype=torch.bool)[None]
    assert torch.equal(nodes, expected)


def test_ds_node_sets_ratio_samples_only_easy_positives():
    mod = CDGCModule(4, 3, graph="ds", ratio=0.0).train()
    nodes = mod.node_sets(_coarse_from_labels(_COARSE, 3), _TARGET)
    hard = torch.tensor(_EXPECTED["hard_pos"]) | torch.tensor(_EXPECTED["hard_neg"])
    assert torch.equal(nodes, hard.bool()[None])
    # ratio 0.3 on a big map: hard parts always in, easy positives kept at about 30 %.
    b, h, w, m = 2, 64, 64, 3
    coarse_labels = _blob_labels(b, h, w, m, seed=1)
    target = _blob_labels(b, h, w, m, seed=2)
    target[:, :8] = 255
    coarse = _coarse_from_labels(coarse_labels, m)
    mod = CDGCModule(4, m, graph="ds", ratio=0.3).train()
    torch.manual_seed(0)
    nodes = mod.node_sets(coarse, target)
    cm = F.one_hot(coarse_labels, m).permute(0, 3, 1, 2).bool()
    gm = F.one_hot(target.clamp(max=m), m + 1)[..., :m].permute(0, 3, 1, 2).bool()
    easy = cm & gm
    hard = (gm & ~cm) | (cm & ~gm & (target != 255)[:, None])
    assert torch.equal(nodes & ~easy, hard)
    frac = (nodes & easy).sum() / easy.sum()
    assert 0.27 < frac < 0.33, frac
    assert nodes.sum(1).max() <= 2  # a pixel is in at most two node sets in training


def test_node_sets_at_inference_and_for_sim_are_the_coarse_masks():
    coarse = _coarse_from_labels(_COARSE, 3)
    expected = F.one_hot(_COARSE, 3).permute(0, 3, 1, 2).bool()
    ds = CDGCModule(4, 3, graph="ds", ratio=0.5).eval()
    assert torch.equal(ds.node_sets(coarse, _TARGET), expected)
    sim = CDGCModule(4, 3, graph="sim").train()
    assert torch.equal(sim.node_sets(coarse, _TARGET), expected)
    assert torch.equal(ds.node_sets(coarse).sum(1), torch.ones(1, 3, 4, dtype=torch.long))


def test_node_sets_resize_target_with_nearest():
    mod = CDGCModule(4, 3, graph="ds").train()
    big = _TARGET.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (1, 12, 16)
    coarse = _coarse_from_labels(_COARSE, 3)
    assert torch.equal(mod.node_sets(coarse, big), mod.node_sets(coarse, _TARGET))


def test_jagged_refuses_checkpointing_with_a_clear_error():
    _, _, x, coarse, target = _case("ds_ratio_0.5")
    mod = _module(graph="ds", ratio=0.5, impl="jagged", checkpoint=True).train()
    with pytest.raises(ValueError, match="impl='jagged' cannot run with checkpoint=True"):
        mod(x.requires_grad_(True), coarse, target)
    with torch.no_grad():  # nothing to checkpoint without gradients: runs
        assert mod(x, coarse, target).shape == x.shape


@pytest.mark.parametrize("impl", ["dense", "segmented"])
@pytest.mark.parametrize(
    ("class_wise", "queries"), [(True, "members"), (True, "all"), (False, "members")]
)
def test_checkpoint_gives_identical_gradients(impl, class_wise, queries):
    _, _, x, coarse, target = _case("ds_ratio_0.5")
    results = []
    for ckpt in (False, True):
        mod = _module(
            graph="ds", ratio=0.5, impl=impl, checkpoint=ckpt, class_wise=class_wise,
            queries=queries,
        )  # fmt: skip
        mod.train()
        out, gx, grads = _run(mod, impl, x, coarse, target, seed=11)
        results.append((out, gx, grads, mod.bn.running_mean.clone()))
    (o0, gx0, g0, rm0), (o1, gx1, g1, rm1) = results
    torch.testing.assert_close(o1, o0, rtol=0, atol=0)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0)
    torch.testing.assert_close(rm1, rm0, rtol=0, atol=0)  # BN statistics updated once


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"graph": "knn"}, "graph must be one of"),
        ({"impl": "sparse"}, "impl must be one of"),
        ({"parts": ("easy", "hard")}, "parts must be a non-empty subset"),
        ({"parts": ()}, "parts must be a non-empty subset"),
        ({"parts": "easy"}, "parts must be a sequence"),
        ({"ratio": 1.5}, r"ratio must be a number in \[0, 1\]"),
        ({"ratio": -0.1}, r"ratio must be a number in \[0, 1\]"),
        ({"parts": ("easy",), "ratio": 0.0}, "graph=.ds. with parts=.*samples no node"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=f"cdgcnet/cdgc.py: {match}"):
        CDGCModule(C, M, **kwargs)


def test_bad_impl_assignment_is_refused():
    mod = CDGCModule(C, M)
    with pytest.raises(ValueError, match="impl must be one of"):
        mod.impl = "fast"
    assert mod.impl == "segmented"


def test_bad_inputs_are_named():
    mod = CDGCModule(C, M, queries="members").train()
    x = torch.randn(2, C, 5, 6)
    coarse = torch.randn(2, M, 5, 6)
    target = torch.zeros(2, 5, 6, dtype=torch.long)
    cases = [
        ((torch.randn(2, C + 1, 5, 6), coarse, target), "channels, the module expects"),
        ((x, torch.randn(2, M + 1, 5, 6), target), "num_classes=4"),
        ((x, torch.randn(2, M, 4, 6), target), "does not match x"),
        ((x, torch.randn(1, M, 5, 6), target), "does not match x"),
        ((x, coarse, torch.zeros(3, 5, 6, dtype=torch.long)), "target batch 3"),
        ((x, coarse, torch.zeros(2, 5, 6)), "integer labels"),
        ((x, coarse, None), "needs the target"),
        ((x, None, target), "coarse_logits must be"),
        ((x[0], coarse, target), "x must be a"),
        ((x, coarse, torch.full((2, 5, 6), 7)), "labels outside"),
    ]
    for impl in ("dense", "segmented", "jagged"):
        mod.impl = impl
        for args, match in cases:
            with pytest.raises(ValueError, match=match):
                mod(*args)
    with pytest.raises(ValueError, match="labels outside"):
        mod.node_sets(coarse, torch.full((2, 5, 6), -3))


@pytest.mark.parametrize("impl", ["dense", "segmented", "jagged"])
def test_runs_under_bf16_autocast_close_to_fp32(impl):
    b, h, w, c, m = 2, 8, 8, 16, 4
    torch.manual_seed(0)
    mod = CDGCModule(
        c, m, graph="ds", ratio=1.0, impl=impl, queries="members", precision="autocast"
    ).train()
    x = torch.randn(b, c, h, w, requires_grad=True)
    coarse = 3.0 * F.one_hot(_blob_labels(b, h, w, m), m).permute(0, 3, 1, 2).float()
    target = _blob_labels(b, h, w, m, seed=5)
    ref = mod(x, coarse, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(x, coarse, target)
    assert out.dtype == torch.bfloat16  # the module really ran in bf16
    out.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    rel = (out.float() - ref).abs().mean() / ref.abs().mean()
    assert rel < 0.05, rel
