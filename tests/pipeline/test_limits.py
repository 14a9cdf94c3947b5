"""Hostile shards and source trees: bounded memory, no hang, every refusal named.

A shard declaring a huge image, an oversized member, a path-traversal member; a FIFO named like
an image; a JPEG libjpeg calls corrupt. Each is refused (or skipped) naming the file and key.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from pipeline import shards, synth, verify
from pipeline.datasets import DATASETS
from pipeline.pack import pack_split, sha256_file
from pipeline.reader import EvalStream, ShardError, TrainStream
from pipeline.shards import Limits

from .packdata import write_cityscapes

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """A sound val split of 3 samples (64x32 PNGs) in one shard."""
    base = tmp_path_factory.mktemp("limits")
    src = synth.generate("cityscapes", base / "src", train=1, val=3, size=(64, 32))
    pack_split(DATASETS["cityscapes"], src, base / "shards", "val", progress=False)
    return base / "shards" / "val"


def _copy(split: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in split.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _rewrite(split: Path, change) -> tuple[Path, str]:
    """Rewrite the split's shard member by member through change(name, data) -> [(name, data)],
    and update the manifest's size and hash so only the content is wrong; (shard, first key)."""
    m = json.loads((split / "manifest.json").read_text())
    shard = split / m["shards"][0]["name"]
    buf = io.BytesIO()
    with (
        tarfile.open(shard) as src,
        tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as dst,
    ):
        for member in src:
            for name, data in change(member.name, src.extractfile(member).read()):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    m["shards"][0].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    (split / "manifest.json").write_text(json.dumps(m))
    return shard, m["shards"][0]["keys"][0]


def _huge_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height grey pixels; only one row of data follows."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_image_size_from_headers():
    assert shards.image_size(_huge_png(30000, 20000)) == (30000, 20000)
    jpg = synth._encode(".jpg", np.zeros((17, 40, 3), np.uint8))
    assert shards.image_size(jpg) == (40, 17)
    assert shards.image_size(b"hello") is None


def test_huge_declared_image_is_refused_before_decoding(packed, tmp_path, caplog):
    split = _copy(packed, tmp_path / "s")
    huge = _huge_png(30000, 30000)  # 900 M pixels: 2.7 GB decoded as RGB

    def swap(name, data):
        return [(name, huge if name.endswith(".png") and ".label" not in name else data)]

    shard, key = _rewrite(split, swap)
    with pytest.raises(ShardError, match=rf"{shard.name}: sample {key}: image .png is "
                       r"30000x30000 = 900000000 pixels, over the limit .* \(max_pixels\)"):  # fmt: skip
        list(EvalStream(split))
    stream = EvalStream(split, on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="pipeline.reader"):
        assert list(stream) == []
    assert stream.skipped == 3
    logged = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(logged) == 3 and all("max_pixels" in line for line in logged)  # one per sample
    # verify, with and without --decode, reads the same headers
    for decode in (False, True):
        problems = verify.verify_split(split, decode=decode).problems
        assert len(problems) == 3 and all("30000x30000" in p for p in problems)


def test_member_bytes_limit_names_shard_and_key(packed):
    limits = Limits(max_member_bytes=100)  # every image PNG of 64x32 noise is larger
    with pytest.raises(ShardError, match=r"val-000000\.tar: sample \w+: member '[\w.]+' is \d+ "
                       r"bytes, over the limit of 100 \(max_member_bytes\)"):  # fmt: skip
        list(EvalStream(packed, limits=limits))
    stream = EvalStream(packed, limits=limits, on_corrupt="skip")
    assert list(stream) == [] and stream.skipped == 3
    assert any("max_member_bytes" in p for p in verify.verify_split(packed, limits=limits).problems)
    # a pixel limit below the images' 64 x 32 refuses them in training too
    train = TrainStream(packed, batch_size=1, crop_size=16, num_workers=0,
                        limits=Limits(max_pixels=1000))  # fmt: skip
    with pytest.raises(ShardError, match=r"64x32 = 2048 pixels, over the limit of 1000"):
        next(iter(train))


def test_verify_reports_path_traversal(packed, tmp_path, capsys):
    split = _copy(packed, tmp_path / "t")

    def add_evil(name, data):
        return [(name, data)] + ([("./../evil.txt", b"x")] if name.endswith(".json") else [])

    shard, _ = _rewrite(split, add_evil)
    problems = verify.verify_split(split).problems
    assert problems == [
        f"{shard}: member './../evil.txt' is path traversal (absolute path or '..')"
    ]
    assert verify.main([str(split)]) == 1
    assert "path traversal" in capsys.readouterr().err
    with pytest.raises(ShardError, match="path traversal"):
        list(EvalStream(split))


def test_fifo_named_like_an_image_is_refused_without_hanging(tmp_path):
    src = tmp_path / "src"
    write_cityscapes(src, "train", n=3)
    image = src / "leftImg8bit/train/bochum/bochum_000001_000019_leftImg8bit.png"
    image.unlink()
    os.mkfifo(image)  # reading it would block forever: no writer ever comes
    cmd = [sys.executable, "-m", "pipeline.pack", "cityscapes", "--src", str(src), "--out",
           str(tmp_path / "out"), "--splits", "train", "--workers", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 1
    assert f"{image}: image path is a FIFO (named pipe), not a regular file" in proc.stderr
    proc = subprocess.run([*cmd, "--skip-bad"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "out/train/manifest.json").read_text())
    assert m["num_samples"] == 2 and [s["file"] for s in m["skipped"]] == [str(image)]


def test_corrupt_jpeg_is_attributed_to_its_file(tmp_path, capfd):
    src = synth.generate("ade20k", tmp_path / "src", train=3, val=1)
    image = sorted((src / "ADEChallengeData2016/images/training").glob("*.jpg"))[1]
    data = image.read_bytes()
    eoi = data.rfind(b"\xff\xd9")
    image.write_bytes(data[:eoi] + bytes(40) + data[eoi:])  # libjpeg: "extraneous bytes"
    with pytest.raises(Exception, match=rf"{image}: corrupt JPEG: libjpeg says 'Corrupt JPEG data"):
        pack_split(DATASETS["ade20k"], src, tmp_path / "out", "training", progress=False)
    m = pack_split(DATASETS["ade20k"], src, tmp_path / "skip", "training", progress=False,
                   skip_bad=True)  # fmt: skip
    assert m["num_samples"] == 2 and [s["file"] for s in m["skipped"]] == [str(image)]
    assert "Corrupt JPEG" not in capfd.readouterr().err  # reported by us, naming the file


def test_huge_source_image_is_refused_by_its_header(tmp_path):
    src = tmp_path / "src"
    write_cityscapes(src, "train", n=2)
    image = src / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    image.write_bytes(_huge_png(30000, 30000))
    m = pack_split(DATASETS["cityscapes"], src, tmp_path / "out", "train", progress=False,
                   skip_bad=True)  # fmt: skip
    assert m["skipped"] == [{"file": str(image), "reason": "image is 30000x30000 = 900000000 "
                             f"pixels, over the limit of {shards.DEFAULT_MAX_PIXELS} (max_pixels)"}]  # fmt: skip
