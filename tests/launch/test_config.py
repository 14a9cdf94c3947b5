"""TrainConfig: the paper's preset values, overrides, file loading, named errors and the LR
schedule (the DeepSpeed config: test_ds_config.py)."""

from __future__ import annotations

import json

import pytest

from launch.config import (
    PRESETS,
    ConfigError,
    flatten,
    from_dict,
    load_config,
    preset,
    to_dict,
)
from launch.trainer import poly_lr_factor

# DESIGN.md "Paper settings" (section 4.2 of the paper).
PAPER = {
    "cityscapes": dict(lr=0.01, wd=5e-4, crop=769, batch=8, iters=30_000, classes=19),
    "voc": dict(lr=0.001, wd=1e-4, crop=513, batch=16, iters=30_000, classes=21),
    "cocostuff10k": dict(lr=0.001, wd=1e-4, crop=520, batch=16, iters=60_000, classes=171),
    "cocostuff164k": dict(lr=0.001, wd=1e-4, crop=520, batch=16, iters=60_000, classes=171),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_presets_state_the_paper_values(name: str) -> None:
    cfg, p = preset(name), PAPER[name]
    assert cfg.optim.lr == p["lr"] and cfg.optim.weight_decay == p["wd"]
    assert cfg.optim.momentum == 0.9 and cfg.schedule.power == 0.9
    assert cfg.data.crop_size == p["crop"] and cfg.data.global_batch_size == p["batch"]
    assert cfg.schedule.iterations == p["iters"]
    assert cfg.model.num_classes == p["classes"] and cfg.model.depth == 101
    assert cfg.model.output_stride == 8 and cfg.model.aspp and cfg.model.graph == "ds"
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma) == (0.6, 0.7, 0.4)
    assert cfg.model.checkpoint  # CDGC gradient checkpointing on for the GPU presets


def test_scenes_preset_is_the_cpu_demo() -> None:
    cfg = preset("scenes")
    assert cfg.model.depth == 18 and cfg.dataset == "scenes" and cfg.model.num_classes == 19
    assert cfg.data.root == "shards/scenes" and not cfg.model.checkpoint
    assert set(PRESETS) == {
        "cityscapes",
        "voc",
        "cocostuff10k",
        "cocostuff164k",
        "scenes",
        "ade20k",
        "context",
    }
    context = preset("context")  # the scenes run on the generated `context` set
    assert context.data.root == "shards/context" and context.runtime.run_dir == "runs/context"
    assert context.model == cfg.model and context.optim == cfg.optim


def test_overrides_convert_types() -> None:
    cfg = load_config(
        "cityscapes",
        [
            "optim.lr=0.02",
            "model.depth=50",
            "eval.scales=[0.75, 1.0]",
            "eval.flip=true",
            "logging.tags={table: t1}",
            "runtime.max_nonfinite=7",
            "model.parts=[easy, hard_pos]",
            "data.global_batch_size=null",
        ],
    )
    assert cfg.optim.lr == 0.02 and cfg.model.depth == 50
    assert cfg.eval.scales == (0.75, 1.0) and cfg.eval.flip is True
    assert cfg.logging.tags == {"table": "t1"} and cfg.runtime.max_nonfinite == 7
    assert cfg.model.parts == ("easy", "hard_pos") and cfg.data.global_batch_size is None
    assert preset("cityscapes").optim.lr == 0.01  # presets are fresh objects


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "optim.lrr"),
        ("nope.x=1", "nope"),
        ("model.depth=19", "ModelConfig.depth"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("data.batch_size=1.5", "data.batch_size must be an integer"),
        ("eval.flip=maybe", "eval.flip must be true or false"),
        ("runtime.zero_stage=4", "runtime.zero_stage"),
        ("novalue", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("scenes", [override])


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'citiscapes'"):
        load_config("citiscapes")


def test_files_yaml_json_and_errors(tmp_path) -> None:
    y = tmp_path / "exp.yaml"
    y.write_text("preset: voc\noptim:\n  lr: 0.005\nmodel:\n  fusion: sum\n")
    cfg = load_config(str(y), ["schedule.iterations=10"])
    assert cfg.name == "voc" and cfg.optim.lr == 0.005 and cfg.model.fusion == "sum"
    assert cfg.data.crop_size == 513 and cfg.schedule.iterations == 10
    j = tmp_path / "full.json"
    j.write_text(json.dumps(to_dict(cfg)))
    assert load_config(str(j)) == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.learning_rate"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_round_trip_and_flatten() -> None:
    cfg = preset("cocostuff164k")
    assert from_dict(to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["optim.lr"] == "0.001" and flat["model.num_classes"] == "171"
    assert flat["eval.scales"] == "[1.0]" and flat["data.val_split"] == "val"
    assert all(isinstance(v, str) for v in flat.values())


def test_poly_schedule_with_warmup() -> None:
    cfg = load_config("scenes", ["schedule.iterations=100", "schedule.warmup_iters=10"])
    assert poly_lr_factor(0, cfg) == pytest.approx(0.1)
    assert poly_lr_factor(10, cfg) == pytest.approx(0.9**0.9)
    assert poly_lr_factor(50, cfg) == pytest.approx(0.5**0.9)
    assert poly_lr_factor(99, cfg) == pytest.approx(0.01**0.9)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.weight_decay=.inf", "optim.weight_decay"),
        ("optim.momentum=5", "optim.momentum"),
        ("optim.momentum=1", "optim.momentum"),
        ("optim.head_lr_mult=0", "optim.head_lr_mult"),
        ("optim.grad_clip=.inf", "optim.grad_clip"),
        ("loss.alpha=.inf", "loss.alpha"),
        ("loss.beta=-1", "loss.beta"),
        ("loss.gamma=.nan", "loss.gamma"),
        ("loss.ohem_thresh=5", "loss.ohem_thresh"),
        ("loss.ohem_thresh=0", "loss.ohem_thresh"),
        ("schedule.power=.inf", "schedule.power"),
        ("schedule.warmup_factor=.nan", "schedule.warmup_factor"),
        ("eval.scales=[.inf]", "eval.scales[0]"),
        ("eval.scales=[1.0, 0]", "eval.scales[1]"),
        ("data.scale_range=[0.5, .inf]", "data.scale_range[1]"),
        ("data.scale_range=[-.inf, 1]", "data.scale_range[0]"),
        ("data.scale_range=[2, 1]", "data.scale_range[1]"),
        ("data.crop_size=16", "data.crop_size"),
        ("eval.crop=24", "eval.crop"),
        ("runtime.run_dir=/", "runtime.run_dir"),
        ("runtime.run_dir=/tmp", "runtime.run_dir"),
        ("runtime.run_dir=/usr/", "runtime.run_dir"),
        ("runtime.run_dir=~/", "runtime.run_dir"),
        ("data.global_batch_size=6", "data.global_batch_size"),
    ],
)
def test_bad_values_are_refused_in_one_line_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("scenes", [override, "data.batch_size=4"])
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message, message


def test_crop_floor_follows_the_output_stride() -> None:
    assert load_config("scenes", ["data.crop_size=32", "eval.crop=32"]).data.crop_size == 32
    with pytest.raises(ConfigError, match=r"data\.crop_size=48 .* at least 64"):
        load_config("scenes", ["model.output_stride=16", "data.crop_size=48", "eval.crop=64"])


def test_sane_values_at_the_edges_are_kept() -> None:
    cfg = load_config(
        "scenes",
        ["optim.momentum=0", "loss.ohem_thresh=1", "loss.alpha=0", "runtime.run_dir=/tmp/x/run"],
    )
    assert (cfg.optim.momentum, cfg.loss.ohem_thresh, cfg.loss.alpha) == (0.0, 1.0, 0.0)


@pytest.mark.parametrize(
    "key", ["inject_nonfinite_at", "fail_once_at", "kill_at", "crash_in_save_at", "resume_data"]
)
def test_fault_injection_is_not_part_of_the_config(key) -> None:
    # Tests break runs through hooks (tests/launch/faults.py), never through the config.
    assert not any(k.endswith(key) for k in flatten(preset("scenes")))
    with pytest.raises(ConfigError, match=rf"unknown config key\(s\) \['runtime.{key}'\]"):
        load_config("scenes", [f"runtime.{key}=1"])
