"""lease/cdgc.py: the model FLOPs of one CDGC forward + backward, from the node sets."""

from __future__ import annotations

import pytest
import torch

from lease.cdgc import cdgc_model_gflop


def test_cdgc_model_flops_count_each_product_once() -> None:
    nodes = torch.zeros(1, 3, 2, 2, dtype=torch.bool)  # N = 4
    nodes[0, 0, 0] = True  # 2 keys of class 0
    nodes[0, 2, 1, 1] = True  # 1 key of class 2: T = 3, K' = 2
    n, t, k, c = 4, 3, 2, 8
    forward = 2 * (2 * n * c * c + t * c * c + 2 * n * t * c + n * k * c * c)
    assert cdgc_model_gflop(nodes, c) == pytest.approx(3 * forward / 1e9)
