"""Data pipeline benchmark: packing throughput and packing integrity at Cityscapes resolution.

    python benchmarks/data_pipeline.py [--images 32] [--workers 1 2] [--repeats 2] [--max-count 4]
        [--only packing packing_integrity loader] [--json PATH]

Source: a synthetic Cityscapes tree at 2048x1024 (pipeline.synth), packed with pipeline.pack.
Measurements (one function each; add more to MEASUREMENTS):
- packing: images/s of pipeline.pack for each worker count, every run through the same Ray
  code path (one task per shard, --max-count 4 by default so that there are enough shards
  to share).
  Ray start-up and one untimed warm-up pack (worker processes, imports) are excluded and the
  start-up is reported separately; each timed run writes a fresh output folder (no resume).
  Speed-up = images/s with N workers / images/s with 1. Goal: 2 workers >= 1.7x one.
  The in-process path (--workers 1 without Ray) is timed as well.
- integrity: packs in-process with OpenCV's imdecode/imencode counted: each image must be
  decoded exactly once (the validation decode), only single-channel labels may be encoded,
  and every packed image must equal its source file byte for byte.
- loader: decoded + augmented samples/s per worker of the shard reader
  (pipeline.reader.TrainStream over the packed shards) against a plain file loader (a torch
  DataLoader whose workers cv2.imread the original PNG image and labelIds PNG, map the ids to
  train ids and apply the same pipeline.transforms.TrainAugment: scale 0.5-2.0, crop 769,
  flip), for each worker count. Per run the first batch (worker start-up, shuffle-buffer
  fill) is not timed; runs of the two loaders alternate and the median is kept. Goal: the shard loader at least matches
  the file loader per core.
The machine's load average is recorded with the figures: on a shared machine they move.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from cdgcnet.labels import CITYSCAPES
from pipeline import pack as pack_mod
from pipeline import synth
from pipeline.datasets import DATASETS
from pipeline.reader import TrainStream
from pipeline.sources import base as sources_base
from pipeline.transforms import TrainAugment

SIZE = (2048, 1024)  # (width, height) of Cityscapes frames
MAX_COUNT = 4  # samples per shard: enough shards to share, few enough that per-task cost is small


def prepare_source(workdir: Path, n_images: int) -> Path:
    """A Cityscapes-layout tree of n_images 2048x1024 frames (train split only)."""
    src = workdir / "cityscapes"
    if not src.exists():
        synth.generate(
            "cityscapes", src, train=n_images, val=0, size=SIZE, workers=os.cpu_count() or 1
        )
    return src


def _pack(src: Path, out: Path, workers: int, use_ray: bool, max_count: int = MAX_COUNT) -> float:
    """Seconds for one complete pack of the train split into a fresh folder."""
    t0 = time.perf_counter()
    m = pack_mod.pack_split(
        DATASETS["cityscapes"], src, out, "train", max_count=max_count, workers=workers,
        use_ray=use_ray, progress=False,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    assert m["num_samples"] > 0 and not m["skipped"]
    return dt


def measure_packing(
    src: Path, workdir: Path, worker_counts: list[int], repeats: int, max_count: int = MAX_COUNT
) -> dict:
    """Packing images/s per worker count (Ray path), plus the in-process path."""
    import ray

    n = len(DATASETS["cityscapes"].source.list_split(src, "train"))
    runs = 0

    def fresh() -> Path:
        nonlocal runs
        runs += 1
        return workdir / f"pack-{runs}"

    out: dict = {"images": n, "max_count": max_count, "by_workers": {}}
    cpu0 = time.process_time()
    t = [_pack(src, fresh(), 1, use_ray=False, max_count=max_count) for _ in range(repeats)]
    cpu = (time.process_time() - cpu0) / repeats
    # CPU seconds per image in this process: wall time above this means waiting for a core
    # (or the disk); the work is CPU-bound when the two agree.
    out["in_process"] = {
        "seconds": t,
        "images_per_s": n / statistics.median(t),
        "cpu_s_per_image": cpu / n,
    }
    for w in worker_counts:
        t0 = time.perf_counter()
        with pack_mod.ray_session(w, None):
            startup = time.perf_counter() - t0
            _pack(
                src, fresh(), w, use_ray=True, max_count=max_count
            )  # warm-up: worker processes and their imports
            t = [_pack(src, fresh(), w, use_ray=True, max_count=max_count) for _ in range(repeats)]
        assert not ray.is_initialized()
        out["by_workers"][str(w)] = {
            "seconds": t,
            "images_per_s": n / statistics.median(t),
            "ray_startup_s": startup,
        }
    base = out["by_workers"].get("1")
    if base:
        for rec in out["by_workers"].values():
            rec["speedup_vs_1"] = rec["images_per_s"] / base["images_per_s"]
    return out


def measure_integrity(src: Path, workdir: Path) -> dict:
    """Decode/encode counts during an in-process pack, and byte equality of packed images."""
    calls = {"image_decodes": 0, "label_decodes": 0, "encodes": 0, "multichannel_encodes": 0}
    real_decode, real_encode = cv2.imdecode, cv2.imencode

    def counting_decode(buf, flags):
        calls["image_decodes" if flags == cv2.IMREAD_COLOR else "label_decodes"] += 1
        return real_decode(buf, flags)

    def counting_encode(ext, img, *a):
        calls["encodes"] += 1
        calls["multichannel_encodes"] += int(img.ndim != 2)
        return real_encode(ext, img, *a)

    sources_base.cv2.imdecode, pack_mod.cv2.imencode = counting_decode, counting_encode
    try:
        out = workdir / "integrity"
        m = pack_mod.pack_split(
            DATASETS["cityscapes"], src, out, "train", workers=1, progress=False
        )
    finally:
        sources_base.cv2.imdecode, pack_mod.cv2.imencode = real_decode, real_encode
    identical = _images_identical(src, out / "train", m)
    n = m["num_samples"]
    return {
        "images": n,
        **calls,
        "decodes_per_image": calls["image_decodes"] / n,
        "images_identical": identical,
        "ok": calls["image_decodes"] == n and calls["multichannel_encodes"] == 0 and identical == n,
    }


def _images_identical(src: Path, split_dir: Path, manifest: dict) -> int:
    import tarfile

    same = 0
    for s in manifest["shards"]:
        with tarfile.open(split_dir / s["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for key in s["keys"]:
            meta = json.loads(members[f"{key}.json"])
            same += members[f"{key}.png"] == (src / meta["image_path"]).read_bytes()
    return same


LOADER_CROP = 769  # the Cityscapes preset's crop


class FileLoaderDataset(Dataset):
    """The plain loader: original files through cv2.imread, then the reader's augmentation."""

    def __init__(self, src: Path, split: str = "train", seed: int = 0) -> None:
        self.samples = DATASETS["cityscapes"].source.list_split(src, split)
        self.augment = TrainAugment(LOADER_CROP)
        self.lut = CITYSCAPES.lut()
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[i]
        image = cv2.imread(str(s.image_path), cv2.IMREAD_COLOR_RGB)
        label = self.lut[cv2.imread(str(s.label_path), cv2.IMREAD_UNCHANGED)]
        image, label = self.augment(image, label, np.random.default_rng([self.seed, i]))
        return torch.from_numpy(image), torch.from_numpy(label.astype(np.int64))


def _samples_per_s(batches, n_batches: int, batch_size: int) -> float:
    """Samples/s over batches 2..n of one run (the first pays for start-up)."""
    it = iter(batches)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches - 1):
        next(it)
    return (n_batches - 1) * batch_size / (time.perf_counter() - t0)


def _shard_loader_rate(split_dir: Path, workers: int, batch: int, n_batches: int) -> float:
    stream = TrainStream(
        split_dir, batch_size=batch, crop_size=LOADER_CROP, batches_per_epoch=n_batches,
        num_workers=workers, shuffle_buffer=8,
    )  # fmt: skip
    return _samples_per_s(stream, n_batches, batch)


def _file_loader_rate(src: Path, workers: int, batch: int, n_batches: int) -> float:
    ds = FileLoaderDataset(src)
    sampler = RandomSampler(
        ds, replacement=True, num_samples=n_batches * batch,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers)
    return _samples_per_s(loader, n_batches, batch)


def measure_loader(
    src: Path, workdir: Path, worker_counts: list[int], repeats: int, batch: int, n_batches: int
) -> dict:
    """Samples/s (total and per worker) of the shard reader and of the plain file loader."""
    m = pack_mod.pack_split(
        DATASETS["cityscapes"], src, workdir / "shards", "train", max_count=8, progress=False
    )
    split_dir = workdir / "shards" / "train"
    pngs = [p.stat().st_size for p in (src / "leftImg8bit" / "train").glob("*/*.png")]
    out: dict = {"images": m["num_samples"], "crop": LOADER_CROP, "batch_size": batch,
                 "timed_samples_per_run": (n_batches - 1) * batch, "repeats": repeats,
                 "mean_png_mb": statistics.mean(pngs) / 1e6, "by_workers": {}}  # fmt: skip
    loaders = {"shards": (_shard_loader_rate, split_dir), "files": (_file_loader_rate, src)}
    for w in worker_counts:
        runs: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(repeats):  # interleaved, so a change in machine load hits both alike
            for name, (rate, where) in loaders.items():
                runs[name].append(rate(where, w, batch, n_batches))
        rec: dict = {
            name: {"runs": r, "samples_per_s": statistics.median(r),
                   "samples_per_s_per_worker": statistics.median(r) / w}
            for name, r in runs.items()
        }  # fmt: skip
        rec["shards_over_files"] = rec["shards"]["samples_per_s"] / rec["files"]["samples_per_s"]
        out["by_workers"][str(w)] = rec
    return out


MEASUREMENTS: dict[str, Callable[[argparse.Namespace, Path, Path], dict]] = {
    "packing": lambda a, src, wd: measure_packing(src, wd, a.workers, a.repeats, a.max_count),
    "packing_integrity": lambda a, src, wd: measure_integrity(src, wd),
    "loader": lambda a, src, wd: measure_loader(
        src, wd, a.workers, a.repeats, a.loader_batch_size, a.loader_batches
    ),
}


def print_table(results: dict) -> None:
    p = results.get("packing")
    if p:
        print(f"\npacking, {p['images']} images at {SIZE[0]}x{SIZE[1]}, {p['max_count']} per shard")
        print("| path | workers | images/s | speed-up vs 1 | Ray start-up s |")
        print("|---|---|---|---|---|")
        ip = p["in_process"]
        print(f"| in-process | 1 | {ip['images_per_s']:.2f} | - | - |")
        for w, r in p["by_workers"].items():
            print(f"| Ray | {w} | {r['images_per_s']:.2f} | {r.get('speedup_vs_1', float('nan')):.2f}x"
                  f" | {r['ray_startup_s']:.1f} |")  # fmt: skip
        print(f"in-process CPU time: {ip['cpu_s_per_image'] * 1000:.0f} ms per image "
              f"(wall: {1000 / ip['images_per_s']:.0f} ms)")  # fmt: skip
    ld = results.get("loader")
    if ld:
        print(f"\nloader, {ld['images']} images at {SIZE[0]}x{SIZE[1]} (PNG {ld['mean_png_mb']:.1f} MB), "
              f"crop {ld['crop']}, {ld['timed_samples_per_run']} timed samples per run, "
              f"median of {ld['repeats']}")  # fmt: skip
        print(
            "| workers | shards samples/s | per worker | files samples/s | per worker | shards/files |"
        )
        print("|---|---|---|---|---|---|")
        for w, r in ld["by_workers"].items():
            sh, fi = r["shards"], r["files"]
            print(f"| {w} | {sh['samples_per_s']:.2f} | {sh['samples_per_s_per_worker']:.2f} "
                  f"| {fi['samples_per_s']:.2f} | {fi['samples_per_s_per_worker']:.2f} "
                  f"| {r['shards_over_files']:.2f} |")  # fmt: skip
    i = results.get("packing_integrity")
    if i:
        print(f"\nintegrity: {i['image_decodes']} image decodes for {i['images']} images, "
              f"{i['multichannel_encodes']} image re-encodes, {i['images_identical']}/{i['images']} "
              f"images byte-identical: {'ok' if i['ok'] else 'FAILED'}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32, help="2048x1024 frames to pack")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--max-count", type=int, default=MAX_COUNT, help="samples per shard when packing"
    )
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (median)")
    p.add_argument("--only", nargs="+", choices=sorted(MEASUREMENTS), help="run only these")
    p.add_argument("--loader-batch-size", type=int, default=2, help="loader: batch size")
    p.add_argument("--loader-batches", type=int, default=21, help="loader: batches per run")
    p.add_argument("--workdir", help="keep data here (default: a temporary folder)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    cv2.setNumThreads(1)  # one core per worker, as in the Ray tasks
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        workdir = Path(a.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        src = prepare_source(workdir, a.images)
        results: dict = {
            "command": " ".join(["python", "benchmarks/data_pipeline.py", *(argv or sys.argv[1:])]),
            "cpu_count": os.cpu_count(),
            "load_average_before": list(os.getloadavg()),
        }
        for name in a.only or MEASUREMENTS:
            bench_dir = workdir / f"run-{name}-{os.getpid()}"
            results[name] = MEASUREMENTS[name](a, src, bench_dir)
        results["load_average_after"] = list(os.getloadavg())
    print_table(results)
    print(
        f"\nload average before {results['load_average_before']}, after {results['load_average_after']}"
    )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
