"""The trainer stage's helpers (lease/trainer.py, lease/trainer_run.py): step times from the
records, the from-scratch override, --set and --variant, the goals row against the plain step."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from launch.config import check_pretrained, load_config
from lease.context import GPU, Ctx, parse_trainer_overrides
from lease.results import load_results
from lease.supervisor import stage_cap_s
from lease.trainer import FROM_SCRATCH, _variant_writer, trainer_variants, versus_plain
from lease.trainer_run import step_summary


def test_step_time_leaves_out_warmup_and_the_step_after_a_save() -> None:
    t = [0.0, 5.0, 5.5, 6.0, 9.0, 9.5]  # iteration 1 at 0 s; iteration 5 follows a 2.5 s save
    rows = [{"iteration": i + 1, "t_s": s, "data_wait_fraction": 0.1 * i} for i, s in enumerate(t)]
    got = step_summary(rows, skip={5}, warmup=2)
    assert got["steps_timed"] == 3  # iterations 3, 4 and 6
    assert got["step_ms_median"] == 500.0 and got["step_ms_max"] == 500.0
    assert got["data_wait_fraction_median"] == 0.35  # iterations 3-6


def test_from_scratch_override_loads_the_paper_preset() -> None:
    cfg = load_config("cityscapes", [FROM_SCRATCH])
    check_pretrained(cfg)  # the paper preset refuses to start without it
    assert cfg.model.pretrained == "none"


def test_trainer_overrides_and_variants(tmp_path: Path) -> None:
    def error(message: str) -> None:
        raise ValueError(message)

    sets, variants = parse_trainer_overrides(
        ["runtime.precision=bf16"], ["model.queries=members", "a.b=1 'c.d=[1, 2]'"], error
    )
    assert sets == ("runtime.precision=bf16",)
    assert variants == (("model.queries=members",), ("a.b=1", "c.d=[1, 2]"))
    with pytest.raises(ValueError, match="'members' is not KEY=VALUE"):
        parse_trainer_overrides(None, ["members"], error)
    ctx = Ctx(tmp_path, tmp_path, GPU, False, 0.0, sets, variants)
    assert trainer_variants(ctx) == [
        (*sets, "model.queries=members"),
        (*sets, "a.b=1", "c.d=[1, 2]"),
    ]
    alone = Ctx(tmp_path, tmp_path, GPU, False, 0.0, sets, ())
    assert trainer_variants(alone) == [sets]
    # Each configuration gets the trainer's cap; the first writes stages.trainer, the rest
    # stages.trainer.variants[].
    args = argparse.Namespace(variant=["x=1", "y=2"])
    assert stage_cap_s(GPU, "trainer", args) == 2 * 200
    assert stage_cap_s(GPU, "trainer", argparse.Namespace(variant=None)) == 200
    assert stage_cap_s(GPU, "cdgc", args) == 75
    _variant_writer(ctx, 0)({"set": []})
    _variant_writer(ctx, 2)({"set": ["y=2"]})
    _variant_writer(ctx, 1)({"set": ["x=1"], "run": {"status": "ok"}})
    trainer = load_results(tmp_path)["stages"]["trainer"]
    assert trainer["set"] == []
    assert trainer["variants"] == [{"set": ["x=1"], "run": {"status": "ok"}}, {"set": ["y=2"]}]


def test_trainer_against_the_plain_step() -> None:
    run = {"step_ms_median": 60.0, "train_peak_allocated_mb": 7000.0}
    plain = {"step_ms": 50.0, "peak_mem_mb": 5800.0, "device": "cuda"}
    row = versus_plain(run, plain, {"gpu_busy_fraction": 0.93})
    assert row["time_ratio"] == 1.2 and row["time_ok"] is False
    assert row["memory_extra_mb"] == 1200.0 and row["memory_ok"] is True
    assert row["gpu_busy_fraction"] == 0.93
    cpu = versus_plain(run, {**plain, "device": "cpu"}, None)
    assert cpu["memory_extra_mb"] is None and cpu["memory_ok"] is None
    assert versus_plain({}, plain, None)["time_ok"] is None  # the run failed
