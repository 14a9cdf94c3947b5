"""CDGC module (cdgcnet/cdgc/module.py): the fast path against each reading's dense reference in
float64 (output and every gradient) on the edge cases, chunking, checkpointing, node sets
(eq. 4), class isolation, validation.

Shapes: B=2 images of 5 x 6 nodes (N=30, not a multiple of the 8-query chunk that a tiny
``budget`` forces), C=6 channels, M=4 classes.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from cdgcnet.cdgc import IMPLS, LEGACY_IMPLS, PARTS, QUERIES, CDGCModule
from cdgcnet.cdgc import attention as attention_mod
from cdgcnet.cdgc.attention import DEFAULT_BUDGET

C, M = 6, 4
TINY_BUDGET = 1  # bytes: the fast path's smallest chunk, 8 queries


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
    mod = CDGCModule(C, M, **kw).double()
    # Non-trivial BN state so eval mode is a real affine map.
    mod.bn.running_mean.uniform_(-0.5, 0.5)
    mod.bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        mod.bn.weight.uniform_(0.5, 1.5)
        mod.bn.bias.uniform_(-0.5, 0.5)
    return mod


def _run(mod: CDGCModule, impl: str, x: torch.Tensor, coarse, target, seed: int = 7):
    """Output, input gradient and parameter gradients (None: missing) of one forward/backward."""
    mod.impl = impl
    mod.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same Bernoulli sample for every run
    out = mod(xx, coarse, target)
    weight = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype, device=out.device)
    weight = weight.view_as(out).sin()
    (out * weight).sum().backward()
    grads = {name: p.grad for name, p in mod.named_parameters()}
    return out.detach(), xx.grad, grads


def _assert_same(got, ref, atol: float, what: str) -> None:
    """Output, x gradient and every parameter gradient within atol (scaled by the gradient's
    size, at least 1)."""
    (out, gx, grads), (out_r, gx_r, grads_r) = got, ref
    torch.testing.assert_close(out, out_r, rtol=0, atol=atol, msg=lambda m: f"{what}: out {m}")
    torch.testing.assert_close(gx, gx_r, rtol=0, atol=atol, msg=lambda m: f"{what}: x {m}")
    for name, g in grads_r.items():
        assert g is not None and grads[name] is not None, f"{what}: no gradient for {name}"
        scale = max(1.0, g.abs().max().item())
        torch.testing.assert_close(
            grads[name], g, rtol=0, atol=atol * scale, msg=lambda m, n=name: f"{what}: {n} {m}"
        )


def _assert_close_in_float32(got, ref) -> None:
    """Output and every gradient within 1e-5 of each reference tensor's scale (at least 1)."""
    (out, gx, grads), (out_r, gx_r, grads_r) = got, ref
    pairs = [("out", out, out_r), ("x", gx, gx_r), *((n, grads[n], grads_r[n]) for n in grads_r)]
    for name, a, b in pairs:
        atol = 1e-5 * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# How the fast path is run against the one dense result: (budget, checkpoint).
FAST_VARIANTS = [(DEFAULT_BUDGET, False), (TINY_BUDGET, False), (TINY_BUDGET, True)]


def _assert_fast_matches_dense(mod: CDGCModule, x, coarse, target, atol: float = 1e-10):
    """The fast path (one chunk; 8-query chunks; 8-query chunks checkpointed) against dense."""
    ref = _run(mod, "dense", x, coarse, target)
    for budget, ckpt in FAST_VARIANTS:
        mod.budget, mod.checkpoint = budget, ckpt
        got = _run(mod, "fast", x, coarse, target)
        _assert_same(got, ref, atol, f"fast, budget={budget}, checkpoint={ckpt}")
    mod.budget, mod.checkpoint = DEFAULT_BUDGET, False
    return ref


def _case(name: str):
    """(module kwargs, training, x, coarse logits, target) for one edge case."""
    b, h, w = 2, 5, 6
    labels = _blob_labels(b, h, w)
    target = labels.clone()
    target[:, 0, :] = (target[:, 0, :] + 1) % M  # some hard positives / negatives
    target[0, 1, 1:3] = 3
    kw, training = {"graph": "ds", "ratio": 1.0}, True
    if name == "empty_class":  # class 2 has no node
        labels[labels == 2] = 1
        target[target == 2] = 0
        kw["graph"] = "sim"
    elif name == "empty_class_ds":
        labels[labels == 2] = 1
        target[target == 2] = 0
    elif name == "one_node_class":  # class 3 has a single node in the batch
        labels[labels == 3] = 0
        labels[1, 2, 4] = 3
        kw["graph"] = "sim"
    elif name == "pixel_in_two_sets":  # a hard negative of one class, hard positive of another
        target = (labels + 1) % M
        target[:, 2:] = labels[:, 2:]
    elif name == "one_class_covers":
        labels.zero_()
        target.zero_()
    elif name == "one_class_covers_eval":
        labels.zero_()
        training = False
    elif name == "one_image_all_ignored":  # image 1 has no node at all
        target[:, 3:, :2] = 255
        target[1] = 255
    elif name == "all_ignored":  # no node set has a node: R = ReLU(BN(0))
        target.fill_(255)
    elif name == "batch3":
        b = 3
        labels = _blob_labels(b, h, w, seed=3)
        target = torch.randint(0, M, (b, h, w), generator=torch.Generator().manual_seed(3))
    elif name == "batch1":
        labels, target = labels[:1], target[:1]
        b = 1
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
    "pixel_in_two_sets",
    "one_class_covers",
    "one_class_covers_eval",
    "one_image_all_ignored",
    "all_ignored",
    "batch1",
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


def _node_sets(name: str) -> torch.Tensor:
    kw, training, _, coarse, target = _case(name)
    torch.manual_seed(7)
    return _module(**kw).train(training).node_sets(coarse, target).flatten(2)  # (B, G, N)


def test_the_edge_cases_are_what_their_names_say():
    sizes = _node_sets("empty_class").sum(-1).sum(0)  # (M,) nodes per class
    assert sizes[2] == 0 and (sizes[[0, 1, 3]] > 0).all()
    assert _node_sets("empty_class_ds").sum(-1).sum(0)[2] == 0
    assert _node_sets("one_node_class").sum(-1).sum(0)[3] == 1
    assert _node_sets("pixel_in_two_sets").sum(1).max() == 2
    covers = _node_sets("one_class_covers")
    assert covers[:, 0].all() and not covers[:, 1:].any()
    ignored = _node_sets("one_image_all_ignored")
    assert not ignored[1].any() and ignored[0].any()
    assert not _node_sets("all_ignored").any()
    assert _node_sets("plain_train").shape[1] == 1 and _node_sets("plain_train").all()
    assert not torch.equal(_node_sets("ds_ratio_0.0"), _node_sets("ds_ratio_1.0"))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("queries", QUERIES)
def test_fast_matches_the_dense_reference_in_float64(queries, name):
    kw, training, x, coarse, target = _case(name)
    mod = _module(queries=queries, **kw).train(training)
    out, gx, grads = _assert_fast_matches_dense(mod, x, coarse, target)
    if name == "all_ignored":  # no key anywhere: every class context is zero, R = ReLU(BN(0))
        assert gx.abs().max() == 0 and grads["graph_weight"].abs().max() == 0
    else:
        assert out.abs().sum() > 0 and gx.abs().sum() > 0  # the comparison is not vacuous
        assert grads["phi.weight"].abs().sum() > 0 and grads["graph_weight"].abs().sum() > 0


@pytest.mark.parametrize("queries", QUERIES)
@pytest.mark.parametrize(
    "parts", [p for r in (1, 2, 3) for p in itertools.combinations(PARTS, r)], ids=str
)
def test_fast_matches_dense_for_each_parts_subset(parts, queries):
    _, _, x, coarse, target = _case("one_image_all_ignored")
    mod = _module(graph="ds", ratio=0.5, parts=parts, queries=queries).train()
    ref = _run(mod, "dense", x, coarse, target)
    _assert_same(_run(mod, "fast", x, coarse, target), ref, 1e-10, "fast")


@pytest.mark.parametrize("queries", QUERIES)
def test_fast_matches_dense_in_float32(queries):
    b, h, w, c, m = 2, 12, 12, 32, 5
    torch.manual_seed(0)
    mod = CDGCModule(c, m, graph="ds", ratio=0.5, queries=queries).train()
    x = torch.randn(b, c, h, w)
    coarse = 3.0 * F.one_hot(_blob_labels(b, h, w, m), m).permute(0, 3, 1, 2).float()
    target = _blob_labels(b, h, w, m, seed=5)
    target[:, :2] = 255
    _assert_close_in_float32(
        _run(mod, "fast", x, coarse, target), _run(mod, "dense", x, coarse, target)
    )


def test_a_tiny_budget_runs_8_query_chunks(monkeypatch):
    # N = 30 queries, padded to 32: four chunks of 8 per image, forward and backward alike.
    chunks = []
    scores = attention_mod._Image.scores

    def spy(self, cols):
        chunks.append((cols.start, cols.stop))
        return scores(self, cols)

    monkeypatch.setattr(attention_mod._Image, "scores", spy)
    kw, training, x, coarse, target = _case("ds_ratio_1.0")
    mod = _module(**kw).train(training)
    mod.budget = TINY_BUDGET
    _run(mod, "fast", x, coarse, target)
    per_pass = [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert chunks == per_pass * 4  # 2 images x (forward, backward)
    chunks.clear()
    mod.budget = DEFAULT_BUDGET
    _run(mod, "fast", x, coarse, target)
    assert chunks == [(0, 32)] * 4


@pytest.mark.parametrize("queries", QUERIES)
def test_every_parameter_gets_a_gradient_with_an_empty_class(queries):
    kw, training, x, coarse, target = _case("empty_class")
    mod = _module(queries=queries, **kw).train(training)
    _, _, grads = _run(mod, "fast", x, coarse, target)
    assert all(g is not None for g in grads.values())
    w = grads["graph_weight"].view(M, C, C)
    assert w[2].abs().max() == 0 and w[0].abs().max() > 0  # class 2 is empty
    agg = grads["aggregate_weight"].view(C, M, C)
    assert agg[:, 2].abs().max() == 0 and agg[:, 0].abs().max() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_class_isolation_at_inference_under_the_members_reading(impl):
    # "members": a pixel's context comes from its own class's node set only. "all" and "masked"
    # let every pixel read every class's keys, so the same perturbation leaks there.
    b, h, w = 2, 6, 7
    labels = _blob_labels(b, h, w)
    a = int(labels[0, 0, 0])
    x = torch.randn(b, C, h, w, dtype=torch.float64)
    coarse = _coarse_from_labels(labels)
    in_a = (labels == a)[:, None]  # (B, 1, H, W)
    x2 = x + 0.7 * torch.randn_like(x) * in_a
    diffs = {}
    for queries in QUERIES:
        mod = _module(graph="ds", impl=impl, queries=queries).eval()
        with torch.no_grad():
            diffs[queries] = (mod(x2, coarse) - mod(x, coarse)).abs()
    assert diffs["members"].masked_select(~in_a).max() == 0  # other classes' pixels untouched
    assert diffs["members"].masked_select(in_a).max() > 1e-3  # class-a pixels do change
    for queries in ("all", "masked"):
        assert diffs[queries].masked_select(~in_a).max() > 1e-6, queries
    plain = _module(class_wise=False, impl=impl).eval()
    with torch.no_grad():
        leak = (plain(x2, coarse) - plain(x, coarse)).abs()
    assert leak.masked_select(~in_a).max() > 1e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("class_wise", "queries"), [(True, q) for q in QUERIES] + [(False, "all")])
def test_checkpoint_gives_identical_gradients(impl, class_wise, queries):
    _, _, x, coarse, target = _case("ds_ratio_0.5")
    results = []
    for ckpt in (False, True):
        mod = _module(
            graph="ds", ratio=0.5, impl=impl, checkpoint=ckpt, class_wise=class_wise,
            queries=queries,
        )  # fmt: skip
        mod.budget = TINY_BUDGET
        mod.train()
        out, gx, grads = _run(mod, impl, x, coarse, target, seed=11)
        results.append((out, gx, grads, mod.bn.running_mean.clone()))
    (o0, gx0, g0, rm0), (o1, gx1, g1, rm1) = results
    _assert_same((o1, gx1, g1), (o0, gx0, g0), 0.0, f"checkpoint, {impl}")
    torch.testing.assert_close(rm1, rm0, rtol=0, atol=0)  # BN statistics updated once
    assert not torch.equal(rm0, torch.zeros_like(rm0))


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


def test_defaults_and_legacy_impl_names():
    mod = CDGCModule(C, M)
    assert (mod.impl, mod.queries, mod.precision, mod.budget) == (
        "fast", "all", "split", DEFAULT_BUDGET,
    )  # fmt: skip
    for legacy in LEGACY_IMPLS:  # stored configs of earlier versions
        assert CDGCModule(C, M, impl=legacy).impl == "fast"
        mod.impl = legacy
        assert mod.impl == "fast"
    assert "impl='fast'" in repr(mod) and "precision='split'" in repr(mod)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"graph": "knn"}, "graph must be one of"),
        ({"impl": "sparse"}, "impl must be one of"),
        ({"queries": "some"}, "queries must be one of"),
        ({"precision": "bf16"}, "precision must be one of"),
        ({"parts": ("easy", "hard")}, "parts must be a non-empty subset"),
        ({"parts": ()}, "parts must be a non-empty subset"),
        ({"parts": "easy"}, "parts must be a sequence"),
        ({"ratio": 1.5}, r"ratio must be a number in \[0, 1\]"),
        ({"ratio": -0.1}, r"ratio must be a number in \[0, 1\]"),
        ({"parts": ("easy",), "ratio": 0.0}, "graph=.ds. with parts=.*samples no node"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=f"cdgcnet/cdgc: {match}"):
        CDGCModule(C, M, **kwargs)


def test_bad_impl_assignment_is_refused():
    mod = CDGCModule(C, M, impl="dense")
    with pytest.raises(ValueError, match="impl must be one of"):
        mod.impl = "sparse"
    assert mod.impl == "dense"


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_are_named(impl):
    mod = CDGCModule(C, M, impl=impl).train()
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
        ((x.long(), coarse, target), "x must be floating point"),
        ((x, coarse, torch.full((2, 5, 6), 7)), r"60 pixel\(s\) with labels outside \[0, 4\)"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            mod(*args)
    with pytest.raises(ValueError, match="labels outside"):
        mod.node_sets(coarse, torch.full((2, 5, 6), -3))


@pytest.mark.parametrize("impl", IMPLS)
def test_plain_gcn_needs_no_coarse_logits(impl):
    _, _, x, coarse, target = _case("plain_train")
    mod = _module(class_wise=False, impl=impl).train()
    torch.manual_seed(7)
    with_logits = mod(x, coarse, target)
    torch.manual_seed(7)
    torch.testing.assert_close(mod(x), with_logits, rtol=0, atol=0)
