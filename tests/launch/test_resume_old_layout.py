"""A checkpoint saved before 16-byte parameter alignment (ZeRO's unpadded flat layout, which
DeepSpeed refuses to load into a padded engine) still resumes: through the universal form, with
one line saying so, and with the losses the old program would have computed."""

from __future__ import annotations

import json

import pytest

from tests.launch.train_utils import args, losses, python_cmd, run, scenes_shards

N = 4
COMMON = (f"schedule.iterations={N}", f"checkpoint.every={N // 2}", "eval.every=0")


@pytest.mark.slow  # two short runs and one universal conversion
def test_unpadded_checkpoint_resumes_exactly(tmp_path, tmp_path_factory) -> None:
    shards = scenes_shards(tmp_path_factory.getbasetemp())
    old = tmp_path / "old"
    run(python_cmd(args(shards, old, *COMMON)), tmp_path, faults={"unpadded_layout": True})
    ckpt = old / "checkpoints" / f"iter_{N // 2:08d}"
    marker = ckpt / "COMPLETE"
    meta = json.loads(marker.read_text())
    assert meta["parameter_alignment"] is False
    del meta["parameter_alignment"]  # as markers were written before the key existed
    marker.write_text(json.dumps(meta))

    new = tmp_path / "new"
    proc = run(python_cmd([*args(shards, new, *COMMON), "--resume", str(ckpt)]), tmp_path)
    said = [ln for ln in proc.stdout.splitlines() if "unpadded parameter layout" in ln]
    assert said == [
        f"resume: checkpoint {ckpt} holds ZeRO's unpadded parameter layout (saved before "
        "16-byte alignment): converting to universal form"
    ]
    want, got = losses(old), losses(new)
    assert sorted(got) == list(range(N // 2 + 1, N + 1))
    for it in got:
        assert got[it]["loss"] == want[it]["loss"], f"iteration {it}"  # exact on CPU
    # The new run's checkpoints are padded and say so: they resume without conversion.
    meta = json.loads((new / "checkpoints" / f"iter_{N:08d}" / "COMPLETE").read_text())
    assert meta["parameter_alignment"] is True
