"""Exported models: round trip, atomic writes, named errors; DeepSpeed checkpoint consolidation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cdgcnet.model import build_model
from launch import export as E
from launch.config import load_config, to_dict


def _cfg():
    return load_config("scenes", ["model.channels=16", "model.aux=false"])


def _saved(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg.model).eval()
    path = tmp_path / "run" / "model.pt"
    E.save_exported(model.state_dict(), to_dict(cfg), path, **kw)
    return model, cfg, path


def test_round_trip_gives_the_same_model(tmp_path):
    model, cfg, path = _saved(tmp_path, meta={"iteration": 7, "miou": 0.5})
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temporaries
    loaded, cfg_dict = E.load_exported(path)
    assert cfg_dict == to_dict(cfg)
    assert not loaded.training
    ref, new = model.state_dict(), loaded.state_dict()
    assert ref.keys() == new.keys()
    assert all(torch.equal(ref[k], new[k]) for k in ref)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(x)["refined"], loaded(x)["refined"])
    _, _, iteration = E.load_checkpoint(path)
    assert iteration == 7


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    path = tmp_path / "model.pt"
    with pytest.raises(OSError, match="disk full"):
        E.save_exported({"w": torch.zeros(1)}, to_dict(_cfg()), path)
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    with pytest.raises(E.CheckpointError, match=r"nope\.pt: no such export file"):
        E.load_exported(tmp_path / "nope.pt")
    with pytest.raises(E.CheckpointError, match="no such checkpoint file or directory"):
        E.load_checkpoint(tmp_path / "nope")


def test_not_an_export(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(E.CheckpointError, match=r"plain\.pt: not a cdgcnet export \(format None"):
        E.load_exported(plain)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(E.CheckpointError, match=r"garbage\.pt: not a cdgcnet export"):
        E.load_exported(garbage)
    pickled = tmp_path / "object.pt"
    torch.save({"format": E.FORMAT, "obj": E.CheckpointError("x")}, pickled)
    with pytest.raises(E.CheckpointError, match=r"object\.pt: not a cdgcnet export .*weights_only"):
        E.load_exported(pickled)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model, cfg, path = _saved(tmp_path)
    state = model.state_dict()
    first = next(iter(state))
    del state[first]
    state["extra.weight"] = torch.zeros(1)
    E.save_exported(state, to_dict(cfg), path)
    with pytest.raises(E.CheckpointError) as err:
        E.load_exported(path)
    msg = str(err.value)
    assert (
        str(path) in msg
        and f"missing keys {first}" in msg
        and "unexpected keys extra.weight" in msg
    )


def test_bad_model_config_is_named(tmp_path):
    d = to_dict(_cfg())
    d["model"]["depth"] = 7
    path = tmp_path / "model.pt"
    E.save_exported({}, d, path)
    with pytest.raises(E.CheckpointError, match=r"model\.pt: invalid model config"):
        E.load_exported(path)
    d["model"]["colour"] = "red"
    E.save_exported({}, d, path)
    with pytest.raises(E.CheckpointError, match=r"unknown config key\(s\) \['model\.colour'\]"):
        E.load_exported(path)


def test_one_checkpoint_error_class() -> None:
    from launch import checkpoint

    # Loading an export and resuming a checkpoint fail with the same class: one except clause.
    assert E.CheckpointError is checkpoint.CheckpointError


def test_directory_that_is_not_a_deepspeed_checkpoint(tmp_path):
    with pytest.raises(E.CheckpointError, match="not a DeepSpeed checkpoint"):
        E.load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("global_step5")
    with pytest.raises(E.CheckpointError, match="names tag 'global_step5'"):
        E.load_checkpoint(tmp_path)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_run(rank: int, run_dir: str, port: int) -> None:
    """One ZeRO-2 CPU step, then a checkpoint in the run-dir layout (COMPLETE marker)."""
    import json
    import os

    os.environ.update(
        DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
    )  # fmt: skip
    import deepspeed

    from launch.checkpoint import CheckpointManager
    from launch.distributed import init_distributed, world_from_env

    torch.set_num_threads(1)
    init_distributed(world_from_env())  # gloo; skips DeepSpeed's JIT-built shared-memory op
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config
    )
    out = engine(torch.randn(2, 3, 32, 32), torch.randint(0, 19, (2, 32, 32)))
    engine.backward(out["refined"].square().mean() + out["coarse"].square().mean())
    engine.step()
    CheckpointManager(run_dir, keep=2).save(engine, 3, client_state={}, meta={"world_size": 1})
    Path(run_dir, "config.json").write_text(json.dumps(to_dict(cfg)))
    torch.save(engine.module.state_dict(), Path(run_dir, "reference.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_checkpoint_is_consolidated(tmp_path):
    import torch.multiprocessing as mp

    run_dir = tmp_path / "run"
    mp.spawn(_deepspeed_run, args=(str(run_dir), _free_port()), nprocs=1, join=True)
    ref = torch.load(run_dir / "reference.pt", weights_only=True)
    tag_dir = run_dir / "checkpoints" / "iter_00000003"
    for given in (run_dir, run_dir / "checkpoints", tag_dir):
        model, cfg_dict, iteration = E.load_checkpoint(given)
        assert iteration == 3 and cfg_dict == to_dict(_cfg())
        state = model.state_dict()
        assert state.keys() == ref.keys()
        for k in ref:
            assert torch.equal(
                state[k], ref[k].float() if ref[k].is_floating_point() else ref[k]
            ), k
    (tag_dir / "COMPLETE").unlink()
    with pytest.raises(E.CheckpointError, match="incomplete checkpoint"):
        E.load_checkpoint(tag_dir)
    with pytest.raises(E.CheckpointError, match="not a DeepSpeed checkpoint"):
        E.load_checkpoint(run_dir)


def test_export_without_queries_loads_with_the_members_reading(tmp_path):
    # Models saved before the `queries` option existed were trained with the "members" reading.
    cfg_dict = to_dict(_cfg())
    del cfg_dict["model"]["queries"]
    assert E.model_config_from_dict(cfg_dict, source="old.pt").queries == "members"
    assert E.model_config_from_dict(to_dict(_cfg()), source="new.pt").queries == "all"
