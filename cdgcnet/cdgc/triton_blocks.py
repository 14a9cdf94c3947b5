"""Per-class block sums with float32 output on CUDA, in Triton: the product the fast path needs
at fp32-grade accuracy that torch's grouped kernels cannot give (their fast CUDA form writes
bf16, their float32 form loops over classes on CUDA cores after a sync).

    out[g, :m] = v[s_g:e_g]^T e[s_g:e_g]    v (T, m), e (T, n) float32 -> out (G, m+1, n) float32
    out[g, m]  = sum of e[s_g:e_g] over rows (the softmax sums, in float32)

Each tile splits its float32 operands into bf16 hi + lo in registers and accumulates
hi*hi + lo*hi + hi*lo in float32 on the tensor cores (about 16 mantissa bits).

``available()`` is False where Triton is not installed (torch's CUDA builds ship it) or the
kernel failed to compile once (with a warning); the fast path then computes the same products
with torch's grouped products in float32.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU builds of torch come without Triton
    triton = None


if triton is not None:

    @triton.jit
    def _block_sums_kernel(
        v_ptr, e_ptr, out_ptr, ends_ptr, m, n,
        stride_vt, stride_vm, stride_et, stride_en, stride_og, stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EMULATE: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        start = tl.load(ends_ptr + g - 1, mask=g > 0, other=0)
        end = tl.load(ends_ptr + g)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sums = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(start, end, BLOCK_K):
            kk = k0 + rk
            in_k = kk < end
            v = tl.load(
                v_ptr + kk[None, :] * stride_vt + rm[:, None] * stride_vm,
                mask=in_k[None, :] & (rm[:, None] < m),
                other=0.0,
            )  # (BLOCK_M, BLOCK_K): v^T
            e = tl.load(
                e_ptr + kk[:, None] * stride_et + rn[None, :] * stride_en,
                mask=in_k[:, None] & (rn[None, :] < n),
                other=0.0,
            )  # (BLOCK_K, BLOCK_N)
            if pid_m == 0:
                sums += tl.sum(e, axis=0)
            v_hi = v.to(tl.bfloat16)
            v_lo = (v - v_hi.to(tl.float32)).to(tl.bfloat16)
            e_hi = e.to(tl.bfloat16)
            e_lo = (e - e_hi.to(tl.float32)).to(tl.bfloat16)
            if EMULATE:  # Triton's CPU interpreter: the same bf16 values, float32 dots
                v_hi, v_lo = v_hi.to(tl.float32), v_lo.to(tl.float32)
                e_hi, e_lo = e_hi.to(tl.float32), e_lo.to(tl.float32)
                acc += tl.dot(v_hi, e_hi, input_precision="ieee")
                acc += tl.dot(v_lo, e_hi, input_precision="ieee")
                acc += tl.dot(v_hi, e_lo, input_precision="ieee")
            else:
                acc = tl.dot(v_hi, e_hi, acc)
                acc = tl.dot(v_lo, e_hi, acc)
                acc = tl.dot(v_hi, e_lo, acc)
        out = out_ptr + g * stride_og + rm[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(out, acc, mask=(rm[:, None] < m) & (rn[None, :] < n))
        if pid_m == 0:
            out = out_ptr + g * stride_og + m * stride_om + rn * stride_on
            tl.store(out, sums, mask=rn < n)

    def blocks(v: Tensor, e: Tensor, ends: Tensor, rows: int) -> Tensor:
        """The kernel's output, or the emulation's if the kernel fails (then never tried again)."""
        global _broken
        try:
            return _blocks(v, e, ends, rows)
        except Exception as err:  # compilation on an unforeseen toolchain
            _broken = True
            warnings.warn(
                f"cdgcnet/cdgc: the Triton block-sums kernel failed ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); using torch's grouped "
                "products in float32 instead",
                stacklevel=2,
            )
            raise Unavailable from err

    def _blocks(v: Tensor, e: Tensor, ends: Tensor, rows: int) -> Tensor:
        """v (T, m), e (T, n) float32, ends (G,) int32 cumulative -> (G, rows, n) float32 with
        rows > m: rows m+1.. are left unwritten."""
        m, n, g = v.shape[1], e.shape[1], ends.shape[0]
        out = torch.empty(g, rows, n, dtype=torch.float32, device=v.device)
        grid = (triton.cdiv(m, 128), triton.cdiv(n, 128), g)
        _block_sums_kernel[grid](
            v, e, out, ends, m, n,
            v.stride(0), v.stride(1), e.stride(0), e.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, EMULATE=not v.is_cuda,
            num_warps=8, num_stages=3,
        )  # fmt: skip
        return out

else:
    blocks = None

_broken = False


class Unavailable(RuntimeError):
    """The kernel cannot run here; the caller computes the same sums another way."""


def available() -> bool:
    return blocks is not None and not _broken
