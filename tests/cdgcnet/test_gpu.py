"""CUDA checks of the model (skipped without a GPU): the CDGC fast path against each reading's
dense reference on the device, the Triton block-sums kernel, the precision bound per mode, bf16
autocast training, the one host-device sync, and CUDA against the CPU in fp32."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from cdgcnet.cdgc import QUERIES, CDGCModule, triton_blocks
from cdgcnet.cdgc import module as cdgc_module
from cdgcnet.cdgc import precision as cdgc_precision
from cdgcnet.config import model_preset
from cdgcnet.inference import predict_logits
from cdgcnet.losses import CDGCLoss
from cdgcnet.model import build_model
from tests.cdgcnet import test_cdgc_precision as prec
from tests.cdgcnet.test_cdgc import (
    _assert_close_in_float32,
    _assert_fast_matches_dense,
    _blob_labels,
    _case,
    _coarse_from_labels,
    _module,
    _run,
)

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    """Exact fp32 on the GPU: TF32 convolutions and matmuls would blur the comparisons."""
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


@pytest.mark.parametrize(
    "name", ["empty_class", "pixel_in_two_sets", "one_image_all_ignored", "ds_ratio_0.5", "eval"]
)
@pytest.mark.parametrize("queries", QUERIES)
def test_fast_matches_dense_in_float64_on_cuda(queries: str, name: str) -> None:
    kw, training, x, coarse, target = _case(name)
    mod = _module(queries=queries, **kw).to(CUDA).train(training)
    x, coarse, target = x.to(CUDA), coarse.to(CUDA), target.to(CUDA)
    _assert_fast_matches_dense(mod, x, coarse, target)  # chunked and checkpointed too


@pytest.mark.parametrize("graph,ratio", [("ds", 0.5), ("sim", 1.0)])
@pytest.mark.parametrize("queries", QUERIES)
def test_fast_matches_dense_in_float32_on_cuda(queries: str, graph: str, ratio: float) -> None:
    torch.manual_seed(0)
    mod = CDGCModule(64, 19, graph=graph, ratio=ratio, queries=queries).to(CUDA).train()
    x, coarse, target = _inputs(2, 64, 19, 20, 24)
    _assert_close_in_float32(
        _run(mod, "fast", x, coarse, target), _run(mod, "dense", x, coarse, target)
    )


def _blocks_case(t: int, n: int, ends: list[int], m: int, seed: int = 0):
    """v (t, m), scores s (t, n) and their per-block max mu; float64 references of the kernel's
    outputs: per block v^T exp(s - mu) and the sums of exp(s - mu)."""
    g = torch.Generator().manual_seed(seed)
    v, s = torch.randn(t, m, generator=g), 3 * torch.randn(t, n, generator=g)
    starts = [0, *ends[:-1]]
    mu = torch.stack([s[a:b].max(0).values for a, b in zip(starts, ends, strict=True)])
    blocks = enumerate(zip(starts, ends, strict=True))
    cls = torch.cat([torch.full((b - a,), i) for i, (a, b) in blocks])
    e = torch.exp(s.double() - mu.double()[cls])
    ref = torch.stack([v[a:b].double().t() @ e[a:b] for a, b in zip(starts, ends, strict=True)])
    sums = torch.stack([e[a:b].sum(0) for a, b in zip(starts, ends, strict=True)])
    return v, s, mu, cls, e, ref, sums


def test_triton_block_sums_kernel_against_float64() -> None:
    # The compiled kernel (exp in registers, hi*hi + lo*hi + hi*lo in bf16, float32 sums): about
    # 16 mantissa bits, where one bf16 product gives 8; the row after v's holds the block sums.
    assert triton_blocks.available(), "Triton should ship with torch's CUDA builds"
    ends = [700, 701, 2048, 3000]  # a one-key class and ragged tiles
    v, s, mu, _, e, ref, sums = _blocks_case(3000, 1000, ends, 512)
    offsets = torch.tensor(ends, dtype=torch.int32, device=CUDA)
    out = triton_blocks.blocks(v.to(CUDA), s.to(CUDA), mu.to(CUDA), ends, rows=520).cpu()
    assert prec._rel(out[:, :512], ref) < 2e-5
    assert prec._rel(out[:, 512], sums) < 1e-5
    # torch's bf16 grouped product of the same e: its bf16 rounding is far larger
    v1 = torch.cat([v, torch.ones(3000, 1), torch.zeros(3000, 7)], 1).to(CUDA)
    bf16 = cdgc_precision.block_sums(v1, e.float().to(CUDA), offsets, ends, "bf16").cpu()
    assert prec._rel(bf16[:, :512].double(), ref) > 20 * prec._rel(out[:, :512], ref)


def test_triton_softmax_grad_kernel_against_float64() -> None:
    ends = [700, 701, 2048, 3000]
    _, s, mu, cls, e, _, sums = _blocks_case(3000, 1000, ends, 8)
    g = torch.Generator().manual_seed(1)
    dp = torch.randn(3000, 1000, generator=g).bfloat16()
    d = torch.randn(4, 1000, generator=g)
    member = torch.rand(4, 1000, generator=g) > 0.5
    p_ref = e / sums[cls]
    for masks in (None, member):
        ds_ref = p_ref * (dp.double() - d.double()[cls])
        if masks is not None:
            ds_ref = ds_ref * masks[cls]
        args = [t.to(CUDA) for t in (s, dp, cls, mu, sums.float(), d)]
        p, ds = triton_blocks.softmax_grad(*args, None if masks is None else masks.to(CUDA))
        assert p.dtype == ds.dtype == torch.bfloat16
        assert prec._rel(p.cpu(), p_ref) < 4e-3 and prec._rel(ds.cpu(), ds_ref) < 4e-3


@pytest.mark.parametrize("precision", ["split", "fp32"])
@pytest.mark.parametrize("sharpen", [1.0, 2.0], ids=["init", "sharpened"])
@pytest.mark.parametrize("queries", QUERIES)
def test_split_and_fp32_keep_gradients_within_two_percent_on_cuda(
    queries: str, sharpen: float, precision: str
) -> None:
    errors = prec.errors(queries, precision, sharpen, CUDA)
    assert max(errors.values()) <= prec.TOLERANCE, errors


@pytest.mark.parametrize("queries", QUERIES)
def test_autocast_loses_gradient_precision_on_cuda(queries: str) -> None:
    errors = prec.errors(queries, "autocast", 2.0, CUDA)
    assert errors["phi"] > prec.AUTOCAST_FLOOR and errors["x"] > prec.AUTOCAST_FLOOR, errors


def test_default_model_module_output_is_float32_under_bf16_autocast() -> None:
    # The default model's CDGC module (queries="all", precision="split") at the paper's width:
    # float32 out of a bf16 autocast region, within the documented error of a float64 copy.
    cfg = model_preset("cityscapes")
    model = build_model(dataclasses.replace(cfg, depth=18, pretrained=None)).to(CUDA).train()
    module = model.context
    assert (module.queries, module.precision, module.impl) == ("all", "split", "fast")
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    images = torch.randn(2, 3, 129, 129, device=CUDA)
    target = torch.randint(0, cfg.num_classes, (2, 129, 129), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(images, target)
    handle.remove()
    assert seen == [torch.float32]
    errors = prec.errors("all", "split", 2.0, CUDA)
    assert errors["out"] <= 0.01 and max(errors.values()) <= prec.TOLERANCE, errors


def test_cuda_matches_cpu_in_fp32() -> None:
    cfg = dataclasses.replace(model_preset("cpu_small"), graph="sim", aux=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randn(2, 3, 65, 81, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cpu = predict_logits(model, images)
        gpu = predict_logits(model.to(CUDA), images.to(CUDA)).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("precision", ["split", "fp32", "autocast"])
def test_train_step_under_bf16_autocast(precision: str) -> None:
    cfg = model_preset("cpu_small").replace(cdgc_precision=precision)
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


def _sync_allowed(fn, log: list):
    """fn with CUDA's sync check off while it runs, each call appended to log."""

    def allowed(*args, **kwargs):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            log.append(fn.__name__)
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    return allowed


@pytest.mark.parametrize("queries", QUERIES)
def test_training_step_syncs_only_in_the_cdgc_layout(
    queries: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUDA's own sync check ("error") around a channels-last bf16 step with the default
    # precision ("split"). Let through and counted: the layout's read of the segment sizes.
    # (V' and the class contexts run in Triton, the backward's grouped products in torch's bf16
    # kernel, the block max as an unchecked segment_reduce: none reads the device.)
    # tests/cdgcnet/test_host_syncs.py is the CPU version of this check.
    cfg = model_preset("cpu_small").replace(queries=queries)
    torch.manual_seed(0)
    model = build_model(cfg).to(CUDA).train()
    criterion = CDGCLoss(ohem_min_kept=1000, check_labels=False)
    images = torch.randn(2, 3, 97, 97, device=CUDA).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, cfg.num_classes, (2, 97, 97), device=CUDA)
    target[:, :8] = 255
    log: list[str] = []
    monkeypatch.setattr(cdgc_module, "build_layout", _sync_allowed(cdgc_module.build_layout, log))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, _ = criterion(model(images, target), target)
        total.backward()

    step()  # warm-up: lazy initialisation, kernel selection and Triton compilation may sync
    torch.cuda.synchronize()
    log.clear()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert log == ["build_layout"]
