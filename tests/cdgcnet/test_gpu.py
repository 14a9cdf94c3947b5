"""CUDA checks of the model (skipped without a GPU): the CDGC implementations agree on the
device, bf16 autocast trains, and CUDA matches the CPU in fp32."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from cdgcnet.cdgc import CDGCModule
from cdgcnet.config import model_preset
from cdgcnet.inference import predict_logits
from cdgcnet.losses import CDGCLoss
from cdgcnet.model import build_model
from tests.cdgcnet.test_cdgc import _blob_labels, _coarse_from_labels

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    """Exact fp32 on the GPU: TF32 convolutions would blur a 1e-4 comparison."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _inputs(b: int, c: int, m: int, h: int, w: int):
    labels = _blob_labels(b, h, w, m=m, seed=5)
    target = labels.clone()
    target[:, : h // 4] = (target[:, : h // 4] + 1) % m  # hard positives and negatives
    target[:, -2:] = 255
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(2))
    coarse = _coarse_from_labels(labels, m=m).float()
    return x.to(CUDA), coarse.to(CUDA), target.to(CUDA)


def _fwd_bwd(mod: CDGCModule, x, coarse, target):
    mod.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    torch.manual_seed(3)  # the same Bernoulli sample (CUDA generator) for every call
    out = mod(xx, coarse, target)
    out.square().mean().backward()
    return out.detach(), xx.grad, {n: p.grad for n, p in mod.named_parameters()}


@pytest.mark.parametrize("graph,ratio", [("ds", 0.5), ("ds", 1.0), ("sim", 1.0)])
def test_dense_and_segmented_agree_on_cuda(graph: str, ratio: float) -> None:
    torch.manual_seed(0)
    mod = CDGCModule(64, 19, graph=graph, ratio=ratio, queries="members").to(CUDA).train()
    x, coarse, target = _inputs(2, 64, 19, 20, 24)
    mod.impl = "dense"
    out_d, gx_d, gp_d = _fwd_bwd(mod, x, coarse, target)
    mod.impl = "segmented"
    out_s, gx_s, gp_s = _fwd_bwd(mod, x, coarse, target)
    torch.testing.assert_close(out_s, out_d, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx_s, gx_d, rtol=1e-4, atol=1e-5)
    for name, g in gp_d.items():
        torch.testing.assert_close(gp_s[name], g, rtol=1e-3, atol=1e-5 * max(1.0, g.abs().max()))


def test_segmented_bf16_autocast_close_to_fp32_at_paper_width() -> None:
    torch.manual_seed(0)
    mod = CDGCModule(512, 19, graph="ds", ratio=1.0, queries="members").to(CUDA).train()
    x, coarse, target = _inputs(2, 512, 19, 33, 33)
    out32, _, _ = _fwd_bwd(mod, x, coarse, target)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out16, gx16, grads16 = _fwd_bwd(mod, x, coarse, target)
    assert out16.dtype == torch.bfloat16
    rel = (out16.float() - out32).norm() / out32.norm()
    assert rel < 0.05, f"bf16 output differs from fp32 by {rel:.3%}"
    assert torch.isfinite(gx16).all()
    assert all(g is not None and torch.isfinite(g).all() for g in grads16.values())


def test_cuda_matches_cpu_in_fp32() -> None:
    cfg = dataclasses.replace(model_preset("cpu_small"), graph="sim", aux=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randn(2, 3, 65, 81, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cpu = predict_logits(model, images)
        gpu = predict_logits(model.to(CUDA), images.to(CUDA)).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


def test_train_step_under_bf16_autocast() -> None:
    cfg = model_preset("cpu_small")
    torch.manual_seed(0)
    model = build_model(cfg).to(CUDA).train()
    criterion = CDGCLoss(ohem_min_kept=1000)
    images = torch.randn(2, 3, 97, 97, device=CUDA)
    target = torch.randint(0, cfg.num_classes, (2, 97, 97), device=CUDA)
    target[:, :8] = 255
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images, target)
        total, terms = criterion(out, target)
    total.backward()
    assert set(terms) == {"coarse", "refined", "aux", "total"}
    assert torch.isfinite(total)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("impl", ["segmented", "jagged"])
def test_training_step_syncs_only_in_the_cdgc_plan(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUDA's own sync check ("error") around a channels-last bf16 step; the CDGC plan's one
    # segment-size read is let through and counted. tests/cdgcnet/test_host_syncs.py is the
    # CPU version of this check.
    cfg = model_preset("cpu_small").replace(impl=impl, queries="members")
    torch.manual_seed(0)
    model = build_model(cfg).to(CUDA).train()
    criterion = CDGCLoss(ohem_min_kept=1000, check_labels=False)
    images = torch.randn(2, 3, 97, 97, device=CUDA).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, cfg.num_classes, (2, 97, 97), device=CUDA)
    target[:, :8] = 255
    plans = []
    plan = CDGCModule._plan

    def plan_allowed(self, *args):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            plans.append(1)
            return plan(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(CDGCModule, "_plan", plan_allowed)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, _ = criterion(model(images, target), target)
        total.backward()

    step()  # warm-up: lazy initialisation and kernel selection may sync
    torch.cuda.synchronize()
    plans.clear()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert plans == [1]


@pytest.mark.parametrize("impl", ["segmented", "jagged"])
def test_attention_runs_on_the_memory_efficient_kernel_at_width_512(impl: str) -> None:
    # Flash attention takes head dimensions up to 256; the paper's C = 512 must not fall back
    # to the math kernel, which builds each segment's L x L matrix in memory. "jagged" runs
    # all segments as one nested tensor; the restriction makes SDPA fail if no fused kernel
    # takes it.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cdgcnet.cdgc import _jagged_attention, _segment_attention

    attend = _jagged_attention if impl == "jagged" else _segment_attention
    g = torch.Generator(device=CUDA).manual_seed(0)
    sizes = [700, 0, 1, 2048, 333]
    q, k, v = (
        torch.randn(sum(sizes), 512, device=CUDA, generator=g, dtype=torch.bfloat16)
        .mul_(0.05)
        .requires_grad_(True)
        for _ in range(3)
    )
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        out = attend(q, k, v, sizes)
        out.float().square().sum().backward()
    with sdpa_kernel(SDPBackend.MATH):
        ref = _segment_attention(q.detach(), k.detach(), v.detach(), sizes)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("c,bf16", [(64, False), (512, True)])
def test_jagged_matches_segmented_on_cuda(c: int, bf16: bool) -> None:
    # One nested-tensor SDPA call (a varlen kernel) against the per-segment calls.
    torch.manual_seed(0)
    mod = CDGCModule(c, 19, graph="ds", ratio=1.0, queries="members").to(CUDA).train()
    x, coarse, target = _inputs(2, c, 19, 33, 33)
    results = {}
    for impl in ("segmented", "jagged"):
        mod.impl = impl
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            results[impl] = _fwd_bwd(mod, x, coarse, target)
    (out_s, gx_s, gp_s), (out_j, gx_j, gp_j) = results["segmented"], results["jagged"]
    tol = 2e-2 if bf16 else 1e-4
    assert (out_j.float() - out_s.float()).norm() <= tol * out_s.float().norm()
    assert (gx_j - gx_s).norm() <= tol * gx_s.norm()
    for name, g in gp_s.items():
        assert (gp_j[name] - g).norm() <= tol * max(g.norm(), 1e-6), name
