"""Untrusted configs and images cost bounded memory and time, and errors quote a short prefix.

The probes of issue 23: a YAML alias bomb (10**9 strings when expanded, a few hundred bytes of
text) in an override, a config file, a run directory's config.yaml and, as shared references,
in the config of an exported model.pt; a 875 KB PNG declaring 30000 x 30000 pixels given to
predict.py. Each is refused in one line, fast, without the expansion ever happening.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from launch import bounded
from launch.config import ConfigError, from_dict, load_config, model_config, to_dict
from launch.export import CheckpointError, load_checkpoint, save_exported
from tests.launch.probe import alias_bomb, huge_png, probe, shared_graph
from tests.launch.train_utils import REPO

SMALL = ["model.depth=18", "model.channels=16", "model.aspp=false", "model.aux=false"]


def test_quote_is_short_for_any_value() -> None:
    assert bounded.quote("x" * 10**6) == "'" + "x" * 76 + "..."
    assert len(bounded.quote(shared_graph(12))) <= bounded.QUOTE_CHARS
    assert bounded.quote(1 << 100_000) == "<int of 100001 bits>"
    assert bounded.quote([1, 2]) == "[1, 2]"


@pytest.mark.parametrize("flow", [False, True])
def test_yaml_anchors_and_aliases_are_refused_before_anything_is_built(flow) -> None:
    t0 = time.monotonic()
    with pytest.raises(bounded.BoundsError, match=r"anchors and aliases .*\(line 1, column"):
        bounded.load_yaml(alias_bomb(flow=flow))
    assert time.monotonic() - t0 < 1
    with pytest.raises(bounded.BoundsError, match="anchors and aliases"):
        bounded.load_yaml("a: &x 1\n")  # an anchor alone is refused too


@pytest.mark.parametrize(
    "text, reason",
    [
        ("[" * 100_000, "nested more than"),
        ("x: " + "9" * 5000, "not valid YAML"),
        ("x: '" + "a" * 70000 + "'", "a string of 70000 characters"),
        ("x: " + "y" * (bounded.MAX_TEXT_BYTES + 1), "bytes of config text"),
        ("[" + ", ".join(["1"] * (bounded.MAX_NODES + 1)) + "]", "more than 10000 values"),
    ],
)
def test_other_oversized_yaml_is_refused(text, reason) -> None:
    with pytest.raises(bounded.BoundsError, match=reason) as e:
        bounded.load_yaml(text)
    assert len(str(e.value)) < 300


def test_a_shared_string_counts_at_every_use() -> None:
    bounded.check_tree({"tags": {"a": "x" * 60_000}})
    with pytest.raises(bounded.BoundsError, match="characters of strings"):
        bounded.check_tree({"tags": ["x" * 60_000] * 100})  # 100 uses, 6 MB expanded


def test_alias_bomb_in_an_override_is_one_short_error() -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"override 'logging\.tags=\{a0: &a0") as e:
        load_config("scenes", ["logging.tags=" + alias_bomb(flow=True)])
    assert "anchors and aliases" in str(e.value)
    assert len(str(e.value)) < 300 and time.monotonic() - t0 < 1


def test_alias_bomb_in_a_config_file_is_one_short_error(tmp_path) -> None:
    f = tmp_path / "bomb.yaml"
    f.write_text("preset: scenes\n" + alias_bomb())
    with pytest.raises(ConfigError, match=f"{f}: YAML anchors and aliases"):
        load_config(str(f))


def test_long_values_are_quoted_by_a_prefix() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("scenes", ["optim.lr=" + "a" * 4000])
    assert str(e.value).startswith("optim.lr must be a number, got 'aaaa")
    assert len(str(e.value)) < 200


def _graph_config(where: str) -> dict:
    cfg = to_dict(load_config("scenes", SMALL))
    if where == "model":
        cfg["model"]["parts"] = shared_graph()
    else:
        cfg["logging"]["tags"] = {"t": shared_graph()}
    return cfg


@pytest.mark.parametrize("where", ["model", "tags"])
def test_shared_references_in_a_config_dict_are_refused(where) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="more than 10000 values"):
        if where == "model":
            model_config(_graph_config(where)["model"])
        else:
            from_dict(_graph_config(where))
    assert time.monotonic() - t0 < 1


def _export(tmp_path: Path, cfg_dict: dict | None = None) -> Path:
    """A model.pt; with cfg_dict written as given, shared references kept (save_exported
    would expand them)."""
    from cdgcnet.model import build_model
    from launch.export import FORMAT

    cfg = load_config("scenes", SMALL)
    model = build_model(cfg.model)
    path = tmp_path / "model.pt"
    if cfg_dict is None:
        save_exported(model.state_dict(), to_dict(cfg), path)
    else:
        torch.save({"model": model.state_dict(), "config": cfg_dict, "format": FORMAT}, path)
    return path


def test_exported_model_with_a_shared_reference_config_is_refused(tmp_path) -> None:
    plain = _export(tmp_path).stat().st_size
    path = _export(tmp_path, _graph_config("model"))
    assert path.stat().st_size - plain < 10_000  # the graph is stored shared
    with pytest.raises(CheckpointError, match=r"model\.pt: invalid model config: .*10000 values"):
        load_checkpoint(path)


def test_run_dir_config_yaml_bomb_is_refused(tmp_path) -> None:
    from launch.export import _read_config_file

    f = tmp_path / "config.yaml"
    f.write_text(alias_bomb())
    with pytest.raises(CheckpointError, match=f"{f}: cannot read the config: YAML anchors"):
        _read_config_file(f)


# ---------------------------------------------------------------- the probes, end to end


def test_predict_refuses_a_huge_png_from_its_header(tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    huge_png(images / "huge.png")
    assert (images / "huge.png").stat().st_size < 1 << 20
    cmd = [
        sys.executable,
        str(REPO / "launch" / "predict.py"),
        "--checkpoint",
        str(_export(tmp_path)),
    ]
    p = probe([*cmd, "--images", str(images), "--out", str(tmp_path / "out")], tmp_path)
    line = p.one_refusal()
    assert line.startswith(f"error: {images / 'huge.png'}: image is 30000x30000 = 900000000")
    assert "max_pixels" in line
    assert p.peak_mb < 1024 and p.seconds < 30
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_alias_bomb_override_in_one_line(tmp_path) -> None:
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", "scenes"]
    p = probe([*cmd, "logging.tags=" + alias_bomb(flow=True)], tmp_path)
    line = p.one_refusal()
    assert "YAML anchors and aliases" in line and len(line) < 300
    assert p.peak_mb < 1024 and p.seconds < 30


def test_evaluate_refuses_a_shared_reference_config_in_one_line(tmp_path) -> None:
    path = _export(tmp_path, _graph_config("tags"))
    cmd = [
        sys.executable,
        str(REPO / "launch" / "evaluate.py"),
        "--checkpoint",
        str(path),
        "--no-mlflow",
    ]
    p = probe(cmd, tmp_path)
    line = p.one_refusal()
    assert "its config is not valid" in line and "10000 values" in line
    assert p.peak_mb < 1024 and p.seconds < 30
