"""ZeRO stages 1 and 3 on 2 CPU ranks train the same model as stage 2 would: equal losses (to
fp32 reduction-order noise), evaluation and the fp32 export (stage 3 consolidates from the
checkpoint)."""

from __future__ import annotations

import json

import pytest

from tests.launch.train_utils import args, losses, run, scenes_shards, torchrun_cmd


# The refined loss depends on argmax node sets, so reduction-order noise that flips one coarse
# pixel changes two class graphs: with the earlier per-class path that happened at the third
# step under "all" (2.7750 vs 2.7719). The fast path agrees for both readings here; a sounder
# oracle (fixed node sets) is still owed.
@pytest.mark.slow
@pytest.mark.parametrize("queries", ["members", "all"])
def test_zero_stage_1_and_3(tmp_path, tmp_path_factory, queries) -> None:
    shards = scenes_shards(tmp_path_factory.getbasetemp())
    got = {}
    for stage in (1, 3):
        run_dir = tmp_path / f"zero{stage}"
        run(
            torchrun_cmd(
                args(
                    shards,
                    run_dir,
                    "schedule.iterations=3",
                    "checkpoint.every=3",
                    "eval.every=0",
                    f"runtime.zero_stage={stage}",
                    f"model.queries={queries}",
                )
            ),
            tmp_path,
        )
        assert (
            json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"]
            == stage
        )
        assert (run_dir / "model.pt").is_file()
        got[stage] = losses(run_dir)
    for it in (1, 2, 3):
        assert got[3][it]["loss"]["total"] == pytest.approx(got[1][it]["loss"]["total"], rel=1e-5)
    assert got[1][3]["loss"]["total"] < got[1][1]["loss"]["total"]  # it learns

    from launch.export import load_exported

    m1, _ = load_exported(tmp_path / "zero1" / "model.pt")
    m3, _ = load_exported(tmp_path / "zero3" / "model.pt")
    s1, s3 = m1.state_dict(), m3.state_dict()
    assert s1.keys() == s3.keys()
    # Float reassociation differs between the stages (bucketed vs partitioned reductions) and
    # three SGD steps amplify it: up to ~3e-4 was seen, in BN running variances and the head.
    worst = max((s1[k].float() - s3[k].float()).abs().max().item() for k in s1)
    assert worst < 1e-3
