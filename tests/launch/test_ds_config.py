"""The generated DeepSpeed config (pure dicts): sized for the model and the world, no timers, no
overlap on one rank, the gradient norm only for clipping, fp32 gradient communication, aligned
ZeRO layout; DeepSpeed 0.19.8's own config models accept every key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.config import ConfigError, load_config, preset
from launch.ds_config import (
    BUCKET_BYTES,
    ModelSize,
    accumulation_steps,
    bucket_elements,
    build_ds_config,
)

# ResNet-101 CDGCNet at the cityscapes preset (19 classes): checked against the model below.
CITYSCAPES = ModelSize(params=97_592_185, largest=11_796_480)


def _gpu(world: int, *overrides: str, size: ModelSize = CITYSCAPES, **kw) -> dict:
    cfg = load_config("cityscapes", ["model.pretrained=none", *overrides])
    return build_ds_config(cfg, world, "cuda", size, bf16_supported=True, **kw)


def _bucket_bytes(ds: dict) -> int:
    """Bytes of all ZeRO gradient bucket buffers: fp32, two with overlap."""
    zero = ds["zero_optimization"]
    return zero["reduce_bucket_size"] * 4 * (2 if zero["overlap_comm"] else 1)


def test_one_gpu() -> None:
    ds = _gpu(1)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["parameter_alignment"] is True
    assert zero["overlap_comm"] is False  # nothing to overlap with on one rank
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 24_398_048
    assert zero["reduce_bucket_size"] % 2 == 0 and _bucket_bytes(ds) < 100 * 2**20
    assert zero["compute_grad_norm"] is False  # optim.grad_clip = 0 in the preset
    assert ds["gradient_clipping"] == 0.0
    assert ds["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    assert ds["wall_clock_breakdown"] is False
    assert ds["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
        "lower_precision_safe_modules": [],  # every gradient stays fp32
    }
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 8


def test_eight_gpus() -> None:
    ds = _gpu(8, "data.batch_size=1")
    zero = ds["zero_optimization"]
    assert zero["overlap_comm"] is True  # reductions overlap the rest of backward
    assert zero["reduce_bucket_size"] == 24_398_048  # a quarter of the model: 4 buckets
    assert _bucket_bytes(ds) < 200 * 2**20  # two buffers of 98 MB, not 4 x 1.9 GB
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_batch_size"] == 8
    assert ds["torch_autocast"]["lower_precision_safe_modules"] == []
    with pytest.raises(ConfigError, match=r"global_batch_size=8 is not a multiple .* 16"):
        _gpu(8)  # 2 images on each of 8 GPUs overshoot the paper's batch of 8


def test_buckets_follow_the_model_and_stay_under_a_gigabyte() -> None:
    huge = ModelSize(params=4_000_000_000, largest=300_000_000)
    ds = _gpu(8, "data.batch_size=1", size=huge)
    assert _bucket_bytes(ds) <= BUCKET_BYTES
    assert ds["zero_optimization"]["reduce_bucket_size"] == BUCKET_BYTES // 8
    # At least the largest parameter, so none bypasses the contiguous buffer.
    assert bucket_elements(ModelSize(params=40, largest=25), 1, 4) == 26
    assert bucket_elements(ModelSize(params=4001, largest=3), 1, 4) == 1002
    assert bucket_elements(huge, 1, 2) == BUCKET_BYTES // 2  # fp16 buffers hold twice as many


def test_gradient_norm_only_for_clipping_and_zero3_keys() -> None:
    assert _gpu(1, "optim.grad_clip=1.0")["zero_optimization"]["compute_grad_norm"] is True
    zero3 = _gpu(8, "data.batch_size=1", "runtime.zero_stage=3")["zero_optimization"]
    assert "compute_grad_norm" not in zero3 and "parameter_alignment" not in zero3
    assert zero3["overlap_comm"] is True
    assert zero3["reduce_bucket_size"] == zero3["stage3_prefetch_bucket_size"] == 24_398_048


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("world", [2, 8])
def test_deepspeed_accepts_every_key(stage: int, world: int) -> None:
    from deepspeed.runtime.config import get_lower_precision_safe_modules
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.utils.config import get_timers_config

    ds = _gpu(world, "data.batch_size=1", f"runtime.zero_stage={stage}")
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])  # unknown keys are refused
    assert zero.stage == stage and zero.overlap_comm is (stage > 0)
    assert get_timers_config(ds).enabled is False
    assert get_lower_precision_safe_modules(ds) == []


def test_cpu_and_fp16_and_precision_errors() -> None:
    cfg = preset("cityscapes")
    cpu = build_ds_config(cfg, world_size=4, device_type="cpu", size=CITYSCAPES)
    assert cpu["train_batch_size"] == 8 and cpu["train_micro_batch_size_per_gpu"] == 2
    assert cpu["zero_optimization"]["overlap_comm"] is False  # gloo: nothing gained
    assert "bf16" not in cpu and "fp16" not in cpu and "torch_autocast" not in cpu
    fp16 = build_ds_config(cfg, 2, "cuda", CITYSCAPES, bf16_supported=False)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic scaling
    assert fp16["zero_optimization"]["reduce_bucket_size"] == 24_398_048
    with pytest.raises(ConfigError, match="global_batch_size=8 is not a multiple"):
        accumulation_steps(cfg, world_size=3)
    cfg.runtime.zero_stage = 3
    assert build_ds_config(cfg, 2, "cpu", CITYSCAPES)["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="zero_stage=3 needs 2 or more ranks"):
        build_ds_config(cfg, 1, "cpu", CITYSCAPES)
    cfg.runtime.precision = "bf16"
    with pytest.raises(ConfigError, match="needs a GPU"):
        build_ds_config(cfg, 2, "cpu", CITYSCAPES)
    with pytest.raises(ConfigError, match="precision=bf16: this GPU has no bf16"):
        build_ds_config(cfg, 2, "cuda", CITYSCAPES, bf16_supported=False)


def test_model_size_of_the_cityscapes_model() -> None:
    from cdgcnet.model import build_model

    assert ModelSize.of(build_model(preset("cityscapes").model)) == CITYSCAPES


def test_shipped_reference_configs_match_the_generator() -> None:
    root = Path(__file__).resolve().parents[2] / "launch"
    for stage in (1, 2, 3):
        shipped = json.loads((root / f"ds_zero{stage}.json").read_text())
        cfg = preset("cityscapes")
        cfg.runtime.zero_stage = stage
        made = build_ds_config(cfg, 4, "cuda", CITYSCAPES, bf16_supported=True)
        assert shipped == made
