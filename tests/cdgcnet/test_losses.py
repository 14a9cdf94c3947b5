import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.ohem_loss import gather_ohem
from cdgcnet.losses import CDGCLoss, cross_entropy, ohem_cross_entropy

# Two classes, target 0 everywhere: logits (logit(p), 0) give true-class probability p.
PROBS = [0.1, 0.5, 0.69, 0.71, 0.9, 0.3]


def _two_class_case():
    p = torch.tensor(PROBS).reshape(1, 2, 3)
    logits = torch.stack([torch.log(p / (1 - p)), torch.zeros_like(p)], dim=1)  # (1, 2, 2, 3)
    target = torch.zeros(1, 2, 3, dtype=torch.long)
    target[0, 1, 2] = 255  # the p=0.3 pixel is ignored
    return logits, target


def _mean_nll(ps):
    return sum(-math.log(p) for p in ps) / len(ps)


def test_ohem_keeps_pixels_below_threshold():
    logits, target = _two_class_case()
    loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=2)
    assert loss.item() == pytest.approx(_mean_nll([0.1, 0.5, 0.69]), rel=1e-5)


def test_ohem_min_kept_takes_the_hardest():
    logits, target = _two_class_case()
    loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=4)
    assert loss.item() == pytest.approx(_mean_nll([0.1, 0.5, 0.69, 0.71]), rel=1e-5)
    # min_kept above the valid count: every valid pixel (ignored one still excluded).
    loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=100)
    assert loss.item() == pytest.approx(_mean_nll([0.1, 0.5, 0.69, 0.71, 0.9]), rel=1e-5)


def test_ohem_gradient_only_on_kept_pixels():
    logits, target = _two_class_case()
    logits.requires_grad_(True)
    ohem_cross_entropy(logits, target, thresh=0.7, min_kept=2).backward()
    touched = logits.grad.abs().sum(1)[0] > 0  # (2, 3)
    expected = torch.tensor([[True, True, True], [False, False, False]])
    assert torch.equal(touched, expected)


def test_losses_upsample_to_label_resolution():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, 6)
    target = torch.randint(0, 5, (2, 8, 12))
    target[0, :2] = 255
    up = F.interpolate(logits, size=(8, 12), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, target, ignore_index=255)
    assert cross_entropy(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # With min_kept >= pixels, OHEM is plain CE over valid pixels.
    ohem = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=10**6)
    assert ohem.item() == pytest.approx(expected.item(), rel=1e-6)


def test_all_ignored_gives_zero_with_grad():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), 255, dtype=torch.long)
    for loss in (cross_entropy(logits, target), ohem_cross_entropy(logits, target)):
        assert loss.item() == 0.0
        loss.backward()


def test_bad_labels_are_named():
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [7, 255]]])
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*\[7\]"):
        cross_entropy(logits, target)
    with pytest.raises(ValueError, match="int64"):
        cross_entropy(logits, target.float())


def test_cdgc_loss_weights_and_terms():
    torch.manual_seed(1)
    target = torch.randint(0, 4, (2, 16, 16))
    target[:, :3] = 255
    outputs = {k: torch.randn(2, 4, 8, 8) for k in ("coarse", "refined", "aux")}
    criterion = CDGCLoss(alpha=0.6, beta=0.7, gamma=0.4, ohem_thresh=0.7, ohem_min_kept=50)
    total, terms = criterion(outputs, target)
    l_c = cross_entropy(outputs["coarse"], target)
    l_f = ohem_cross_entropy(outputs["refined"], target, 0.7, 50)
    l_a = cross_entropy(outputs["aux"], target)
    assert terms["coarse"].item() == pytest.approx(l_c.item(), rel=1e-6)
    assert terms["refined"].item() == pytest.approx(l_f.item(), rel=1e-6)
    assert terms["aux"].item() == pytest.approx(l_a.item(), rel=1e-6)
    expected = 0.6 * l_c + 0.7 * l_f + 0.4 * l_a
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    # Other weights change the total accordingly.
    total2, _ = CDGCLoss(alpha=1.0, beta=0.0, gamma=2.0, ohem_min_kept=50)(outputs, target)
    assert total2.item() == pytest.approx((l_c + 2.0 * l_a).item(), rel=1e-6)


def test_cdgc_loss_absent_heads():
    target = torch.randint(0, 3, (1, 8, 8))
    outputs = {"coarse": torch.randn(1, 3, 8, 8, requires_grad=True)}
    total, terms = CDGCLoss()(outputs, target)
    assert set(terms) == {"coarse", "total"}
    # Fewer valid pixels than min_kept: OHEM keeps them all, so it equals the plain CE here.
    assert total.item() == pytest.approx(0.7 * cross_entropy(outputs["coarse"], target).item())
    total.backward()
    with pytest.raises(ValueError, match="'coarse'"):
        CDGCLoss()({"refined": torch.randn(1, 3, 8, 8)}, target)


def test_low_precision_logits_are_computed_in_fp32():
    torch.manual_seed(3)
    logits = torch.randn(1, 4, 4, 4)
    target = torch.randint(0, 4, (1, 8, 8))
    low = logits.to(torch.bfloat16).requires_grad_(True)
    ref = logits.to(torch.bfloat16).float()
    for fn in (cross_entropy, lambda x, t: ohem_cross_entropy(x, t, min_kept=10)):
        loss = fn(low, target)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(fn(ref, target).item(), rel=1e-6)
        loss.backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("seed", range(6))
def test_ohem_matches_the_gather_formulation(seed):
    # gather_ohem: the formulation with data-dependent shapes that the sync-free one replaced.
    # Random logits and ignore regions; min_kept below, near and above the hard and valid
    # counts, so that every branch of the rule is taken. Loss and gradient both match.
    g = torch.Generator().manual_seed(seed)
    logits = (2.5 * torch.randn(2, 5, 6, 7, generator=g)).double()
    target = torch.randint(0, 5, (2, 12, 14), generator=g)
    target[torch.rand(2, 12, 14, generator=g) < 0.2 * (seed % 3)] = 255
    n_valid = int((target != 255).sum())
    for thresh in (0.3, 0.7, 1.0):
        for min_kept in (0, 1, 17, n_valid // 2, n_valid - 1, n_valid, n_valid + 5, 10**6):
            ours = logits.clone().requires_grad_(True)
            ref = logits.clone().requires_grad_(True)
            loss = ohem_cross_entropy(ours, target, thresh, min_kept)
            expected = gather_ohem(ref, target, thresh, min_kept)
            loss.backward()
            expected.backward()
            case = (thresh, min_kept)
            assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-9), case
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-9, msg=str(case))


@pytest.mark.parametrize("heads", [("coarse",), ("coarse", "aux"), ("coarse", "refined", "aux")])
def test_final_prediction_gets_beta_ohem_in_every_model(heads):
    # Baselines (no context module) predict with the coarse logits: those get the same
    # beta * OHEM-CE as the refined logits of a CDGC model, never the plain CE.
    torch.manual_seed(4)
    target = torch.randint(0, 4, (2, 16, 16))
    outputs = {k: torch.randn(2, 4, 8, 8) for k in heads}
    criterion = CDGCLoss(alpha=0.6, beta=0.7, gamma=0.4, ohem_thresh=0.7, ohem_min_kept=20)
    total, terms = criterion(outputs, target)
    final = "refined" if "refined" in heads else "coarse"
    ohem = ohem_cross_entropy(outputs[final], target, 0.7, 20)
    assert terms[final].item() == pytest.approx(ohem.item(), rel=1e-6)
    # The hard pixels alone: OHEM differs from the plain CE on these random logits.
    assert abs(ohem.item() - cross_entropy(outputs[final], target).item()) > 1e-3
    expected = 0.7 * ohem
    if final == "refined":
        expected = expected + 0.6 * cross_entropy(outputs["coarse"], target)
    if "aux" in heads:
        expected = expected + 0.4 * cross_entropy(outputs["aux"], target)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
