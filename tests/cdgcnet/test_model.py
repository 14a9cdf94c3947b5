import pytest
import torch

from cdgcnet.aspp import ASPP
from cdgcnet.config import ModelConfig, model_preset
from cdgcnet.losses import CDGCLoss
from cdgcnet.model import CDGCNet, build_model, final_logits, param_groups


def _cfg(**kw) -> ModelConfig:
    base = dict(num_classes=5, depth=18, channels=16, aspp_channels=16, dropout=0.1)
    base.update(kw)
    return ModelConfig(**base)


# The paper's ablation variants (Tables 1-3) plus the options of the basic network.
VARIANTS = {
    "baseline": dict(aspp=False, context="none"),
    "aspp": dict(aspp=True, context="none"),
    "plain_gcn": dict(aspp=False, context="plain_gcn"),
    "class_gcn": dict(aspp=False, context="cdgc", graph="sim"),
    "cdgc_concat": dict(aspp=False, context="cdgc", fusion="concat"),
    "cdgc_sum": dict(aspp=False, context="cdgc", fusion="sum"),
    "aspp_cdgc_concat": dict(aspp=True, context="cdgc", fusion="concat"),
    "aspp_cdgc_sum": dict(aspp=True, context="cdgc", fusion="sum"),
    "aspp_cdgc_sim": dict(aspp=True, context="cdgc", graph="sim"),
    "ds_ratio0_parts": dict(context="cdgc", ratio=0.0, parts=("hard_pos", "hard_neg")),
    "dense_impl": dict(context="cdgc", impl="dense"),
    "os16_deep_stem": dict(output_stride=16, deep_stem=True),
    "no_aux_checkpoint": dict(aux=False, checkpoint=True),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_forward_shapes_and_backward(name):
    torch.manual_seed(0)
    cfg = _cfg(**VARIANTS[name])
    model = build_model(cfg)
    stride = cfg.output_stride
    images = torch.randn(2, 3, 64, 48)
    target = torch.randint(0, 5, (2, 64, 48))
    target[:, :4] = 255
    out = model(images, target, return_features=True)
    h, w = 64 // stride, 48 // stride
    has_context = cfg.context != "none"
    expected = {"coarse", "feature"} | ({"refined", "context"} if has_context else set())
    expected |= {"aux"} if cfg.aux else set()
    assert set(out) == expected
    for key in ("coarse", "refined", "aux"):
        if key in out:
            assert out[key].shape == (2, 5, h, w), key
    assert out["feature"].shape == (2, 16, h, w)
    if has_context:
        assert out["context"].shape == (2, 16, h, w)
    assert final_logits(out) is (out["refined"] if has_context else out["coarse"])

    loss, terms = CDGCLoss(ohem_min_kept=500)(out, target)
    assert set(terms) == {"coarse", "total"} | ({"refined"} if has_context else set()) | (
        {"aux"} if cfg.aux else set()
    )
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    zero = [n for n, p in model.named_parameters() if not bool(p.grad.abs().sum() > 0)]
    assert zero == []

    model.eval()
    with torch.no_grad():
        eval_out = model(images)
    assert set(eval_out) == {"coarse"} | ({"refined"} if has_context else set())


def test_fusion_widths_and_context_kind():
    concat = CDGCNet(_cfg(fusion="concat"))
    summed = CDGCNet(_cfg(fusion="sum"))
    assert concat.fusion.classifier[1].in_channels == 32
    assert summed.fusion.classifier[1].in_channels == 16
    assert concat.context.class_wise
    assert not CDGCNet(_cfg(context="plain_gcn")).context.class_wise
    baseline = CDGCNet(_cfg(context="none", aspp=False, aux=False))
    assert baseline.context is None and baseline.aspp is None and baseline.aux_head is None


def test_eval_ignores_target_and_is_deterministic():
    torch.manual_seed(0)
    model = build_model(_cfg()).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = model(images)["refined"]
        b = model(images, torch.randint(0, 5, (1, 32, 32)))["refined"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_param_groups_cover_each_parameter_once():
    model = build_model(_cfg())
    groups = param_groups(model, lr=0.01, head_lr_mult=10.0, weight_decay=5e-4)
    assert [g["name"] for g in groups] == ["backbone", "heads"]
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == pytest.approx(0.1)
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups[0]["params"]} == backbone_ids
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # the groups are accepted as they are


def test_bad_images_are_named():
    model = build_model(_cfg()).eval()
    with pytest.raises(ValueError, match=r"images \(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))


def test_batch_of_one_trains():
    # One image per rank (Cityscapes: batch 8 on 8 GPUs) must work, ASPP image pooling included.
    model = build_model(_cfg(aspp=True))
    images, target = torch.randn(1, 3, 40, 40), torch.randint(0, 5, (1, 40, 40))
    loss, _ = CDGCLoss(ohem_min_kept=100)(model(images, target), target)
    loss.backward()
    assert torch.isfinite(loss)


def test_paper_preset_builds_and_runs():
    torch.manual_seed(0)
    model = build_model(model_preset("cityscapes")).train()
    assert isinstance(model.aspp, ASPP) and model.aspp.rates == (12, 24, 36)
    assert model.backbone.depth == 101 and model.aspp.bottleneck[0].out_channels == 512
    assert isinstance(model.head.reduce, torch.nn.Identity)  # the ASPP's bottleneck reduces
    assert model.fusion.classifier[1].in_channels == 1024
    out = model(torch.randn(1, 3, 33, 33), torch.randint(0, 19, (1, 33, 33)))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (1, 19, 5, 5) for k in ("coarse", "refined", "aux")
    }


def test_module_demo_runs(capsys):
    from cdgcnet.__main__ import main

    main(["--size", "33", "--batch", "1", "--steps", "1"])
    printed = capsys.readouterr().out
    assert "parameters without a gradient: none" in printed
    assert "step 0: coarse" in printed and "eval: logits (1, 19, 33, 33)" in printed
