"""Reading "masked": the repeated feature map X in R^{(M x C) x H x W} of section 3.3 taken
literally, X_m = X masked to V_m, and a graph over all N nodes per class:

    A_m[i, j] = softmax over all j of phi(X_m)_i . phi'(X_m)_j
    Z_m       = ReLU(A_m X_m W_m^T)                        at every node

A node outside V_m has feature 0, and phi, phi' have no bias, so as a key it scores 0 (exp(0) in
the denominator, nothing in the numerator) and as a query it scores 0 against every key: it
attends uniformly, Z_m = ReLU(mean over all N of X_m W_m^T). A class with no node in the image
has X_m = 0 and gives zero. On the fast path the N - |V_m| zero keys are a count added to each
softmax sum, and a query outside V_m has its scores set to 0.
"""

from __future__ import annotations

from torch import Tensor

from cdgcnet.cdgc.attention import Reading
from cdgcnet.cdgc.dense import aggregate, graph_conv


class Masked(Reading):
    name = "masked"
    uses_membership = True
    masks_scores = True

    def mask_scores(self, s: Tensor, member_rows: Tensor | None) -> Tensor:
        return s * member_rows  # (T, n): a query outside V_m has phi(0) = 0

    def zero_keys(self, lengths: Tensor, n: int) -> Tensor | None:
        return (n - lengths)[:, None]  # (K', 1) nodes outside V_m

    @staticmethod
    def reference(q: Tensor, k: Tensor, x: Tensor, nodes: Tensor, graph, agg) -> Tensor:
        """q, k, x (B, N, C), nodes (B, G, N) -> R_pre (B, C, N), literally (phi(X_m) = phi(X)
        masked, as phi is linear and bias-free)."""
        mask = nodes[..., None].to(x.dtype)  # (B, G, N, 1)
        x_m, q_m, k_m = x[:, None] * mask, q[:, None] * mask, k[:, None] * mask  # (B, G, N, C)
        adj = (q_m @ k_m.transpose(2, 3)).softmax(-1)  # (B, G, N, N), over all N keys
        return aggregate(graph_conv(adj, x_m, graph), agg)
