"""Non-finite loss policy: the step is skipped (weights unchanged) and counted; K in a row stop
the run with a clear error; checkpoints keep finite weights."""

from __future__ import annotations

import pytest
import torch

from launch.checkpoint import latest_complete, read_info
from tests.launch.train_utils import args, losses, python_cmd, run, scenes_shards

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _params(run_dir, it: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(
        str(run_dir / "checkpoints"), tag=f"iter_{it:08d}"
    )
    return {k: v for k, v in state.items() if not k.endswith(BN_BUFFERS)}


@pytest.mark.slow
def test_injected_nan_skips_the_step_and_counts(tmp_path, tmp_path_factory) -> None:
    shards = scenes_shards(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    run(
        python_cmd(
            args(
                shards,
                run_dir,
                "schedule.iterations=3",
                "checkpoint.every=1",
                "checkpoint.keep=3",
                "eval.every=0",
                "runtime.inject_nonfinite_at=[2]",
            )
        ),
        tmp_path,
    )
    rec = losses(run_dir)
    assert [rec[i]["finite"] for i in (1, 2, 3)] == [True, False, True]
    assert rec[3]["nonfinite_total"] == 1
    p1, p2, p3 = (_params(run_dir, i) for i in (1, 2, 3))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)  # iteration 2 changed no weight
    assert any(not torch.equal(p2[k], p3[k]) for k in p2)  # iteration 3 did


@pytest.mark.slow
def test_too_many_nonfinite_in_a_row_stop_with_an_error(tmp_path, tmp_path_factory) -> None:
    shards = scenes_shards(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    proc = run(
        python_cmd(
            args(
                shards,
                run_dir,
                "schedule.iterations=6",
                "checkpoint.every=1",
                "checkpoint.keep=5",
                "eval.every=0",
                "runtime.max_nonfinite=3",
                "runtime.inject_nonfinite_at=[2,3,4]",
            )
        ),
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "NonFiniteLossError: 3 non-finite losses in a row (iterations 2..4)" in proc.stderr
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    last = latest_complete(run_dir / "checkpoints")
    assert last.iteration == 3  # iteration 4 stopped before its save
    assert read_info(last.path).meta["world_size"] == 1
    assert all(torch.isfinite(v).all() for v in _params(run_dir, 3).values())
    assert not (run_dir / "model.pt").exists()
