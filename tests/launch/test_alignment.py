"""Every parameter and buffer of the engine the trainer builds is 16-byte aligned in every ZeRO
stage, the start-up check names the parameter when it is not (ZeRO's unpadded layout), and
ZeRO-3 on one rank (views into one flat buffer) is refused before DeepSpeed starts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from launch.alignment import ALIGNMENT, misaligned
from tests.launch.train_utils import REPO, env, free_port

# The cityscapes model's 19 classes at toy width: the 19-element classifier biases are what put
# the parameters after them off a boundary in an unpadded flat buffer.
OVERRIDES = [
    "model.pretrained=none",
    "model.depth=18",
    "model.channels=16",
    "model.aspp_channels=16",
    "runtime.precision=fp32",
]

# Builds engines with launch.trainer.build_engine itself (no DeepSpeed state in the pytest
# process) for the ZeRO stages in argv, looks at every tensor's address, then builds ZeRO-2
# without DeepSpeed's padding; rank 0 prints one JSON line.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import deepspeed
    import torch
    from launch.alignment import AlignmentError
    from launch.config import ConfigError, load_config
    from launch.distributed import init_distributed, world_from_env
    import launch.trainer as trainer

    overrides, stages = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    world = world_from_env()
    init_distributed(world)
    cpu = torch.device("cpu")
    out = {}
    for stage in stages:
        cfg = load_config("cityscapes", [*overrides, f"runtime.zero_stage={stage}"])
        try:
            engine, ds, _ = trainer.build_engine(cfg, world, cpu, load_universal=False)
        except ConfigError as e:
            out[stage] = {"refused": str(e)}
            continue
        module = engine.module
        params = list(module.parameters())
        # ZeRO-3 holds partitions between forwards: look at the gathered parameters.
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            tensors = [*module.named_parameters(), *module.named_buffers()]
            out[stage] = {
                "tensors": sum(t.numel() > 0 for _, t in tensors),
                "off": [n for n, t in tensors if t.numel() and t.data_ptr() % 16],
            }
        engine.destroy()

    build = trainer.build_ds_config

    def unpadded(*args, **kwargs):
        ds = build(*args, **kwargs)
        ds["zero_optimization"].pop("parameter_alignment")
        return ds

    trainer.build_ds_config = unpadded
    cfg = load_config("cityscapes", [*overrides, "runtime.zero_stage=2"])
    try:
        trainer.build_engine(cfg, world, cpu, load_universal=False)
        out["unpadded"] = None
    except AlignmentError as e:
        out["unpadded"] = str(e)
    if world.is_main:
        print("RESULT " + json.dumps(out))
    """
)


def _build(stages: list[int], nproc: int) -> dict:
    a = ["-c", SCRIPT, json.dumps(OVERRIDES), json.dumps(stages)]
    if nproc == 1:
        cmd = [sys.executable, *a]
    else:  # torchrun runs files only: hand it the interpreter's -c through a one-line file
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
        cmd += ["--no-python", sys.executable, *a]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _assert_aligned(out: dict, stages: list[int]) -> None:
    assert {s: out[str(s)]["off"] for s in stages} == {s: [] for s in stages}
    assert all(out[str(s)]["tensors"] > 150 for s in stages)  # parameters and buffers seen
    # Without DeepSpeed's padding the check refuses the engine in one line naming a parameter.
    message = out["unpadded"]
    assert message is not None and "\n" not in message
    assert re.match(r"[\w.]+\.\w+ starts (4|8|12) bytes past a 16-byte boundary", message)
    assert "parameter_alignment" in message


def test_one_rank_every_stage_aligned_and_zero3_refused() -> None:
    out = _build([0, 1, 2, 3], nproc=1)
    _assert_aligned(out, [0, 1, 2])
    assert out["3"]["refused"].startswith("runtime.zero_stage=3 needs 2 or more ranks")


@pytest.mark.slow  # two ranks: a torchrun start and three engines each
def test_two_ranks_every_zero_stage_aligned() -> None:
    out = _build([1, 2, 3], nproc=2)
    _assert_aligned(out, [1, 2, 3])


def test_misaligned_reports_offsets_and_skips_empty_tensors() -> None:
    flat = torch.zeros(64)
    named = [
        ("a", flat[0:19]),
        ("b", flat[19:23]),  # 76 bytes in: 12 past a boundary
        ("c", flat[20:20]),  # empty: nothing for a kernel to read
        ("d", flat[24:30]),  # 96 bytes in: aligned
    ]
    assert misaligned(iter(named)) == [("b", 76 % ALIGNMENT)]
