"""The DeepSpeed config, generated from the TrainConfig, the world and the model's size
(launch/ds_zero{1,2,3}.json show it for the cityscapes model on 4 GPUs).

Precision on GPUs: bf16 runs as torch autocast, so parameters, gradients and BatchNorm statistics
stay fp32 (a plain `"bf16"` block would cast the model and break BatchNorm buffers); fp16 uses
DeepSpeed's dynamic loss scaling. On CPU everything is fp32 (DeepSpeed refuses fp16 there).

Every other choice is a cost the plain PyTorch step of the same network does not pay unless it
buys something; each line below says what it buys. Measured on the first GPU lease (H200,
2026-12-04): DeepSpeed's defaults took a bf16 step from 56.7 ms and 5.7 GB (plain) to 135 ms and
13.4 GB (trainer), and its unpadded ZeRO layout crashed cuDNN (benchmarks/README.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from launch.config import ConfigError, TrainConfig

BUCKET_BYTES = 1 << 30
"""All of ZeRO's gradient bucket buffers together stay under this (DeepSpeed's default 5e8
elements took 4 x 1.9 GB on one GPU)."""
BUCKETS_PER_MODEL = 4
"""Gradient buckets per backward: enough for the reductions of the first three to overlap the
rest of backward on several ranks, few enough that one rank's copies cost nothing."""
NCCL_START_ALIGNMENT = 2
"""ZeRO-1/2 require bucket sizes that are a multiple of this (elements)."""


@dataclass(frozen=True)
class ModelSize:
    """What DeepSpeed's communication buffers are sized from."""

    params: int
    """Trainable elements of the model."""
    largest: int
    """Elements of its largest parameter."""

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelSize:
        sizes = [p.numel() for p in model.parameters() if p.requires_grad]
        return cls(params=sum(sizes), largest=max(sizes, default=0))


def resolve_precision(precision: str, device_type: str, bf16_supported: bool = False) -> str:
    """ "auto" -> bf16 on GPUs that support it, else fp16; fp32 on CPU. A precision the device
    cannot run is a ConfigError naming runtime.precision."""
    if device_type == "cpu":
        if precision in ("fp16", "bf16"):
            raise ConfigError(
                f"runtime.precision={precision} needs a GPU; on CPU use fp32 (or auto)"
            )
        return "fp32"
    if precision == "auto":
        return "bf16" if bf16_supported else "fp16"
    if precision == "bf16" and not bf16_supported:
        raise ConfigError("runtime.precision=bf16: this GPU has no bf16 support; use fp16 or auto")
    return precision


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step so that the global batch is data.global_batch_size."""
    micro = cfg.data.batch_size * world_size
    if cfg.data.global_batch_size is None:
        return 1
    if cfg.data.global_batch_size % micro != 0:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} is not a multiple of "
            f"data.batch_size={cfg.data.batch_size} x world size {world_size} = {micro}; "
            "change data.batch_size or data.global_batch_size (null = no accumulation)"
        )
    return cfg.data.global_batch_size // micro


def bucket_elements(size: ModelSize, buffers: int, element_bytes: int) -> int:
    """Elements per ZeRO gradient bucket: a BUCKETS_PER_MODEL-th of the model, at least its largest
    parameter (a bigger one bypasses the contiguous buffer), all `buffers` together at most
    BUCKET_BYTES, rounded up to NCCL_START_ALIGNMENT."""
    want = max(math.ceil(size.params / BUCKETS_PER_MODEL), size.largest, 1)
    cap = BUCKET_BYTES // (element_bytes * buffers)
    n = min(want, cap)
    return n + (-n) % NCCL_START_ALIGNMENT


def zero_config(
    cfg: TrainConfig, world_size: int, device_type: str, size: ModelSize, precision: str
) -> dict:
    """The zero_optimization block: stage, layout, buckets and what each step computes."""
    stage = cfg.runtime.zero_stage
    # One rank has nothing to overlap: the hooks only add host work to every parameter's
    # backward. On CPU gloo gains nothing from it either.
    overlap = world_size > 1 and device_type != "cpu"
    # One bucket buffer per communication dtype (fp32 only: see torch_autocast), two with overlap.
    bucket = bucket_elements(size, 2 if overlap else 1, 2 if precision == "fp16" else 4)
    zero: dict = {"stage": stage}
    if stage in (1, 2):
        zero.update(
            {
                "contiguous_gradients": True,
                "overlap_comm": overlap,
                "reduce_scatter": True,
                "allgather_partitions": True,
                "reduce_bucket_size": bucket,
                # Chunks the parameter all-gather after the step; allocates nothing itself.
                "allgather_bucket_size": bucket,
                # Each parameter 16-byte aligned in the flat buffer: cuDNN's NHWC BatchNorm
                # reads fp32 scale/bias with vector loads ("misaligned address" otherwise).
                "parameter_alignment": True,
                # The norm is a kernel per parameter and a host-device sync; clipping needs it
                # every step, logging turns it on for the steps it logs (launch/trainer.py).
                "compute_grad_norm": cfg.optim.grad_clip > 0,
            }
        )
    if stage == 3:
        # ZeRO-3 gathers each parameter into its own allocation (aligned by the allocator) and
        # has no switch for its gradient norm.
        zero.update(
            {
                "contiguous_gradients": True,
                "overlap_comm": overlap,
                "reduce_bucket_size": bucket,
                "stage3_prefetch_bucket_size": bucket,
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    return zero


def check_zero_stage(cfg: TrainConfig, world_size: int) -> None:
    """ConfigError (one line) for a ZeRO stage this world cannot run on aligned parameters."""
    if cfg.runtime.zero_stage == 3 and world_size == 1:
        # One rank takes DeepSpeed's no-gather path: each parameter is a view into one flat
        # partition buffer, off the 16-byte boundaries GPU kernels need (launch/alignment.py).
        raise ConfigError(
            "runtime.zero_stage=3 needs 2 or more ranks: on one rank DeepSpeed runs the model on "
            "unaligned views of its flat buffer and saves no memory; use runtime.zero_stage=2"
        )


def build_ds_config(
    cfg: TrainConfig,
    world_size: int,
    device_type: str,
    size: ModelSize,
    *,
    bf16_supported: bool = False,
    load_universal: bool = False,
) -> dict:
    """DeepSpeed config dict for this run, world size and model size."""
    check_zero_stage(cfg, world_size)
    accum = accumulation_steps(cfg, world_size)
    precision = resolve_precision(cfg.runtime.precision, device_type, bf16_supported)
    ds: dict = {
        "train_batch_size": cfg.data.batch_size * world_size * accum,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": accum,
        # DeepSpeed's default is 1.0 these days; state ours (0 = off).
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero_config(cfg, world_size, device_type, size, precision),
        "steps_per_print": 10**9,
        # Per-phase timers synchronise the device around forward, backward and step.
        "wall_clock_breakdown": False,
        # The throughput timer is on by default and synchronises the device in every forward
        # and every step.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "checkpoint": {"load_universal": load_universal},
        # torch.optim.SGD with per-group LR multipliers; ZeRO partitions its state correctly.
        "zero_allow_untested_optimizer": True,
    }
    if precision == "bf16":
        ds["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            # DeepSpeed's default list (Linear, Conv) makes those gradients travel, and be
            # rounded, in bf16 even on one rank; the plain autocast step keeps them fp32.
            "lower_precision_safe_modules": [],
        }
    elif precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "auto_cast": True,  # float inputs to half, like the model DeepSpeed casts
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return ds
