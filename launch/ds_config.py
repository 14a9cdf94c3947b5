"""The DeepSpeed config, generated from the TrainConfig (launch/ds_zero{1,2,3}.json show the shape).

Precision on GPUs: bf16 runs as torch autocast, so parameters, gradients and BatchNorm statistics
stay fp32 (a plain `"bf16"` block would cast the model and break BatchNorm buffers); fp16 uses
DeepSpeed's dynamic loss scaling. On CPU everything is fp32 (DeepSpeed refuses fp16 there).
"""

from __future__ import annotations

from launch.config import ConfigError, TrainConfig


def resolve_precision(precision: str, device_type: str, bf16_supported: bool = False) -> str:
    """ "auto" -> bf16 on GPUs that support it, else fp16; fp32 on CPU."""
    if device_type == "cpu":
        if precision in ("fp16", "bf16"):
            raise ConfigError(
                f"runtime.precision={precision} needs a GPU; on CPU use fp32 (or auto)"
            )
        return "fp32"
    if precision == "auto":
        return "bf16" if bf16_supported else "fp16"
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
    *,
    bf16_supported: bool = False,
    load_universal: bool = False,
) -> dict:
    """DeepSpeed config dict for this run and world size."""
    check_zero_stage(cfg, world_size)
    accum = accumulation_steps(cfg, world_size)
    precision = resolve_precision(cfg.runtime.precision, device_type, bf16_supported)
    stage = cfg.runtime.zero_stage
    zero: dict = {"stage": stage}
    if stage in (1, 2):
        zero.update(
            {
                "contiguous_gradients": True,
                "overlap_comm": device_type != "cpu",
                "reduce_scatter": True,
                "allgather_partitions": True,
                # Each parameter 16-byte aligned in the flat buffer: cuDNN's NHWC BatchNorm
                # reads fp32 scale/bias with vector loads ("misaligned address" otherwise).
                # ZeRO-3 gathers each parameter into its own allocation, aligned already.
                "parameter_alignment": True,
            }
        )
    if stage == 3:
        zero.update(
            {
                "contiguous_gradients": True,
                "overlap_comm": device_type != "cpu",
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    ds: dict = {
        "train_batch_size": cfg.data.batch_size * world_size * accum,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": accum,
        # DeepSpeed's default is 1.0 these days; state ours (0 = off).
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
        # torch.optim.SGD with per-group LR multipliers; ZeRO partitions its state correctly.
        "zero_allow_untested_optimizer": True,
    }
    if precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
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
