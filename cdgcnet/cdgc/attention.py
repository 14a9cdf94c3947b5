"""Class-block attention: the one fast path of the three readings of section 3.3.

Legend (one image): N queries (every node), T keys (the image's memberships, class after class),
K' classes present, C channels, n the queries of one chunk. q = phi(X) at every node,
k = phi'(X) and v = X W_m^T (W_m of the key's class) at the keys, W' (C, K'C) the aggregation
columns of the K' classes.

Per chunk of queries, keys on the rows and queries on the columns (a class block is a row range):

    S      = k q^T                                   (T, n)          one GEMM
    S     *= [query in V_m]                          "masked": outside V_m a query scores 0
    mu     = max of S over each class block          (K', n)
    E      = exp(S - mu[class])                      (T, n)
    [U; l] = per class block: [v, 1]^T E             (K', C+1, n)    one grouped GEMM
    l     += (N - |V_m|) exp(-mu)                    "masked": the zero keys outside V_m
    Y      = U / l ;  Z = ReLU(Y)                    "members": Z = 0 at queries outside V_m
    out^T  = W' Z                                    (C, n)          one GEMM over K' classes

The backward recomputes each chunk from q, k, v and the saved (mu, l), so nothing of size
T x N or K' x C x N is ever kept:

    dZ = W'^T dout ; dY = dZ [Y > 0] ; D = sum over C of dY * Y             (K', n)
    dP = per class block: v dY                                               one grouped GEMM
    dS = P (dP - D[class]),  P = E / l[class]                                the softmax backward
    dv += per class block: P dY^T ; dq = dS^T k ; dk += dS q ; dW' += dout Z^T

No step loops over classes: the number of operations per chunk is fixed, and a chunk holds
about ``budget`` bytes of temporaries (at least 8 queries).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cdgcnet.cdgc import triton_blocks
from cdgcnet.cdgc.layout import ImageKeys
from cdgcnet.cdgc.precision import (
    Precision,
    block_sums,
    grouped_mm,
    left,
    mm,
    mm_prepared,
    right_t,
)

DEFAULT_BUDGET = 4 << 30  # bytes of per-chunk temporaries


class Reading:
    """How a reading of section 3.3 shapes the shared class-block attention; the base class is
    every-query attention over V_m's keys, and each reading's file overrides what differs.
    Each mask is a multiplication by 0/1, so the backward applies the same hook to gradients."""

    name = "base"
    uses_membership = False  # whether the hooks read member (K', N): [node in V_m]

    masks_scores = False  # whether mask_scores multiplies by the membership

    def mask_scores(self, s: Tensor, member_rows: Tensor | None) -> Tensor:
        """S (T, n) given [query in V_m of the key's class] (T, n)."""
        return s

    def zero_keys(self, lengths: Tensor, n: int) -> Tensor | None:
        """(K', 1) keys of score 0 and value 0 beside each class block, or None."""
        return None

    def mask_output(self, y: Tensor, member_cols: Tensor | None) -> Tensor:
        """Y (K', C, n) given [query in V_m] (K', n)."""
        return y


def class_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w_agg: Tensor,
    keys: ImageKeys,
    member: Tensor | None,
    reading: Reading,
    policy: Precision,
    budget: int = DEFAULT_BUDGET,
) -> Tensor:
    """q (N, C), k and v (T, C), w_agg (C, K'C), member (K', N) bool or None -> out (C, N)."""
    return _ClassAttention.apply(q, k, v, w_agg, keys, member, reading, policy, budget)


@dataclass
class _Image:
    """What every chunk of one image reads (built once per forward and once per backward)."""

    keys: ImageKeys
    reading: Reading
    policy: Precision
    n: int  # real queries (N); the query side is padded to a multiple of 8
    k_op: Tensor  # k prepared as the scores' left operand
    q_op: Tensor  # q (padded) prepared as the scores' right operand, transposed
    v1: Tensor  # (T, C+8) [v, 1, 0...]: the grouped product also gives the softmax sums
    member: Tensor | None  # (K', N_pad) bool
    missing: Tensor | None  # (K', 1) zero keys per class ("masked")
    lengths: Tensor  # (K',) int64 keys per class block

    @classmethod
    def build(cls, q, k, v, keys, member, reading, policy) -> _Image:
        n = q.shape[0]
        pad = -n % 8  # 16-byte strides for the bf16 grouped kernel
        q = F.pad(q, (0, 0, 0, pad))
        v1 = torch.cat([v, v.new_ones(v.shape[0], 1), v.new_zeros(v.shape[0], 7)], dim=1)
        lengths = torch.diff(keys.offsets.long(), prepend=keys.offsets.new_zeros(1).long())
        missing = reading.zero_keys(lengths, n)
        if missing is not None:
            missing = missing.to(q.dtype)
        if member is not None:
            member = F.pad(member, (0, pad))
        return cls(
            keys=keys,
            reading=reading,
            policy=policy,
            n=n,
            k_op=left(k, policy.forward),
            q_op=right_t(q, policy.forward),
            v1=v1 if policy.forward != "bf16" else v1.to(torch.bfloat16),
            member=member,
            missing=missing,
            lengths=lengths,
        )

    @property
    def n_pad(self) -> int:
        return self.q_op.shape[0]

    def chunk(self, budget: int) -> int:
        """Queries per chunk: about ``budget`` bytes of (T, n) and (K', C, n) temporaries."""
        t, c1 = self.v1.shape
        per_query = 24 * t + 20 * len(self.keys.ends) * c1
        return min(self.n_pad, max(8, budget // per_query // 8 * 8))

    def scores(self, cols: slice) -> Tensor:
        """S (T, n), masked as the reading says."""
        s = mm_prepared(self.k_op, self.q_op[cols], self.policy.forward)
        return self.reading.mask_scores(s, self.member_rows(cols))

    def member_rows(self, cols: slice) -> Tensor | None:
        """[query in V_m of the key's class] (T, n)."""
        if self.member is None:
            return None
        return self.member[:, cols].index_select(0, self.keys.key_class)

    def block_max(self, s: Tensor) -> Tensor:
        """mu (K', n): the max of S over each class block (and 0 where zero keys count)."""
        if s.is_cuda:  # unsafe: no check of the lengths, which would read them on the host
            mu = torch.segment_reduce(s, "max", lengths=self.lengths, axis=0, unsafe=True)
        else:  # CPU: scatter is many times faster than segment_reduce here
            index = self.keys.key_class[:, None].expand_as(s)
            mu = s.new_full((len(self.keys.ends), s.shape[1]), float("-inf"))
            mu = mu.scatter_reduce_(0, index, s, "amax")
        if self.missing is not None:
            mu = torch.where(self.missing > 0, mu.clamp_min(0.0), mu)
        return mu

    def contexts(self, s: Tensor, mu: Tensor) -> Tensor:
        """[U; l] (K', C+8, n): the per-class sums of v and of 1 weighted by
        E = exp(S - mu[class]) (T, n); S is left as it is."""
        keys = self.keys
        if self.fused and self.policy.forward == "split":
            with contextlib.suppress(triton_blocks.Unavailable):
                return triton_blocks.blocks(self.v1[:, :-8], s, mu, keys.ends, self.v1.shape[1])
        e = torch.exp(s - mu.index_select(0, keys.key_class))  # (T, n)
        return block_sums(self.v1, e, keys.offsets, keys.ends, self.policy.forward)

    def softmax_grad(self, s, dp, mu, sums, d, cols) -> tuple[Tensor, Tensor]:
        """P = E / l[class] and dS = P (dP - D[class]) (T, n), masked as the reading's scores
        are: the softmax backward, given S, dP (T, n) and mu, l, D (K', n)."""
        cls = self.keys.key_class
        member = None if self.member is None else self.member[:, cols]
        if self.fused and self.policy.backward == "bf16":
            masks = member if self.reading.masks_scores else None
            with contextlib.suppress(triton_blocks.Unavailable):
                return triton_blocks.softmax_grad(
                    s, dp, cls, mu.contiguous(), sums.contiguous(), d.contiguous(), masks
                )
        p = torch.exp(s - mu.index_select(0, cls)).div_(sums.index_select(0, cls))
        ds = p * (dp - d.index_select(0, cls))
        return p, self.reading.mask_scores(ds, self.member_rows(cols))

    def aggregate(self, w_agg: Tensor, z: Tensor) -> Tensor:
        """W' Z: (C, K'C) @ (K'C, n) -> (C, n) as the policy's ``aggregate`` says (a Triton
        split product on CUDA, without the copies that a 3-term concatenation makes)."""
        if self.fused and self.policy.aggregate == "split":
            with contextlib.suppress(triton_blocks.Unavailable):
                return triton_blocks.rows(z.t(), w_agg.t()[None], [z.shape[1]]).t()
        return mm(w_agg, z, self.policy.aggregate)

    @property
    def fused(self) -> bool:
        """Whether the Triton kernels serve the elementwise steps (CUDA)."""
        return self.v1.is_cuda and triton_blocks.available()

    def masked(self, y: Tensor, cols: slice) -> Tensor:
        member = None if self.member is None else self.member[:, cols]
        return self.reading.mask_output(y, member)


class _ClassAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w_agg, keys, member, reading, policy, budget):
        img = _Image.build(q, k, v, keys, member, reading, policy)
        c = q.shape[1]
        k_classes = len(keys.ends)
        out = q.new_empty(c, img.n_pad)
        mu = q.new_empty(k_classes, img.n_pad)
        sums = q.new_empty(k_classes, img.n_pad)
        step = img.chunk(budget)
        for start in range(0, img.n_pad, step):
            cols = slice(start, start + step)
            s = img.scores(cols)  # (T, n)
            mu[:, cols] = img.block_max(s)
            u = img.contexts(s, mu[:, cols])  # (K', C+8, n)
            sums[:, cols] = u[:, c]
            if img.missing is not None:
                sums[:, cols] += img.missing * torch.exp(-mu[:, cols])
            z = F.relu(img.masked(u[:, :c] / sums[:, None, cols], cols))  # (K', C, n)
            out[:, cols] = img.aggregate(w_agg, z.reshape(k_classes * c, -1))  # (C, n)
        ctx.save_for_backward(q, k, v, w_agg, member, mu, sums)
        ctx.keys, ctx.reading, ctx.policy, ctx.budget = keys, reading, policy, budget
        return out[:, : img.n]

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, w_agg, member, mu, sums = ctx.saved_tensors
        keys, policy = ctx.keys, ctx.policy
        img = _Image.build(q, k, v, keys, member, ctx.reading, policy)
        how = policy.backward
        c = q.shape[1]
        k_classes = len(keys.ends)
        grad_out = F.pad(grad_out.to(q.dtype), (0, img.n_pad - img.n))
        q_pad = F.pad(q, (0, 0, 0, img.n_pad - img.n))
        grad_q = torch.empty_like(q_pad)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        grad_w = torch.zeros_like(w_agg, dtype=q.dtype)
        step = img.chunk(ctx.budget)
        for start in range(0, img.n_pad, step):
            cols = slice(start, start + step)
            s = img.scores(cols)  # (T, n)
            u = img.contexts(s, mu[:, cols])
            y = img.masked(u[:, :c] / sums[:, None, cols], cols)  # (K', C, n)
            z = F.relu(y)
            g = grad_out[:, cols]  # (C, n)
            grad_w += mm(g, z.reshape(k_classes * c, -1).t(), how)
            dy = mm(w_agg.t(), g, how).view(k_classes, c, -1) * (y > 0)
            dy = img.masked(dy, cols)
            d = (dy * y).sum(1)  # (K', n)
            dp = grouped_mm(v, dy, keys.offsets, keys.ends, how)  # (T, n)
            p, ds = img.softmax_grad(s, dp, mu[:, cols], sums[:, cols], d, cols)  # (T, n) each
            grad_v += grouped_mm(p, dy.transpose(1, 2), keys.offsets, keys.ends, how)
            grad_q[cols] = mm(ds.t(), k, how)
            grad_k += mm(ds, q_pad[cols], how)
        return (
            grad_q[: img.n],
            grad_k,
            grad_v,
            grad_w.to(w_agg.dtype),
            None,
            None,
            None,
            None,
            None,
        )
