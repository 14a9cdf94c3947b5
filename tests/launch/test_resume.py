"""Exact resume after SIGKILL (2 ranks, CPU): the per-iteration losses after resuming equal
those of an uninterrupted run; restarting the data stream from scratch differs; a checkpoint
of 2 ranks resumes on 1 through the universal conversion, SGD momentum included."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.launch.train_utils import args, losses, python_cmd, run, scenes_shards, torchrun_cmd

N = 6
COMMON = (
    f"schedule.iterations={N}",
    f"checkpoint.every={N // 2}",
    "checkpoint.keep=3",
    "eval.every=0",
    "data.num_workers=1",
)
KILL = {"kill_at": N // 2}  # SIGKILL every rank right after the checkpoint at N/2
FRESH_DATA = {"fresh_data": True}  # resume weights and RNG, restart the data stream


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted run and a run SIGKILLed right after its checkpoint at N/2."""
    shards = scenes_shards(tmp_path_factory.getbasetemp())
    base = tmp_path_factory.mktemp("resume")
    full, killed = base / "full", base / "killed"
    run(torchrun_cmd(args(shards, full, *COMMON)), base)
    proc = run(torchrun_cmd(args(shards, killed, *COMMON)), base, check=False, faults=KILL)
    assert proc.returncode != 0 and "exitcode: -9" in proc.stderr  # SIGKILL, not an exit
    snapshot = base / "killed_snapshot"  # each test resumes its own copy
    shutil.copytree(killed, snapshot)
    return {"shards": shards, "base": base, "full": full, "killed": snapshot}


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses(runs) -> None:
    full, killed = runs["full"], runs["base"] / "resumed"
    shutil.copytree(runs["killed"], killed)
    assert not (killed / "model.pt").exists()
    assert sorted(losses(killed)) == [1, 2, 3]
    control = runs["base"] / "control"
    shutil.copytree(runs["killed"], control)

    proc = run(torchrun_cmd(args(runs["shards"], killed, *COMMON)), runs["base"])
    assert f"at iteration {N // 2}" in proc.stdout
    want, got = losses(full), losses(killed)
    assert sorted(got) == list(range(1, N + 1))
    for it in range(1, N + 1):
        assert got[it]["loss"] == want[it]["loss"], f"iteration {it}"  # exact, not approximate
        assert got[it]["lr"] == want[it]["lr"]

    # Control: same weights and RNG, but the data stream from its start -> other losses.
    run(torchrun_cmd(args(runs["shards"], control, *COMMON)), runs["base"], faults=FRESH_DATA)
    ctl = losses(control)
    assert [ctl[i]["loss"] for i in (1, 2, 3)] == [want[i]["loss"] for i in (1, 2, 3)]
    for it in range(N // 2 + 1, N + 1):
        assert ctl[it]["loss"]["total"] != want[it]["loss"]["total"]


@pytest.mark.slow
def test_resume_two_ranks_onto_one(runs) -> None:
    src = runs["base"] / "world1"
    shutil.copytree(runs["killed"], src)
    ckpt = src / "checkpoints" / f"iter_{N // 2:08d}"
    proc = run(python_cmd(args(runs["shards"], src, *COMMON)), runs["base"])
    assert "was saved by 2 rank(s), this world has 1" in proc.stdout
    got = losses(src)
    assert sorted(got) == list(range(1, N + 1)) and all(r["finite"] for r in got.values())
    assert (src / "model.pt").exists()

    # The universal form holds the consolidated fp32 weights and SGD momentum of both ranks.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    uni = src / "checkpoints" / "universal" / ckpt.name / "zero"
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    name = "aspp.bottleneck.0.weight"  # the 3x3 conv that makes the feature X
    w = torch.load(uni / name / "fp32.pt", weights_only=False)["param"]
    assert torch.equal(w, fp32[name])
    mom = torch.load(uni / name / "momentum_buffer.pt", weights_only=False)["param"]
    assert mom.shape == w.shape and mom.abs().sum() > 0
    assert torch.equal(mom, _momentum_from_partitions(ckpt, name).view_as(mom))


def _momentum_from_partitions(ckpt: Path, name: str) -> torch.Tensor:
    """A parameter's SGD momentum gathered from the ZeRO-2 optimizer partitions of all ranks."""
    pieces = []
    for f in sorted(ckpt.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")):
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for gid, mapping in enumerate(osd["param_slice_mappings"]):
            if name in mapping:
                frag = mapping[name]
                buf = osd["base_optimizer_state"]["state"][gid]["momentum_buffer"]
                pieces.append(buf.narrow(0, frag.start, frag.numel))
    return torch.cat(pieces)
