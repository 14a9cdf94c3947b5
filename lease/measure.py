"""What the measuring stages share: the device they run on and the measured matmul peak their
FLOP/s are read against."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from benchmarks import common


def device() -> torch.device:
    """The GPU where torch sees one, else the CPU (the dry run)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def matmul_peak_tflops(device: torch.device, n: int) -> dict[str, Any]:
    """Measured peak of one square matmul: bf16 on CUDA (tensor cores), fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = [common.time_call(lambda: a @ b, device) for _ in range(10)]
    ms = statistics.median(times)
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "median_ms": round(ms, 4),
        "tflops": round(2 * n**3 / (ms / 1e3) / 1e12, 2),
    }
