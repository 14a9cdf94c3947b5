"""Reading "all" (the default): every node is a query of every class graph; the keys are V_m.

    A_m[i, j] = softmax over j in V_m of q_i . k_j        for every node i
    Z_m       = ReLU(A_m X_{V_m} W_m^T)                    at every node
    R_pre     = sum_m Z_m W_agg,m^T

The text's "M adjacency matrices A in R^{M x N x N}" taken literally for the rows: every pixel
receives one context per class with nodes in its image (a class with none gives zero) and the
aggregation conv weighs them; membership decides only which nodes are keys. With dynamic
sampling the training graph then does not tell a pixel its own label (REPRODUCING.md measures
it). The shared class-block attention (attention.py) computes exactly this, so this reading
overrides nothing.
"""

from __future__ import annotations

from torch import Tensor

from cdgcnet.cdgc.attention import Reading
from cdgcnet.cdgc.dense import aggregate, graph_conv, key_softmax


class AllQueries(Reading):
    name = "all"

    @staticmethod
    def reference(q: Tensor, k: Tensor, x: Tensor, nodes: Tensor, graph, agg) -> Tensor:
        """q, k, x (B, N, C), nodes (B, G, N) -> R_pre (B, C, N), literally."""
        scores = (q @ k.transpose(1, 2))[:, None]  # (B, 1, N, N)
        adj = key_softmax(scores.expand(-1, nodes.shape[1], -1, -1), nodes)  # (B, G, N, N)
        return aggregate(graph_conv(adj, x, graph), agg)
