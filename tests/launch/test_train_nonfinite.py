"""Non-finite loss policy: the step is skipped (weights unchanged) and counted; K in a row stop
the run with a clear error; checkpoints keep finite weights. One run covers both."""

from __future__ import annotations

import pytest
import torch

from launch.checkpoint import latest_complete
from tests.launch.train_utils import args, losses, python_cmd, run, scenes_shards

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _params(run_dir, it: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(
        str(run_dir / "checkpoints"), tag=f"iter_{it:08d}"
    )
    return {k: v for k, v in state.items() if not k.endswith(BN_BUFFERS)}


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, tmp_path_factory) -> None:
    shards = scenes_shards(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    proc = run(
        python_cmd(
            args(
                shards,
                run_dir,
                "schedule.iterations=8",
                "checkpoint.every=1",
                "checkpoint.keep=8",
                "eval.every=0",
                "runtime.max_nonfinite=3",
            )
        ),
        tmp_path,
        check=False,
        faults={"nonfinite_at": [2, 4, 5, 6]},
    )
    # Iteration 2: one skip, then training goes on; 4, 5, 6: three in a row -> stop.
    assert proc.returncode != 0
    assert "NonFiniteLossError: 3 non-finite losses in a row (iterations 4..6)" in proc.stderr
    assert "iteration 2: non-finite loss, step skipped (1 in a row, 1 in total)" in proc.stdout
    rec = losses(run_dir)
    assert sorted(rec) == [1, 2, 3, 4, 5, 6]
    assert [rec[i]["finite"] for i in range(1, 7)] == [True, False, True, False, False, False]
    assert rec[3]["nonfinite_total"] == 1 and rec[6]["nonfinite_total"] == 4

    p = {i: _params(run_dir, i) for i in (1, 2, 3, 5)}
    assert all(torch.equal(p[1][k], p[2][k]) for k in p[1])  # iteration 2 changed no weight
    assert any(not torch.equal(p[2][k], p[3][k]) for k in p[2])  # iteration 3 did
    assert all(torch.equal(p[3][k], p[5][k]) for k in p[3])  # nor did 4 and 5
    assert latest_complete(run_dir / "checkpoints").iteration == 5  # 6 stopped before its save
    assert all(torch.isfinite(v).all() for v in p[5].values())
    assert not (run_dir / "model.pt").exists()
