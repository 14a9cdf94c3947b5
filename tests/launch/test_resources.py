"""Resource-sized config values have upper bounds (CPUs, memory), and a run dir may not resolve
to a system directory, the home directory or this repository; each refusal is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch import resources
from launch.config import ConfigError, load_config
from launch.train import preflight
from tests.launch.probe import probe
from tests.launch.train_utils import REPO, args, python_cmd, scenes_shards


def test_workers_are_bounded_by_the_cpus(monkeypatch) -> None:
    monkeypatch.setattr(resources, "cpu_count", lambda: 4)
    assert load_config("scenes", ["data.num_workers=4"]).data.num_workers == 4
    with pytest.raises(ConfigError, match=r"^data\.num_workers=100000 is more than the 4 CPUs"):
        load_config("scenes", ["data.num_workers=100000"])


def test_batch_times_crop_is_bounded_by_memory(monkeypatch) -> None:
    monkeypatch.setattr(resources, "memory_bytes", lambda: 16 << 30)
    for name in ("scenes", "cityscapes", "voc", "cocostuff164k"):
        load_config(name)  # every preset fits in 16 GiB
    with pytest.raises(ConfigError) as e:
        load_config("scenes", ["data.batch_size=100000"])
    assert str(e.value).startswith(
        "data.batch_size=100000 with data.crop_size=96 asks for at least 878.9 GiB per training "
        "step (1024 bytes per pixel"
    )
    assert "more than the 16.0 GiB of memory of this machine" in str(e.value)
    with pytest.raises(ConfigError, match=r"data\.crop_size=100000 asks for"):
        load_config("scenes", ["data.crop_size=100000", "data.batch_size=1"])


def test_eval_scales_are_bounded_by_memory_for_the_splits_images(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(resources, "memory_bytes", lambda: 16 << 30)
    shards = scenes_shards(tmp_path)  # 96 x 64 images
    ok = load_config("scenes", [f"data.root={shards}", "eval.scales=[0.5,1.0,2.0]"])
    preflight(ok, 1, "auto")
    cfg = load_config("scenes", [f"data.root={shards}", "eval.scales=[1.0,100]"])
    with pytest.raises(ConfigError) as e:
        preflight(cfg, 1, "auto")
    assert str(e.value).startswith(
        "eval.scales: 100 asks for at least 29.3 GiB to run an image of 6144 pixels at scale 100"
    )
    assert str(shards / "val") in str(e.value)


@pytest.mark.parametrize("target", ["/", "/usr/local", "/etc/x", "REPO", "REPO/launch", "HOME"])
def test_run_dirs_that_resolve_to_system_or_repository_folders_are_refused(
    tmp_path, target
) -> None:
    real = {"REPO": str(REPO), "REPO/launch": str(REPO / "launch"), "HOME": str(Path.home())}
    link = tmp_path / "runs" / "x"
    link.parent.mkdir()
    link.symlink_to(real.get(target, target))
    with pytest.raises(ConfigError, match=r"^runtime\.run_dir='.*/runs/x' \(.*\) is "):
        load_config("scenes", [f"runtime.run_dir={link}"])
    assert resources.run_dir_problem(str(tmp_path / "runs" / "y")) is None
    assert resources.run_dir_problem(str(REPO / "runs" / "scenes")) is None


@pytest.mark.parametrize(
    "override",
    ["data.num_workers=100000", "data.batch_size=100000", "eval.scales=[1000]", "LINK"],
)
def test_absurd_values_are_one_line_from_train(tmp_path, override) -> None:
    shards = scenes_shards(tmp_path)
    run_dir = tmp_path / "run"
    if override == "LINK":
        run_dir.symlink_to("/usr/local")
        override = "schedule.iterations=1"
    p = probe(python_cmd(args(shards, run_dir, override)), tmp_path)
    line = p.one_refusal()
    assert line.startswith(
        "error: " + override.split("=")[0].replace("schedule.iterations", "runtime.run_dir")
    )
    assert p.peak_mb < 1024 and p.seconds < 30


def test_predict_refuses_an_image_too_large_for_its_scales(tmp_path) -> None:
    import cv2
    import numpy as np

    from launch.predict import PredictError, read_image

    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.zeros((64, 96, 3), np.uint8))
    assert read_image(path, scales=(1.0, 2.0)).shape == (64, 96, 3)
    with pytest.raises(PredictError, match=r"a\.png: eval\.scales: 100000 asks for at least"):
        read_image(path, scales=(100_000.0,))
