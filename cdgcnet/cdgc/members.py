"""Reading "members": queries and keys both in V_m; Z_m is zero outside V_m.

    A_m[i, j] = softmax over j in V_m of q_i . k_j        for i in V_m only
    Z_m       = ReLU(A_m X_{V_m} W_m^T) at V_m, 0 elsewhere

Closest to the text's "information transmission only occurs inside the chosen category". With
dynamic sampling in training, the set of non-zero class maps at a pixel encodes its ground-truth
label (every labelled pixel of class m is in V_m), which the aggregation conv can read and
inference cannot supply (REPRODUCING.md measures the leak). On the fast path every query is
computed and the rows outside V_m are dropped: on a GPU that costs less than per-class
attention over ragged blocks.
"""

from __future__ import annotations

from torch import Tensor

from cdgcnet.cdgc.attention import Reading
from cdgcnet.cdgc.dense import aggregate, graph_conv, key_softmax


class Members(Reading):
    name = "members"
    uses_membership = True

    def mask_output(self, y: Tensor, member_cols: Tensor | None) -> Tensor:
        return y * member_cols[:, None, :]  # (K', C, n) * (K', 1, n)

    @staticmethod
    def reference(q: Tensor, k: Tensor, x: Tensor, nodes: Tensor, graph, agg) -> Tensor:
        """q, k, x (B, N, C), nodes (B, G, N) -> R_pre (B, C, N), literally."""
        scores = (q @ k.transpose(1, 2))[:, None]  # (B, 1, N, N)
        adj = key_softmax(scores.expand(-1, nodes.shape[1], -1, -1), nodes)  # (B, G, N, N)
        adj = adj * nodes[..., None]  # rows outside V_m: no context, so Z_m = ReLU(0) = 0
        return aggregate(graph_conv(adj, x, graph), agg)
