"""runtime.deterministic: the GPU picks algorithms that give the same result from the same state.

Off (the default), cuDNN and cuBLAS choose among algorithms some of which reduce in a varying
order; a resumed run then repeats the losses of an uninterrupted one only to rounding, which
training amplifies (1.1% relative over the 10 iterations after a resume on an H200, the first
GPU lease). CPU runs repeat them bit for bit either way. On, torch uses its deterministic kernels where it has them.
It has none on CUDA for the backward of bilinear interpolation and for the 2-D NLL loss, both in
the losses at label resolution: with warn_only, torch warns once for each and runs them as they
are, so agreement improves but is not promised to be exact.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"
"""A fixed cuBLAS workspace: cuBLAS reduces in a fixed order only with one (read when its handle
is created, so this must be set before the first matmul)."""


def set_deterministic(on: bool) -> None:
    """Apply runtime.deterministic to this process (both ways: the sweeps run several configs in
    one process)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.deterministic = on
    if on:
        torch.backends.cudnn.benchmark = False  # autotuning may pick another algorithm each run
    # warn_only: an op without a deterministic kernel warns instead of stopping the run.
    torch.use_deterministic_algorithms(on, warn_only=True)
