"""Every parameter and buffer of the engine starts on a 16-byte boundary, checked at start-up.

ZeRO-1/2 pack the parameters into one flat buffer; without padding a parameter after an odd-sized
one (a 19-element classifier bias) starts 12 bytes off a boundary, and GPU kernels that read
fp32 scale and bias with vector loads (cuDNN's NHWC BatchNorm) fail with "misaligned address".
CPU kernels never do, so only this check shows it on CPU. launch/ds_config.py turns DeepSpeed's
padding on; this guards against a DeepSpeed or config change that undoes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

ALIGNMENT = 16
"""Bytes; the widest vector load (float4) GPU kernels use on parameters."""


class AlignmentError(RuntimeError):
    """A parameter or buffer of the engine is not ALIGNMENT-byte aligned; names the first."""


def misaligned(named: Iterator[tuple[str, torch.Tensor]]) -> list[tuple[str, int]]:
    """(name, bytes past the last boundary) of every non-empty tensor that is not aligned."""
    return [
        (name, t.data_ptr() % ALIGNMENT)
        for name, t in named
        if t.numel() > 0 and t.data_ptr() % ALIGNMENT
    ]


@contextlib.contextmanager
def _materialized(engine) -> Iterator[None]:
    """ZeRO-3 keeps only a partition of each parameter between forwards: gather them (every rank
    takes part), as the forward pass would."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        yield


def check_alignment(engine) -> None:
    """AlignmentError (one line) unless every parameter and buffer the model's kernels read is
    ALIGNMENT-byte aligned. Collective under ZeRO-3: every rank calls it."""
    module = engine.module
    with _materialized(engine):
        bad = misaligned(module.named_parameters()) + misaligned(module.named_buffers())
    if not bad:
        return
    name, offset = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise AlignmentError(
        f"{name} starts {offset} bytes past a {ALIGNMENT}-byte boundary{more}: GPU kernels "
        "(cuDNN's BatchNorm) cannot read it; ZeRO-1/2 need zero_optimization.parameter_alignment "
        "(launch/ds_config.py)"
    )
