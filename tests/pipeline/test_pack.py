"""Packing jobs: generator -> pack -> verify round trips, byte-identical repacks, resume after a
kill, Ray workers, shard planning, and a named error (or a recorded skip) for each bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from pipeline import pack as pack_mod
from pipeline import synth, verify
from pipeline.datasets import DATASETS
from pipeline.pack import PackError, pack_split, plan_shards, ray_session
from pipeline.sources import base as sources_base

from .packdata import (
    read_split,
    write_cityscapes,
    write_cocostuff10k,
    write_cocostuff164k,
    write_png,
    write_voc,
)

REPO = Path(__file__).resolve().parents[2]
SPLITS = {
    "cityscapes": ("train", "val"),
    "voc": ("train_aug", "val"),
    "cocostuff10k": ("train", "test"),
    "cocostuff164k": ("train", "val"),
    "scenes": ("train", "val"),
}


def run_pack(*args: str) -> int:
    return pack_mod.main([*map(str, args), "--no-progress"])


def files_of(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("dataset", sorted(SPLITS))
def test_generator_pack_verify_round_trip(tmp_path, dataset, capsys):
    src = synth.generate(dataset, tmp_path / "src", train=4, val=2, size=(64, 48))
    info = json.loads((src / synth.INFO_FILE).read_text())
    packer = "cityscapes" if dataset == "scenes" else dataset
    out = tmp_path / "shards" / dataset
    assert run_pack(packer, "--src", src, "--out", out, "--workers", "1", "--max-count", "3",
                    "--name", dataset.replace("cocostuff", "coco")) == 0  # fmt: skip
    assert verify.main([str(out), "--decode"]) == 0
    for split in SPLITS[dataset]:
        m = json.loads((out / split / "manifest.json").read_text())
        assert m["num_samples"] == info["num_samples"][split] > 0
        assert m["skipped"] == []
        assert len(m["shards"]) == -(-m["num_samples"] // 3)
        keys = [k for s in m["shards"] for k in s["keys"]]
        assert keys == sorted(keys) and list(read_split(out / split)) == keys
        total = sum(m["class_histogram"]) + m["ignore_pixels"]
        assert total == sum(
            json.loads(f["json"])["height"] * json.loads(f["json"])["width"]
            for f in read_split(out / split).values()
        )
    assert "samples in" in capsys.readouterr().out


def test_repack_is_byte_identical(tmp_path):
    write_cityscapes(tmp_path / "src", "train", n=5)
    write_cityscapes(tmp_path / "src", "val", n=2, seed=1)
    for out in ("a", "b"):
        assert run_pack("cityscapes", "--src", tmp_path / "src", "--out", tmp_path / out,
                        "--workers", "1", "--max-count", "2") == 0  # fmt: skip
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert [k for k in a if k.endswith(".tar")] == [
        "train/cityscapes-train-000000.tar", "train/cityscapes-train-000001.tar",
        "train/cityscapes-train-000002.tar", "val/cityscapes-val-000000.tar",
    ]  # fmt: skip
    assert a == b  # shards, manifests and resume records alike


def test_each_image_decoded_once_and_never_reencoded(tmp_path, monkeypatch):
    write_cityscapes(tmp_path / "src", "train", n=4)
    calls = {"decode_color": 0, "decode_other": 0, "encode": 0}
    real_decode, real_encode = cv2.imdecode, cv2.imencode

    def counting_decode(buf, flags):
        calls["decode_color" if flags == cv2.IMREAD_COLOR else "decode_other"] += 1
        return real_decode(buf, flags)

    def counting_encode(ext, img, *a):
        calls["encode"] += 1
        assert img.ndim == 2  # only the single-channel label is ever encoded
        return real_encode(ext, img, *a)

    monkeypatch.setattr(sources_base.cv2, "imdecode", counting_decode)
    monkeypatch.setattr(pack_mod.cv2, "imencode", counting_encode)
    pack_split(DATASETS["cityscapes"], tmp_path / "src", tmp_path / "out", "train", progress=False)
    assert calls == {"decode_color": 4, "decode_other": 4, "encode": 4}


def test_plan_by_count_and_by_size(tmp_path):
    write_cityscapes(tmp_path / "src", "train", n=7)
    samples = DATASETS["cityscapes"].source.list_split(tmp_path / "src", "train")
    assert [len(g) for g in plan_shards(samples, 3, None)] == [3, 3, 1]
    one = sum(p.stat().st_size for p in (samples[0].image_path, samples[0].label_path)) + 3072
    groups = plan_shards(samples, None, int(2.5 * one))
    assert [len(g) for g in groups] == [2, 2, 2, 1]
    assert [s for g in groups for s in g] == samples  # order kept, nothing dropped
    assert [len(g) for g in plan_shards(samples, None, 1)] == [1] * 7  # oversize: one each
    with pytest.raises(ValueError, match="max_count"):
        plan_shards(samples, 0, None)


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import pipeline.pack as P
    real = P.encode_sample
    seen = []
    def dying(task, *a, **k):
        seen.append(task.index)
        if task.index == 1 and seen.count(1) == 2:  # mid-way through the second shard
            os.kill(os.getpid(), signal.SIGKILL)
        return real(task, *a, **k)
    P.encode_sample = dying
    sys.exit(P.main(sys.argv[1:]))
    """
)


def test_resume_after_kill_leaves_no_partial_shard_and_completes(tmp_path):
    write_cityscapes(tmp_path / "src", "train", n=6)
    out = tmp_path / "out"
    args = ["cityscapes", "--src", str(tmp_path / "src"), "--out", str(out), "--splits", "train",
            "--workers", "1", "--max-count", "2", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    split = out / "train"
    assert sorted(p.name for p in split.glob("*.tar")) == ["cityscapes-train-000000.tar"]
    assert not (split / "manifest.json").exists()
    assert verify.main([str(split)]) == 2  # no manifest: nothing to trust yet
    first = split / "cityscapes-train-000000.tar"
    mtime = first.stat().st_mtime_ns

    assert run_pack(*args) == 0
    assert first.stat().st_mtime_ns == mtime  # complete, verified shard kept
    assert [p.name for p in split.iterdir() if ".tmp-" in p.name] == []
    assert verify.main([str(split), "--decode"]) == 0
    assert run_pack(*[a if a != str(out) else str(tmp_path / "clean") for a in args]) == 0
    assert files_of(split) == files_of(tmp_path / "clean/train")


def test_resume_repacks_a_corrupted_or_changed_shard(tmp_path):
    write_cityscapes(tmp_path / "src", "train", n=4)
    args = ("cityscapes", "--src", tmp_path / "src", "--out", tmp_path / "out", "--workers", "1",
            "--splits", "train", "--max-count", "2")  # fmt: skip
    assert run_pack(*args) == 0
    split = tmp_path / "out/train"
    good = files_of(split)
    shard = split / "cityscapes-train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert run_pack(*args) == 0
    assert files_of(split) == good  # the bad shard failed its sha256 check and was repacked
    # a smaller max-count re-plans: old shards beyond the plan are removed
    assert run_pack(*args[:-1], "4") == 0
    assert sorted(p.name for p in split.glob("*.tar")) == ["cityscapes-train-000000.tar"]
    assert verify.main([str(split)]) == 0


@pytest.mark.slow
def test_ray_workers_give_the_same_shards_and_stop_on_bad_input(tmp_path):
    write_cityscapes(tmp_path / "src", "train", n=6)
    common = dict(max_count=2, progress=False)
    pack_split(
        DATASETS["cityscapes"], tmp_path / "src", tmp_path / "one", "train", workers=1, **common
    )
    with ray_session(2, None):
        pack_split(
            DATASETS["cityscapes"], tmp_path / "src", tmp_path / "two", "train", workers=2, **common
        )
        assert files_of(tmp_path / "one") == files_of(tmp_path / "two")
        bad = tmp_path / "src/gtFine/train/aachen/aachen_000002_000019_gtFine_labelIds.png"
        bad.unlink()
        with pytest.raises(
            PackError, match=r"aachen_000002_000019_gtFine_labelIds\.png: label file is missing"
        ):
            pack_split(
                DATASETS["cityscapes"],
                tmp_path / "src",
                tmp_path / "bad",
                "train",
                workers=2,
                **common,
            )
        m = pack_split(DATASETS["cityscapes"], tmp_path / "src", tmp_path / "skip", "train", workers=2,
                       skip_bad=True, **common)  # fmt: skip
    shards = sorted(p.name for p in (tmp_path / "bad/train").glob("*.tar"))
    assert "cityscapes-train-000000.tar" not in shards  # the shard of the bad sample
    assert not (tmp_path / "bad/train/manifest.json").exists()
    assert m["num_samples"] == 5 and m["skipped"] == [
        {"file": str(bad), "reason": "label file is missing"}
    ]


# ---------------------------------------------------------------------------------------------
# Bad input: each case names the file and the reason; --skip-bad records it.

STEM = "bochum_000001_000019"  # the last sample in sorted order of write_cityscapes(n=3)


def _cs_image(root: Path) -> Path:
    return root / "leftImg8bit/train/bochum" / f"{STEM}_leftImg8bit.png"


def _cs_label(root: Path) -> Path:
    return root / "gtFine/train/bochum" / f"{STEM}_gtFine_labelIds.png"


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _corrupt_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(60, len(data) - 20, 7):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


CS_CASES = {
    "missing_label": (lambda r: _cs_label(r).unlink(), _cs_label, "label file is missing"),
    "size_mismatch": (lambda r: write_png(_cs_label(r), np.zeros((8, 24), np.uint8)), _cs_label,
                      "label is 24x8 but image"),
    "rgb_label": (lambda r: write_png(_cs_label(r), np.full((16, 24, 3), 7, np.uint8)), _cs_label,
                  "label has 3 channels"),
    "value_outside_table": (lambda r: write_png(_cs_label(r), np.full((16, 24), 40, np.uint8)),
                            _cs_label, "label values [40] are outside the cityscapes label table"),
    "truncated_png_image": (lambda r: _truncate(_cs_image(r)), _cs_image, "truncated PNG"),
    "corrupt_png_image": (lambda r: _corrupt_middle(_cs_image(r)), _cs_image, "corrupt PNG"),
    "not_an_image": (lambda r: _cs_image(r).write_bytes(b"hello"), _cs_image, "not a PNG or JPEG"),
    "truncated_label": (lambda r: _truncate(_cs_label(r)), _cs_label, "truncated PNG"),
    "missing_image_dir_file": (lambda r: _cs_image(r).write_bytes(b""), _cs_image, "image file is empty"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CS_CASES))
def test_bad_cityscapes_input_is_named_and_skippable(tmp_path, capsys, case):
    mutate, bad_file, reason = CS_CASES[case]
    src = tmp_path / "src"
    write_cityscapes(src, "train", n=3)
    mutate(src)
    args = ("cityscapes", "--src", src, "--splits", "train", "--workers", "1", "--max-count", "1")
    assert run_pack(*args, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{bad_file(src)}: {reason}" in err
    assert "Traceback" not in err
    split = tmp_path / "out/train"
    assert not (split / "cityscapes-train-000002.tar").exists()  # no shard for the bad sample
    assert not (split / "manifest.json").exists()
    assert [p.name for p in split.iterdir() if ".tmp-" in p.name] == []

    assert run_pack(*args, "--out", tmp_path / "skip", "--skip-bad") == 0
    captured = capsys.readouterr()
    assert "skipped 1 bad file" in captured.err and reason in captured.err
    m = json.loads((tmp_path / "skip/train/manifest.json").read_text())
    assert m["num_samples"] == 2 and len(m["shards"]) == 2  # the bad sample's shard is empty
    assert len(m["skipped"]) == 1
    assert m["skipped"][0]["file"] == str(bad_file(src))
    assert reason in m["skipped"][0]["reason"]
    assert verify.main([str(tmp_path / "skip")]) == 0


def _voc_rgb_label(root: Path) -> Path:
    p = root / "VOC2012/SegmentationClass/2007_000002.png"
    write_png(p, np.full((12, 20, 3), 1, np.uint8))
    return p


def _voc_truncated_jpeg(root: Path) -> Path:
    p = root / "VOC2012/JPEGImages/2007_000002.jpg"
    _truncate(p, 0.9)
    return p


def _sbd_without_gtcls(root: Path) -> Path:
    p = root / "SBD/dataset/cls/2008_000010.mat"
    scipy.io.savemat(str(p), {"other": np.zeros((2, 2))})
    return p


def _coco10k_bad_value(root: Path) -> Path:
    p = root / "annotations/COCO_train2014_000000000077.mat"
    scipy.io.savemat(str(p), {"S": np.full((10, 14), 200, np.uint16)})
    return p


def _coco164k_bad_value(root: Path) -> Path:
    p = root / "stuffthingmaps/train2017/000000000139.png"
    write_png(p, np.full((10, 14), 190, np.uint8))
    return p


@pytest.mark.parametrize(
    ("dataset", "split", "write", "mutate", "reason"),
    [
        ("voc", "train_aug", write_voc, _voc_rgb_label, "label is a RGB image"),
        ("voc", "train_aug", write_voc, _voc_truncated_jpeg, "truncated JPEG"),
        ("voc", "train_aug", write_voc, _sbd_without_gtcls, "has no variable 'GTcls'"),
        ("cocostuff10k", "train", write_cocostuff10k, _coco10k_bad_value, "S values 200..200 outside"),
        ("cocostuff164k", "train", write_cocostuff164k, _coco164k_bad_value,
         "label values [190] are outside the cocostuff164k label table"),
    ],
)  # fmt: skip
def test_bad_input_in_other_datasets(tmp_path, capsys, dataset, split, write, mutate, reason):
    src = tmp_path / "src"
    write(src)
    bad = mutate(src)
    args = (dataset, "--src", src, "--splits", split, "--workers", "1")
    assert run_pack(*args, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{bad}: " in err and reason in err
    assert not list((tmp_path / "out").rglob("*.tar"))
    assert run_pack(*args, "--out", tmp_path / "skip", "--skip-bad") == 0
    m = json.loads((tmp_path / "skip" / split / "manifest.json").read_text())
    assert [s["file"] for s in m["skipped"]] == [str(bad)]


def test_cli_errors_exit_nonzero_without_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.pack", "cityscapes", "--src", str(empty), "--out",
           str(tmp_path / "out"), "--workers", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{empty}/leftImg8bit/train: folder missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    # checked before any Ray start-up
    assert run_pack("cityscapes", "--src", tmp_path / "nowhere", "--out", tmp_path / "o") == 1
    assert run_pack("cityscapes", "--src", empty, "--out", tmp_path / "o", "--splits", "bogus") == 2


def test_max_size_option_groups_by_bytes(tmp_path):
    write_cityscapes(tmp_path / "src", "train", n=6)
    samples = DATASETS["cityscapes"].source.list_split(tmp_path / "src", "train")
    sizes = [s.image_path.stat().st_size + s.label_path.stat().st_size + 3072 for s in samples]
    assert run_pack("cityscapes", "--src", tmp_path / "src", "--out", tmp_path / "out", "--splits",
                    "train", "--workers", "1", "--max-size", str(sum(sizes[:3]))) == 0  # fmt: skip
    m = json.loads((tmp_path / "out/train/manifest.json").read_text())
    assert [s["num_samples"] for s in m["shards"]] == [3, 3]
    with pytest.raises(SystemExit) as e:  # the two limits exclude each other
        run_pack("cityscapes", "--src", tmp_path / "src", "--out", tmp_path / "o2",
                 "--max-size", "1", "--max-count", "2")  # fmt: skip
    assert e.value.code == 2
