"""The two fused steps of the class-block attention on CUDA, in Triton.

Legend: T keys (class blocks of rows), n queries, K' classes, m value channels.

``blocks``: the forward's class contexts with float32 output, which torch's grouped kernels
cannot give (their fast CUDA form writes bf16, their float32 form loops over classes on CUDA
cores after a sync), with the softmax's exponentials made in registers:

    e            = exp(s - mu[class])                         s (T, n) float32, mu (K', n)
    out[g, :m]   = v[block g]^T e[block g]                     v (T, m) float32
    out[g, m]    = sum of e[block g] over rows                 (the softmax sums)

Each tile splits its float32 operands into bf16 hi + lo in registers and accumulates
hi*hi + lo*hi + hi*lo in float32 on the tensor cores (about 16 mantissa bits).

``rows``: V' = X W_m^T with float32 output, rows of x grouped by class (the same split):

    out[t] = x[t] W[g(t)]^T                                    x (T, k), W (G, c, k) float32

``softmax_grad``: the softmax backward in one pass over the scores, with bf16 outputs for the
backward's products:

    p  = exp(s - mu[class]) / l[class]
    ds = p (dp - d[class])  (* member[class] for the masked reading)

``available()`` is False where Triton is not installed (torch's CUDA builds ship it) or a
kernel failed to run once (with a warning); the fast path then computes the same values with
torch operations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU builds of torch come without Triton
    triton = None

_broken = False
KEY_TILE = 1024
"""Keys per program of ``blocks``: classes of very different sizes would otherwise leave the
GPU waiting on the programs of the largest."""


class Unavailable(RuntimeError):
    """A kernel cannot run here; the caller computes the same values another way."""


def available() -> bool:
    return triton is not None and not _broken


def _guarded(fn: Callable) -> Callable:
    """Run a kernel launcher; on its first failure warn once, stop using Triton, and raise
    Unavailable so that the caller takes its torch path."""

    def run(*args, **kwargs):
        global _broken
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # compilation on an unforeseen toolchain
            _broken = True
            first = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(
                f"cdgcnet/cdgc: the Triton kernel {fn.__name__} failed ({type(err).__name__}: "
                f"{first}); using torch operations instead",
                stacklevel=3,
            )
            raise Unavailable from err

    run.__name__ = fn.__name__
    return run


if triton is not None:

    @triton.jit
    def _block_sums_kernel(
        v_ptr, s_ptr, mu_ptr, out_ptr, tile_group_ptr, tile_start_ptr, tile_end_ptr, m, n,
        stride_vt, stride_vm, stride_st, stride_sn, stride_mug, stride_mun,
        stride_og, stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EMULATE: tl.constexpr,
    ):  # fmt: skip
        # One program: a (BLOCK_M, BLOCK_N) output tile of one key tile (a slice of one class
        # block, so a large class is spread over many programs); key tiles of the same class
        # add into the zeroed output.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        tile = tl.program_id(2)
        g = tl.load(tile_group_ptr + tile)
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(tile_end_ptr + tile)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        in_n = rn < n
        mu = tl.load(mu_ptr + g * stride_mug + rn * stride_mun, mask=in_n, other=0.0)
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
            s = tl.load(
                s_ptr + kk[:, None] * stride_st + rn[None, :] * stride_sn,
                mask=in_k[:, None] & in_n[None, :],
                other=float("-inf"),
            )  # (BLOCK_K, BLOCK_N)
            e = tl.exp(s - mu[None, :])  # rows past the block: exp(-inf) = 0
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
        at = out_ptr + g * stride_og + rm[:, None] * stride_om + rn[None, :] * stride_on
        tl.atomic_add(at, acc, mask=(rm[:, None] < m) & in_n[None, :])
        if pid_m == 0:
            row = out_ptr + g * stride_og + m * stride_om + rn * stride_on
            tl.atomic_add(row, sums, mask=in_n)

    @triton.jit
    def _softmax_grad_kernel(
        s_ptr, dp_ptr, cls_ptr, mu_ptr, l_ptr, d_ptr, member_ptr, p_ptr, ds_ptr, t, n,
        stride_t, stride_n, stride_dpt, stride_dpn, stride_kg, stride_kn, stride_mg, stride_mn,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    ):  # fmt: skip
        rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = (rt[:, None] < t) & (rn[None, :] < n)
        c = tl.load(cls_ptr + rt, mask=rt < t, other=0)[:, None]  # (BLOCK_T, 1)
        at = rt[:, None] * stride_t + rn[None, :] * stride_n
        s = tl.load(s_ptr + at, mask=inside, other=0.0)
        dp = tl.load(
            dp_ptr + rt[:, None] * stride_dpt + rn[None, :] * stride_dpn, mask=inside, other=0.0
        ).to(tl.float32)
        per_class = c * stride_kg + rn[None, :] * stride_kn
        mu = tl.load(mu_ptr + per_class, mask=inside, other=0.0)
        ll = tl.load(l_ptr + per_class, mask=inside, other=1.0)
        d = tl.load(d_ptr + per_class, mask=inside, other=0.0)
        p = tl.exp(s - mu) / ll
        ds = p * (dp - d)
        if MASKED:
            member = tl.load(
                member_ptr + c * stride_mg + rn[None, :] * stride_mn, mask=inside, other=0
            )
            ds = ds * member.to(tl.float32)
        tl.store(p_ptr + at, p.to(tl.bfloat16), mask=inside)
        tl.store(ds_ptr + at, ds.to(tl.bfloat16), mask=inside)

    @triton.jit
    def _rows_kernel(
        x_ptr, w_ptr, out_ptr, tile_group_ptr, tile_start_ptr, ends_ptr, k_dim, c,
        stride_xt, stride_xk, stride_wg, stride_wc, stride_wk, stride_ot, stride_oc,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
        EMULATE: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        g = tl.load(tile_group_ptr + tile)
        end = tl.load(ends_ptr + g)
        rt = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_T)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rk = tl.arange(0, BLOCK_K)
        in_t = rt < end
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for k0 in range(0, k_dim, BLOCK_K):
            kk = k0 + rk
            x = tl.load(
                x_ptr + rt[:, None] * stride_xt + kk[None, :] * stride_xk,
                mask=in_t[:, None] & (kk[None, :] < k_dim),
                other=0.0,
            )  # (BLOCK_T, BLOCK_K)
            w = tl.load(
                w_ptr + g * stride_wg + rc[None, :] * stride_wc + kk[:, None] * stride_wk,
                mask=(rc[None, :] < c) & (kk[:, None] < k_dim),
                other=0.0,
            )  # (BLOCK_K, BLOCK_C): W[g]^T
            x_hi = x.to(tl.bfloat16)
            x_lo = (x - x_hi.to(tl.float32)).to(tl.bfloat16)
            w_hi = w.to(tl.bfloat16)
            w_lo = (w - w_hi.to(tl.float32)).to(tl.bfloat16)
            if EMULATE:
                x_hi, x_lo = x_hi.to(tl.float32), x_lo.to(tl.float32)
                w_hi, w_lo = w_hi.to(tl.float32), w_lo.to(tl.float32)
                acc += tl.dot(x_hi, w_hi, input_precision="ieee")
                acc += tl.dot(x_lo, w_hi, input_precision="ieee")
                acc += tl.dot(x_hi, w_lo, input_precision="ieee")
            else:
                acc = tl.dot(x_hi, w_hi, acc)
                acc = tl.dot(x_lo, w_hi, acc)
                acc = tl.dot(x_hi, w_lo, acc)
        tl.store(
            out_ptr + rt[:, None] * stride_ot + rc[None, :] * stride_oc,
            acc,
            mask=in_t[:, None] & (rc[None, :] < c),
        )

    @_guarded
    def rows(x: Tensor, w: Tensor, ends: list[int]) -> Tensor:
        """x (T, k) float32 with rows grouped by ends (host, cumulative), w (G, k, c) (the
        transposed weights, as grouped_mm takes them) -> x[t] @ w[g(t)] (T, c) float32."""
        t, k_dim = x.shape
        c = w.shape[2]
        groups, starts, prev = [], [], 0
        for g, end in enumerate(ends):
            for start in range(prev, end, 64):
                groups.append(g)
                starts.append(start)
            prev = end
        meta = torch.tensor([*groups, *starts, *ends], dtype=torch.int32)
        if x.is_cuda:
            meta = meta.pin_memory().to(x.device, non_blocking=True)
        tiles = len(groups)
        out = torch.empty(t, c, dtype=torch.float32, device=x.device)
        if tiles == 0:
            return out
        grid = (tiles, triton.cdiv(c, 128))
        _rows_kernel[grid](
            x, w, out, meta[:tiles], meta[tiles : 2 * tiles], meta[2 * tiles :], k_dim, c,
            x.stride(0), x.stride(1), w.stride(0), w.stride(2), w.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_T=64, BLOCK_C=128, BLOCK_K=32, EMULATE=not x.is_cuda,
            num_warps=4, num_stages=3,
        )  # fmt: skip
        return out

    @_guarded
    def blocks(v: Tensor, s: Tensor, mu: Tensor, ends: list[int], rows: int) -> Tensor:
        """v (T, m), s (T, n), mu (K', n) float32, ends (K') host cumulative -> (K', rows, n)
        float32 with rows > m (rows m+1.. are zero). Key tiles of KEY_TILE rows, one class
        each; under torch's deterministic mode one tile per class (no order-dependent sums)."""
        m, n, g = v.shape[1], s.shape[1], len(ends)
        size = 1 << 62 if torch.are_deterministic_algorithms_enabled() else KEY_TILE
        groups, starts, stops = [], [], []
        for c, (b, e) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
            for a in range(b, e, size):
                groups.append(c)
                starts.append(a)
                stops.append(min(a + size, e))
        meta = torch.tensor([*groups, *starts, *stops], dtype=torch.int32)
        if v.is_cuda:
            meta = meta.pin_memory().to(v.device, non_blocking=True)
        k = len(groups)
        out = torch.zeros(g, rows, n, dtype=torch.float32, device=v.device)
        grid = (triton.cdiv(m, 128), triton.cdiv(n, 128), k)
        _block_sums_kernel[grid](
            v, s, mu, out, meta[:k], meta[k : 2 * k], meta[2 * k :], m, n,
            v.stride(0), v.stride(1), s.stride(0), s.stride(1), mu.stride(0), mu.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, EMULATE=not v.is_cuda,
            num_warps=8, num_stages=3,
        )  # fmt: skip
        return out

    @_guarded
    def softmax_grad(
        s: Tensor,
        dp: Tensor,
        key_class: Tensor,
        mu: Tensor,
        sums: Tensor,
        d: Tensor,
        member: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """s, dp (T, n), key_class (T,), mu, sums, d (K', n), member (K', n) or None ->
        p, ds (T, n) bf16."""
        t, n = s.shape
        p = torch.empty(t, n, dtype=torch.bfloat16, device=s.device)
        ds = torch.empty_like(p)
        masked = member is not None
        member_arg = member if masked else mu  # not read when MASKED is False
        grid = (triton.cdiv(t, 32), triton.cdiv(n, 128))
        _softmax_grad_kernel[grid](
            s, dp, key_class, mu, sums, d, member_arg, p, ds, t, n,
            s.stride(0), s.stride(1), dp.stride(0), dp.stride(1), mu.stride(0), mu.stride(1),
            member_arg.stride(0), member_arg.stride(1),
            BLOCK_T=32, BLOCK_N=128, MASKED=masked, num_warps=4,
        )  # fmt: skip
        return p, ds

else:
    blocks = rows = softmax_grad = None
