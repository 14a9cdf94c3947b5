"""Dataset specs (one per dataset, everything derived from it), ADE20K end to end, the check
that training makes of its shards, and how pipeline.pack schedules and reports a job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cdgcnet.config import model_preset
from cdgcnet.labels import LABEL_SPECS
from launch.config import PRESETS, preset
from pipeline import pack as pack_mod
from pipeline import synth, verify
from pipeline.datasets import DATASETS
from pipeline.manifest import DatasetMismatch, check_dataset
from pipeline.reader import EvalStream


def test_every_name_means_one_dataset():
    """Packer, generator, labels, presets and model class counts all come from the spec."""
    assert set(DATASETS) == set(LABEL_SPECS) <= set(synth.DATASETS)
    for name, spec in DATASETS.items():
        assert spec.labels is LABEL_SPECS[name]
        assert model_preset(name).num_classes == spec.num_classes
        if spec.recipe is not None:
            cfg = preset(name)
            assert (cfg.dataset, cfg.model.num_classes) == (name, spec.num_classes)
            assert (cfg.data.root, cfg.data.train_split, cfg.data.val_split) == (
                f"shards/{name}", spec.train_split, spec.val_split,
            )  # fmt: skip
            assert (cfg.data.crop_size, cfg.optim.lr) == (spec.recipe.crop_size, spec.recipe.lr)
    assert preset("scenes").dataset == "scenes" and set(PRESETS) == set(DATASETS)


def test_ade20k_preset_is_the_common_512_160k_setting():
    cfg = preset("ade20k")
    assert (cfg.data.crop_size, cfg.data.global_batch_size, cfg.schedule.iterations) == (
        512, 16, 160_000,
    )  # fmt: skip
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum) == (0.01, 5e-4, 0.9)
    assert cfg.schedule.power == 0.9 and cfg.model.num_classes == 150
    assert cfg.model.depth == 101 and cfg.model.output_stride == 8


@pytest.fixture(scope="module")
def ade20k(tmp_path_factory) -> tuple[Path, Path]:
    """Generated ADE20K (original layout) packed with the CLI: (source root, shard set)."""
    base = tmp_path_factory.mktemp("ade")
    src = synth.generate("ade20k", base / "src", train=5, val=3)
    out = base / "shards"
    assert pack_mod.main(["ade20k", "--src", str(src), "--out", str(out), "--no-progress",
                          "--workers", "1", "--max-count", "2"]) == 0  # fmt: skip
    return src, out


def test_ade20k_packs_verifies_and_reads(ade20k, capsys):
    src, out = ade20k
    assert verify.main([str(out), "--decode"]) == 0
    assert "training: 3 shards, 5 samples verified: ok" in capsys.readouterr().out.replace(
        f"{out}/", ""
    )
    m = json.loads((out / "validation/manifest.json").read_text())
    assert m["dataset"] == "ade20k" and m["num_classes"] == 150 and m["label_map"]["1"] == 0
    assert m["label_map"]["150"] == 149 and "0" not in m["label_map"]
    root = src / "ADEChallengeData2016"
    for sample in EvalStream(out / "validation"):
        ids = cv2.imread(str(root / "annotations/validation" / f"{sample['key']}.png"), -1)
        expected = np.where(ids == 0, 255, ids.astype(np.int64) - 1)  # 0 -> ignore, k -> k-1
        np.testing.assert_array_equal(sample["label"][0].numpy(), expected)
        assert (expected == 255).any() and (expected < 150).any()


def test_training_refuses_shards_of_another_dataset(ade20k, tmp_path):
    _, out = ade20k
    splits = ("training", "validation")
    assert check_dataset(out, splits, "ade20k", 150) is LABEL_SPECS["ade20k"]
    with pytest.raises(DatasetMismatch) as e:
        check_dataset(out, splits, "cityscapes", 19)
    assert str(e.value) == (
        f"{out}/training/manifest.json: shards of dataset 'ade20k' (150 classes), but the config "
        "trains 'cityscapes' (19 classes): dataset, class count, class names, label map differ"
    )
    with pytest.raises(
        DatasetMismatch, match=r"model\.num_classes=19 but dataset 'ade20k' has 150"
    ):
        check_dataset(out, splits, "ade20k", 19)


def test_pack_small_job_in_process_rerun_skipped_and_summary(tmp_path, monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started for a small job")

    monkeypatch.setattr(pack_mod, "ray_session", no_ray)
    monkeypatch.setattr(pack_mod, "_run_on_ray", no_ray)
    src = synth.generate("cityscapes", tmp_path / "src", train=3, val=2, size=(64, 32))
    args = ["cityscapes", "--src", str(src), "--out", str(tmp_path / "out"), "--no-progress",
            "--workers", "4"]  # fmt: skip
    assert pack_mod.main(args) == 0
    out = capsys.readouterr().out
    assert "train: 3 samples in 1 shards; packed 1 shard(s) in-process, kept 0" in out
    assert f"summary (cityscapes -> {tmp_path / 'out'}):" in out
    t0 = time.perf_counter()
    assert pack_mod.main(args) == 0
    assert time.perf_counter() - t0 < 10
    lines = capsys.readouterr().out.splitlines()
    summary = lines[lines.index(f"summary (cityscapes -> {tmp_path / 'out'}):") + 1 :]
    assert [line.split(";")[1].split("(")[0].strip() for line in summary] == [
        "already packed and verified, skipped"
    ] * 2
    assert summary[0].startswith("  train: 3 samples") and summary[1].startswith("  val: 2 samples")
    # a shard changed on disk is noticed and packed again
    shard = next((tmp_path / "out/val").glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    assert pack_mod.main(args) == 0
    assert "val: 2 samples in 1 shards; packed 1 shard(s) in-process" in capsys.readouterr().out


def test_pack_layout_errors_come_before_ray(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(pack_mod, "SMALL_JOB", 1)  # any job would want Ray
    monkeypatch.setattr(pack_mod, "ray_session", lambda *a: started.append(a))
    src = synth.generate("cityscapes", tmp_path / "src", train=2, val=1, size=(64, 32))
    for p in (src / "gtFine/val").rglob("*"):  # val labels gone: the layout is broken
        if p.is_file():
            p.unlink()
    (src / "gtFine/val/frankfurt").rmdir()
    (src / "gtFine/val").rmdir()
    args = ["cityscapes", "--src", str(src), "--out", str(tmp_path / "o"), "--workers", "4"]
    assert pack_mod.main(args) == 1
    assert f"error: cityscapes val: {src}/gtFine/val: folder missing" in capsys.readouterr().err
    assert started == [] and not (tmp_path / "o/train/manifest.json").exists()
    assert pack_mod.wants_ray(pack_mod.SMALL_JOB, 4, None)
    assert not pack_mod.wants_ray(10**6, 1, None) and pack_mod.wants_ray(5, 1, "ray://x")


@pytest.mark.slow
def test_ade20k_trains_a_few_iterations(ade20k, tmp_path):
    """The paper-style preset with a tiny model on the generated set, as a user would run it."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    _, shards = ade20k
    tiny = ["model.pretrained=none", "model.depth=18", "model.channels=16",
            "model.aspp_channels=16", "model.checkpoint=false", f"data.root={shards}",
            "data.crop_size=64", "data.batch_size=2", "data.global_batch_size=null",
            "data.num_workers=0", "eval.crop=64", "eval.every=0", "eval.num_pictures=0",
            "schedule.iterations=3", "checkpoint.every=0", "loss.ohem_min_kept=1000",
            "runtime.progress=false", "logging.enabled=false"]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, str(repo / "launch/train.py"), "--config", "ade20k", *tiny,
           "--run-dir", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "val mIoU: " in proc.stdout and "(iteration 3)" in proc.stdout
    assert (tmp_path / "run/model.pt").is_file()
