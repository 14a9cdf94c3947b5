"""The fast path over a batch: one grouped product for every class's W_m, then the class-block
attention (attention.py) image by image.

Legend: B images, G graphs, N nodes per image, C channels, T memberships, K' classes present
in an image. Inputs are rows of the (B*N, C) node matrix: x, and q = phi(x), k = phi'(x).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdgcnet.cdgc.attention import Reading, class_attention
from cdgcnet.cdgc.layout import Layout
from cdgcnet.cdgc.precision import GroupedLinear, Precision


def fast_context(
    x: Tensor,
    q: Tensor,
    k: Tensor,
    nodes: Tensor,
    layout: Layout,
    graph: Tensor,
    agg: Tensor,
    reading: Reading,
    policy: Precision,
    budget: int,
) -> Tensor:
    """x, q, k (B*N, C), nodes (B, G, N), graph (G, C, C), agg (C, G, C) -> R_pre (B, C, N)."""
    b, _, n = nodes.shape
    c = x.shape[1]
    if not layout.class_ends:  # no node at all: no context, every weight kept in the graph
        return x.new_zeros(b, c, n) + 0.0 * (q.sum() + k.sum() + graph.sum() + agg.sum())
    # V' = X W_m^T at every membership: one grouped product over the classes of the batch.
    v = GroupedLinear.apply(
        x[layout.rows_by_class],
        graph.index_select(0, layout.classes),
        layout.class_offsets,
        layout.class_ends,
        policy.values,
        policy.backward,
    )  # (T, C) class-major
    v = v[layout.to_image_major]  # (T, C) image-major
    outs = []
    for i, keys in enumerate(layout.images):
        if keys is None:  # no node in this image: every class context is zero
            outs.append(x.new_zeros(c, n))
            continue
        rows = slice(i * n, (i + 1) * n)
        member = nodes[i].index_select(0, keys.classes) if reading.uses_membership else None
        outs.append(
            class_attention(
                q[rows],
                k[rows].index_select(0, keys.node),
                v[keys.span],
                agg.index_select(1, keys.classes).reshape(c, -1),  # (C, K'C)
                keys,
                member,
                reading,
                policy,
                budget,
            )
        )  # (C, N)
    return torch.stack(outs)  # (B, C, N)
