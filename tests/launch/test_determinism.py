"""runtime.deterministic: the switch reaches torch (both ways), and a CPU run with it on trains
and repeats the losses of a run with it off (CPU is deterministic either way)."""

from __future__ import annotations

import os

import pytest
import torch

from launch.config import load_config
from launch.determinism import CUBLAS_WORKSPACE, set_deterministic
from tests.launch.train_utils import args, losses, python_cmd, run, scenes_shards


def test_switch_both_ways(monkeypatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
        set_deterministic(False)  # a sweep's next config in the same process
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic = before[1]


def test_config_key() -> None:
    assert load_config("scenes").runtime.deterministic is False
    assert load_config("scenes", ["runtime.deterministic=true"]).runtime.deterministic is True


@pytest.mark.slow  # two short CPU runs
def test_cpu_run_with_it_on_repeats_the_losses(tmp_path, tmp_path_factory) -> None:
    shards = scenes_shards(tmp_path_factory.getbasetemp())
    common = ("schedule.iterations=2", "checkpoint.every=0", "eval.every=0")
    off, on = tmp_path / "off", tmp_path / "on"
    run(python_cmd(args(shards, off, *common)), tmp_path)
    run(python_cmd(args(shards, on, *common, "runtime.deterministic=true")), tmp_path)
    want = {it: r["loss"] for it, r in losses(off).items()}
    assert {it: r["loss"] for it, r in losses(on).items()} == want and sorted(want) == [1, 2]
