"""Exported models: round trip, atomic writes, named errors; DeepSpeed checkpoint consolidation."""

from __future__ import annotations

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
    with pytest.raises(E.CheckpointError, match=r"unknown model config keys \['colour'\]"):
        E.load_exported(path)


def test_directory_that_is_not_a_deepspeed_checkpoint(tmp_path):
    with pytest.raises(E.CheckpointError, match="not a DeepSpeed checkpoint"):
        E.load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("global_step5")
    with pytest.raises(E.CheckpointError, match="names tag 'global_step5'"):
        E.load_checkpoint(tmp_path)
