"""The paper presets refuse to train without ImageNet weights, at config validation, in one line."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.config import PAPER_PRESETS, ConfigError, check_pretrained, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_need_pretrained(name):
    with pytest.raises(ConfigError) as info:
        check_pretrained(load_config(name))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"preset {name!r} starts from ImageNet weights and model.pretrained")
    assert "`python -m cdgcnet.weights fetch torchvision-resnet101-v1 --out weights`" in msg
    assert "model.pretrained=none to train from scratch on purpose" in msg
    check_pretrained(load_config(name, ["model.pretrained=none"]))  # on purpose: accepted
    assert load_config(name, ["model.pretrained=None"]).model.pretrained == "none"


def test_hint_follows_the_stem_and_depth(tmp_path):
    with pytest.raises(ConfigError, match="fetch mmseg-resnet101-v1c --out weights"):
        check_pretrained(load_config("cityscapes", ["model.deep_stem=true"]))
    with pytest.raises(ConfigError, match="fetch torchvision-resnet50-v1 --out weights"):
        check_pretrained(load_config("voc", ["model.depth=50"]))
    with pytest.raises(ConfigError, match="no known ImageNet file for ResNet-34"):
        check_pretrained(load_config("voc", ["model.depth=34"]))


def test_named_file_must_exist_and_scenes_needs_none(tmp_path):
    missing = tmp_path / "r101.safetensors"
    with pytest.raises(ConfigError, match=rf"model.pretrained={missing}: file not found; run `python -m cdgcnet.weights fetch"):  # fmt: skip
        check_pretrained(load_config("cityscapes", [f"model.pretrained={missing}"]))
    with pytest.raises(ConfigError, match="file not found"):  # every preset, not only the paper's
        check_pretrained(load_config("scenes", [f"model.pretrained={missing}"]))
    missing.write_bytes(b"")  # existence is checked here; the contents when the model is built
    check_pretrained(load_config("cityscapes", [f"model.pretrained={missing}"]))
    check_pretrained(load_config("scenes"))  # the demo stays as it is


def test_train_stops_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--nodes", "1", "--config",
         "cityscapes", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: preset 'cityscapes' starts from")
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []  # no run dir, no mlflow.db
    assert elapsed < 30


def test_in_process_run_checks_too():
    from launch.train import run

    with pytest.raises(ConfigError, match="preset 'voc' starts from ImageNet weights"):
        run(load_config("voc"))


def test_weights_sha256_and_source_are_run_params(tmp_path):
    from mlflow import MlflowClient

    from cdgcnet.backbone import DilatedResNet
    from cdgcnet.weights import sha256_file, write_safetensors
    from launch.tracking import Tracker

    weights = tmp_path / "r18.safetensors"
    state = DilatedResNet(18).state_dict()
    write_safetensors(state, weights, {"source": "torchvision-resnet18-test"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = [f"logging.tracking_uri={uri}", "model.channels=16"]
    runs = {}
    for pretrained in (str(weights), "none"):
        cfg = load_config("scenes", [*base, f"model.pretrained={pretrained}"])
        tracker = Tracker(cfg, enabled=True)
        runs[pretrained] = tracker.start()
        tracker.end()
    client = MlflowClient(tracking_uri=uri)
    params = client.get_run(runs[str(weights)]).data.params
    assert params["pretrained.sha256"] == sha256_file(weights)
    assert len(params["pretrained.sha256"]) == 64
    assert params["pretrained.source"] == "torchvision-resnet18-test"
    assert params["model.pretrained"] == str(weights)
    params = client.get_run(runs["none"]).data.params
    assert params["model.pretrained"] == "none" and params["pretrained.sha256"] == "none"
    assert params["pretrained.source"] == "none (model.pretrained=none: from scratch on purpose)"


def test_recorded_depth_and_stem_must_match_the_model(tmp_path):
    import torch
    from safetensors import safe_open

    from cdgcnet.weights import read_metadata, write_safetensors

    r50 = tmp_path / "r50.safetensors"
    write_safetensors({"x": torch.zeros(1)}, r50, {"source": "t", "depth": "50", "stem": "7x7"})
    with safe_open(str(r50), framework="pt") as f:  # the header parser agrees with safetensors
        assert read_metadata(r50) == f.metadata() == {"source": "t", "depth": "50", "stem": "7x7"}
    with pytest.raises(ConfigError) as info:
        check_pretrained(load_config("cityscapes", [f"model.pretrained={r50}"]))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(
        f"model.pretrained={r50}: wrong architecture: the file is a ResNet-50, 7x7 stem, "
        "the model a ResNet-101, 7x7 stem"
    )
    check_pretrained(load_config("cityscapes", [f"model.pretrained={r50}", "model.depth=50"]))
    v1c = tmp_path / "v1c.safetensors"
    write_safetensors({"x": torch.zeros(1)}, v1c, {"depth": "101", "stem": "deep"})
    with pytest.raises(ConfigError, match="the file is a ResNet-101, deep stem, the model a ResNet-101, 7x7 stem"):  # fmt: skip
        check_pretrained(load_config("voc", [f"model.pretrained={v1c}"]))
    check_pretrained(load_config("voc", [f"model.pretrained={v1c}", "model.deep_stem=true"]))
