"""How the CDGC graph's matrix products are computed: one policy, applied from outside the math.

The unscaled dot-product softmax of eq. 2-3 is ill-conditioned: an error e in a score s becomes a
relative error e in exp(s), and scores reach the hundreds at C=512, so bf16 rounding of the
scores (relative 2^-9) moves attention weights by tens of percent. What needs fp32-grade accuracy
is therefore the score product and the projections feeding it; products after the softmax and
the whole backward tolerate bf16 (measured in benchmarks/README.md, "CDGC precision").

A product is computed one of three ways (``how``):

- "exact": in the operands' dtype (float32 or float64): the reference, and CPU training.
- "bf16": operands rounded to bf16, products accumulated in fp32 (tensor cores), fp32 result.
- "split": each operand a = hi + lo with hi = bf16(a), lo = bf16(a - hi), and
  a @ b = hi_a hi_b + hi_a lo_b + lo_a hi_b, as ONE bf16 GEMM over a concatenated inner
  dimension (3K): about 16 mantissa bits, at bf16 tensor-core speed (3x the flops).

Grouped products (one weight or one key block per class) use ``torch.nn.functional.grouped_mm``,
whose fast CUDA kernels take bf16 in and give bf16 out; there "bf16" is the only fast choice.

On CPU the bf16 forms are emulated exactly: bf16-rounded operands multiplied in float32 (what the
tensor cores do), so CPU tests measure the GPU's numerics.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cdgcnet.cdgc import triton_blocks

HOWS = ("exact", "bf16", "split")


@dataclass(frozen=True)
class Precision:
    """Which ``how`` the products of the CDGC graph use."""

    forward: str  # the forward's products (and their recompute in the backward), but:
    values: str  # V' = X W_m^T, an operand of the next product, as a grouped product
    aggregate: str  # the aggregation conv's forward product (after the last ReLU of Z)
    backward: str  # the gradient products

    def __post_init__(self) -> None:
        for name in ("forward", "values", "aggregate", "backward"):
            if getattr(self, name) not in HOWS:
                raise ValueError(f"Precision.{name} must be one of {HOWS}")


EXACT = Precision("exact", "exact", "exact", "exact")
POLICIES: dict[str, Precision] = {
    "fp32": EXACT,  # everything in float32
    "split": Precision("split", "split", "split", "bf16"),  # fp32-grade forward, bf16 backward
    "autocast": Precision("bf16", "bf16", "bf16", "bf16"),  # everything in bf16
}
"""The ``precision`` choices of the module. They act only under a bf16/fp16 autocast region;
outside one (CPU training, float64 tests) every product is exact in the input's dtype."""


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the graph's elementwise math: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------- plain products


def split(a: Tensor) -> tuple[Tensor, Tensor]:
    """a = hi + lo (up to 2^-16 relative), both bf16."""
    hi = a.to(torch.bfloat16)
    return hi, (a - hi.to(a.dtype)).to(torch.bfloat16)


def mm(a: Tensor, b: Tensor, how: str) -> Tensor:
    """a (m, k) @ b (k, n) computed as ``how`` says: float32 for "split", the operands' dtype when
    exact, bf16 for "bf16" (cuBLAS's plain bf16 GEMM: the backward's products, whose outputs
    are gradients and tolerate bf16 rounding)."""
    if how == "bf16":
        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
        return a @ b if a.is_cuda else (a.float() @ b.float()).to(torch.bfloat16)
    return mm_prepared(left(a, how), right_t(b.t(), how), how)


def left(a: Tensor, how: str) -> Tensor:
    """a (m, k) as the left operand of a product ``how``: [hi, hi, lo] (m, 3k) for "split"."""
    if how == "split":
        hi, lo = split(a)
        return torch.cat([hi, hi, lo], dim=1)
    return a if how == "exact" else a.to(torch.bfloat16)


def right_t(b_t: Tensor, how: str) -> Tensor:
    """b given transposed, b^T (n, k), as the right operand: [hi, lo, hi] (n, 3k) for "split"."""
    if how == "split":
        hi, lo = split(b_t)
        return torch.cat([hi, lo, hi], dim=1)
    return b_t if how == "exact" else b_t.to(torch.bfloat16)


def mm_prepared(a: Tensor, b_t: Tensor, how: str) -> Tensor:
    """a @ b_t^T for operands from ``left`` and ``right_t``."""
    if how == "exact":
        return a @ b_t.t()
    return _bf16_mm(a, b_t.t())


def _bf16_mm(a: Tensor, b: Tensor) -> Tensor:
    """bf16 (m, k) @ bf16 (k, n) accumulated and returned in float32."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # exact products of bf16 values, fp32 sums: the GPU's numerics


# ---------------------------------------------------------------------- grouped products


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, ends: list[int], how: str) -> Tensor:
    """One product per group, the groups delimited along the jagged dimension by ``offsets``
    (int32 cumulative ends on a's device) == ``ends`` (the same on the host):

    - a (T, k) 2-D, b (G, k, n) 3-D: rows of a by group -> (T, n)
    - a (m, T) 2-D, b (T, n) 2-D: the inner dimension by group -> (G, m, n); every group
      non-empty (the kernel leaves an empty group's block unwritten)

    "exact" gives the operands' dtype, "bf16" a bf16 result (what the fast CUDA kernel writes).
    "split" (2-D x 3-D only): a_hi b_hi + a_lo b_hi + a_hi b_lo summed in float32, a float32
    result (a Triton kernel on CUDA: torch's bf16 kernel would round the output to bf16, and
    V' = X W_m^T feeds a sum whose cancellations make that rounding a gradient error of 4-5%).
    """
    if how == "split":
        if b.dim() != 3:
            raise ValueError("grouped 'split' products take a 3-D b")
        if a.is_cuda and triton_blocks.available():
            with contextlib.suppress(triton_blocks.Unavailable):
                return triton_blocks.rows(a, b, ends)
        # The same bf16 products summed in float32.
        (a_hi, a_lo), (b_hi, b_lo) = (tuple(t.float() for t in split(x)) for x in (a, b))
        top = grouped_mm(torch.cat([a_hi, a_lo], 1), torch.cat([b_hi, b_hi], 1), offsets, ends,
                         "exact")  # fmt: skip
        return top + grouped_mm(a_hi, b_lo, offsets, ends, "exact")
    dtype = a.dtype
    if how == "bf16":
        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
        if not a.is_cuda:  # emulate: bf16 operands, fp32 sums, bf16 result
            a, b = a.float(), b.float()
    out = _torch_grouped(a, b, offsets, ends) if _native(a, b) else _grouped_loop(a, b, ends)
    return out.to(torch.bfloat16 if how == "bf16" else dtype)


def block_sums(v: Tensor, e: Tensor, offsets: Tensor, ends: list[int], how: str) -> Tensor:
    """Per key block g (rows of T): v_g^T e_g -> (G, m, n), v (T, m) and e (T, n) float32
    (bf16 for "bf16"), where v's last 8 columns are [1, 0, ..., 0] (so row m-8 of the result
    holds the block sums of e). "split": v_hi e_hi + v_lo e_hi + v_hi e_lo accumulated in
    float32.

    Its output must stay float32: the fast grouped kernel's bf16 output would round the class
    contexts by 2^-9, which the aggregation and BN carry into the module's output and the final
    ReLU turns into gradient errors of several percent (benchmarks/README.md)."""
    if how != "split":
        return grouped_mm(v.t(), e, offsets, ends, how)
    # The same bf16 products summed in float32 (attention.py runs them as a Triton kernel on
    # CUDA, with the exponentials of e fused).
    hi, lo = (t.float() for t in split(v))
    e_hi, e_lo = (t.float() for t in split(e))
    m = hi.shape[1]
    top = grouped_mm(torch.cat([hi, lo], 1).t(), e_hi, offsets, ends, "exact")  # (G, 2m, n)
    return top[:, :m] + top[:, m:] + grouped_mm(hi.t(), e_lo, offsets, ends, "exact")


def _torch_grouped(a: Tensor, b: Tensor, offsets: Tensor, ends: list[int]) -> Tensor:
    try:
        return F.grouped_mm(a, b, offs=offsets)
    except RuntimeError as err:  # a layout rule of the CUDA kernel this code did not foresee
        if not a.is_cuda:
            raise
        warnings.warn(
            f"cdgcnet/cdgc: grouped_mm refused {tuple(a.shape)} x {tuple(b.shape)} "
            f"({str(err).splitlines()[0]}); computing one product per group instead",
            stacklevel=2,
        )
        return _grouped_loop(a, b, ends)


def _native(a: Tensor, b: Tensor) -> bool:
    """Whether torch's grouped_mm takes these operands: float32 or bf16 with 16-byte strides and
    addresses. (On CUDA bf16 runs its grouped kernel; float32 a loop over the groups in C++
    after reading the offsets on the host: one sync, used once per step for V'.)"""
    ok = (torch.float32, torch.bfloat16)
    return a.dtype == b.dtype and a.dtype in ok and _aligned(a) and _aligned(b)


def _aligned(t: Tensor) -> bool:
    """16-byte aligned start and strides (in one of the last two dims the stride may be 1)."""
    size = t.element_size()
    if t.data_ptr() % 16:
        return False
    inner = [s for s in t.stride()[-2:] if s != 1]
    return len(inner) <= 1 and all(s * size % 16 == 0 for s in (*inner, *t.stride()[:-2]))


def _grouped_loop(a: Tensor, b: Tensor, ends: list[int]) -> Tensor:
    """grouped_mm one group at a time (float64, unaligned shapes); same shapes and layout."""
    starts = [0, *ends[:-1]]
    if b.dim() == 3:  # rows of a by group; rows past the last end are zero
        out = a.new_zeros(a.shape[0], b.shape[2])
        for g, (s, e) in enumerate(zip(starts, ends, strict=True)):
            out[s:e] = a[s:e] @ b[g]
        return out
    return torch.stack([a[:, s:e] @ b[s:e] for s, e in zip(starts, ends, strict=True)])


# ---------------------------------------------------------------------- autograd forms


class Linear(torch.autograd.Function):
    """x (n, k) @ w (c, k)^T -> (n, c), forward as ``scores`` says, backward as ``backward``."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, policy: Precision) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.how = policy.backward
        return mm(x, w.t().to(x.dtype), policy.forward).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        grad_x = (
            mm(grad, w.to(grad.dtype), ctx.how).to(x.dtype) if ctx.needs_input_grad[0] else None
        )
        grad_w = mm(grad.t(), x, ctx.how).to(w.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


class GroupedLinear(torch.autograd.Function):
    """Rows of x (T, k) sorted by group, row t times w[g(t)] (G, c, k)^T -> (T, c); forward as
    ``how``, backward as ``bwd``."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offsets: Tensor, ends: list[int], how: str, bwd: str):
        ctx.save_for_backward(x, w, offsets)
        ctx.ends, ctx.how = ends, bwd
        return grouped_mm(x, w.to(x.dtype).transpose(1, 2), offsets, ends, how)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w, offsets = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm(grad, w.to(grad.dtype), offsets, ctx.ends, ctx.how).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_mm(grad.t(), x, offsets, ctx.ends, ctx.how).to(w.dtype)
        return grad_x, grad_w, None, None, None, None
