"""Pieces of the literal dense references (each reading's file states its reference with them).

Legend: B images, G graphs, N nodes, C channels. Everything here builds (B, G, N, N) adjacency
matrices, so it is only usable at small N: it defines correctness, the fast path is tested
against it in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def key_softmax(scores: Tensor, keys: Tensor) -> Tensor:
    """softmax over the keys j of scores (B, G, N, N); keys (B, G, N) bool. A graph with no key
    gives all-zero rows (no context) instead of NaN."""
    present = keys.any(-1)  # (B, G)
    allowed = keys | ~present[..., None]  # an empty graph may attend anywhere; zeroed below
    logits = scores.masked_fill(~allowed[:, :, None, :], float("-inf"))
    return logits.softmax(-1) * present[..., None, None]


def graph_conv(adj: Tensor, x: Tensor, graph: Tensor) -> Tensor:
    """Z = ReLU((A_m X_m) W_m^T): adj (B, G, N, N), x (B, G, N, C) or (B, N, C), graph (G, C, C)
    -> (B, G, N, C)."""
    if x.dim() == 3:
        x = x[:, None]
    return torch.relu(adj @ x @ graph.transpose(1, 2))


def aggregate(z: Tensor, weight: Tensor) -> Tensor:
    """The 1x1 conv G*C -> C over the class maps: z (B, G, N, C), weight (C, G, C) -> (B, C, N)."""
    return torch.einsum("bgnc,dgc->bdn", z, weight)
