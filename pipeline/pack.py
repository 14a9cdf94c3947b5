"""Pack a dataset from its original layout into WebDataset tar shards, one task per shard.

    python -m pipeline.pack DATASET --src DIR --out shards/DATASET
        [--splits S ...] [--max-count N | --max-size BYTES] [--workers K] [--ray-address ADDR]
        [--skip-bad] [--name NAME] [--max-pixels N] [--max-member-bytes N] [--no-progress]

DATASET is a name of pipeline.datasets.DATASETS (its layout, labels and default splits). Writes
``OUT/<split>/<name>-<split>-NNNNNN.tar`` and ``OUT/<split>/manifest.json`` (schema in
pipeline/manifest.py; sample format in pipeline/shards.py). ``--name`` sets the manifest's dataset
field and the shard prefix (default: DATASET); training refuses shards whose manifest names
another dataset than its config.

Every split is listed and planned first, so a layout error stops the job before any work. Small
jobs (under SMALL_JOB samples to pack, or --workers 1) run in this process; larger ones run one
Ray task per shard on a private local Ray (or --ray-address). A rerun whose shards all re-hash to
their records says "already packed and verified, skipped". The job ends with a summary of all
splits.

Guarantees:
- image bytes are copied as in the source (never re-encoded); each image is decoded once to
  validate it and check its size against the label; labels become single-channel PNGs of train ids;
- deterministic: sorted sample order, fixed tar member fields, so packing twice gives
  byte-identical shards;
- atomic: a shard is written as ``.NAME.tmp-PID`` and renamed when complete; the manifest is
  written last, atomically; a crash leaves no partial shard;
- resumable: after each shard a record goes to ``OUT/<split>/.pack/NAME.json``; a rerun keeps a
  shard whose record matches the planned samples (and their file sizes and mtimes) and whose
  sha256 re-hashes equal, and packs the rest;
- bad input stops the job with the file and the reason (exit 1), writing no shard for it; with
  ``--skip-bad`` each bad file is reported, recorded in the manifest's ``skipped`` and counted.
  Source files are bounded like shard members (pipeline.shards.Limits): non-regular files
  (FIFOs, sockets, devices) are refused unopened, and sizes and pixel counts are checked before
  reading and decoding.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .atomic import write_json_atomic
from .datasets import DATASETS, DatasetSpec
from .manifest import MANIFEST_NAME, ManifestError, read_manifest, write_manifest
from .shards import DEFAULT_LIMITS, TAR_FIELDS, Limits, add_limit_args, sample_members
from .sources import SampleError, SourceError, SourceSample, load_sample

PACKER_VERSION = "pipeline.pack/1"
DEFAULT_MAX_COUNT = 256
# Below this many samples to pack, Ray's start-up (15-20 s) costs more than its parallelism gains.
SMALL_JOB = 500
RECORD_DIR = ".pack"  # per-shard completion records, for resuming
_LABEL_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]


class PackError(RuntimeError):
    """A sample could not be packed; the message names the file and the reason."""


def shard_name(name: str, split: str, index: int) -> str:
    return f"{name}-{split}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardTask:
    """Everything one worker needs to pack one shard (pickled to Ray workers)."""

    dataset: str  # key of DATASETS
    name: str  # manifest dataset field / shard prefix
    split: str
    index: int
    src: str
    out_dir: str  # the split folder
    samples: tuple[SourceSample, ...]
    skip_bad: bool
    plan_digest: str
    limits: Limits = DEFAULT_LIMITS

    @property
    def shard(self) -> str:
        return shard_name(self.name, self.split, self.index)


@dataclass
class ShardResult:
    """What a worker reports for one shard; also the on-disk completion record."""

    name: str
    index: int
    plan_digest: str
    keys: list[str] = field(default_factory=list)
    bytes: int = 0
    sha256: str = ""
    class_histogram: list[int] = field(default_factory=list)
    ignore_pixels: int = 0
    skipped: list[dict] = field(default_factory=list)
    image_decodes: int = 0
    error: str | None = None  # "path: reason" of the sample that stopped the shard
    reused: bool = False

    @property
    def num_samples(self) -> int:
        return len(self.keys)


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _rel(path: Path, src: str) -> str:
    try:
        return path.relative_to(src).as_posix()
    except ValueError:
        return path.as_posix()


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def plan_digest(
    name: str,
    split: str,
    src: str,
    samples: Sequence[SourceSample],
    skip_bad: bool,
    limits: Limits = DEFAULT_LIMITS,
) -> str:
    """Identifies a shard's inputs; a changed file (size or mtime) or plan means repacking."""
    head = f"{PACKER_VERSION}\0{name}\0{split}\0{int(skip_bad)}"
    if limits != DEFAULT_LIMITS:  # the defaults leave digests of earlier packs valid
        head += f"\0{limits.max_pixels}\0{limits.max_member_bytes}"
    h = hashlib.sha256(head.encode())
    for s in samples:
        row = (s.key, _rel(s.image_path, src), _rel(s.label_path, src), s.read_label.__name__)
        h.update(repr((row, _stat(s.image_path), _stat(s.label_path))).encode())
    return h.hexdigest()


def plan_shards(
    samples: Sequence[SourceSample], max_count: int | None, max_size: int | None
) -> list[list[SourceSample]]:
    """Group samples, in order, into shards of at most max_count samples or about max_size bytes.

    Sizes are estimated from the source files (image + label + tar headers); a single sample
    larger than max_size gets a shard of its own.
    """
    if max_count is not None and max_count <= 0:
        raise ValueError(f"max_count must be positive, got {max_count}")
    if max_size is not None and max_size <= 0:
        raise ValueError(f"max_size must be positive, got {max_size}")
    shards: list[list[SourceSample]] = []
    current: list[SourceSample] = []
    current_size = 0
    for s in samples:
        size = max(_stat(s.image_path)[0], 0) + max(_stat(s.label_path)[0], 0) + 3 * 1024
        full = (max_count is not None and len(current) >= max_count) or (
            max_size is not None and current and current_size + size > max_size
        )
        if full:
            shards.append(current)
            current, current_size = [], 0
        current.append(s)
        current_size += size
    if current:
        shards.append(current)
    return shards


def encode_sample(task: ShardTask, s: SourceSample, spec: DatasetSpec, lut: np.ndarray, valid):
    """Load, validate and map one sample; return (tar sample dict, source-id pixel counts)."""
    loaded = load_sample(s, task.limits)
    counts = np.bincount(loaded.source_ids.ravel(), minlength=256)  # (256,) pixels per source id
    bad = np.flatnonzero(counts * ~valid)
    if bad.size:
        raise SampleError(
            s.label_path,
            f"label values {bad.tolist()[:10]} are outside the {spec.source.name} label table",
        )
    train_ids = lut[loaded.source_ids]  # (H, W) uint8
    ok, png = cv2.imencode(".png", train_ids, _LABEL_PNG_PARAMS)
    if not ok:
        raise SampleError(s.label_path, "OpenCV could not encode the train-id PNG")
    meta = {
        "key": s.key,
        "image_path": _rel(s.image_path, task.src),
        "label_path": _rel(s.label_path, task.src),
        "height": loaded.height,
        "width": loaded.width,
        "dataset": task.name,
        "split": task.split,
    }
    return sample_members(s.key, loaded.image_ext, loaded.image_bytes, png.tobytes(), meta), counts


def pack_shard(task: ShardTask, progress: Callable[[int], None] | None = None) -> ShardResult:
    """Pack one shard under a temporary name and rename it when complete.

    A bad sample stops the shard (no file is left) unless task.skip_bad, in which case it is
    recorded in the result's `skipped`. A shard whose samples were all skipped writes no file.
    """
    import webdataset as wds  # here: it imports torch, seconds that a rerun with nothing to do skips

    dataset = DATASETS[task.dataset]
    spec = dataset.labels
    lut = spec.lut()
    valid = dataset.source.valid_mask()
    out_dir = Path(task.out_dir)
    final = out_dir / task.shard
    tmp = out_dir / f".{task.shard}.tmp-{os.getpid()}"
    result = ShardResult(task.shard, task.index, task.plan_digest)
    source_counts = np.zeros(256, dtype=np.int64)
    try:
        with open(tmp, "wb") as raw:
            hashed = _HashingFile(raw)
            with wds.TarWriter(hashed, encoder=False, compress=False, **TAR_FIELDS) as writer:
                for s in task.samples:
                    try:
                        sample, counts = encode_sample(task, s, dataset, lut, valid)
                        result.image_decodes += 1
                    except SampleError as e:
                        if not task.skip_bad:
                            result.error = str(e)
                            return result
                        result.skipped.append({"file": e.path, "reason": e.reason})
                        continue
                    finally:
                        if progress is not None:
                            progress(1)
                    writer.write(sample)
                    result.keys.append(s.key)
                    source_counts += counts
            raw.flush()
            os.fsync(raw.fileno())
        if result.keys:
            os.replace(tmp, final)
        else:
            final.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
    result.bytes, result.sha256 = (hashed.size, hashed.sha.hexdigest()) if result.keys else (0, "")
    # Pixels per train id: add each source id's count to the train id it maps to.
    train_counts = np.bincount(lut, weights=source_counts, minlength=256).astype(np.int64)
    result.class_histogram = train_counts[: spec.num_classes].tolist()
    result.ignore_pixels = int(train_counts[spec.ignore_index])
    _write_record(out_dir, result)
    return result


def _record_path(out_dir: Path, shard: str) -> Path:
    return out_dir / RECORD_DIR / f"{shard}.json"


def _write_record(out_dir: Path, result: ShardResult) -> None:
    (out_dir / RECORD_DIR).mkdir(exist_ok=True)
    record = asdict(result)
    record.pop("reused")
    write_json_atomic(_record_path(out_dir, result.name), record)


def reusable_result(task: ShardTask) -> ShardResult | None:
    """The recorded result of a previous run if it packed this same plan and the shard
    re-hashes to the recorded sha256; None if the shard must be (re)packed."""
    out_dir = Path(task.out_dir)
    try:
        record = json.loads(_record_path(out_dir, task.shard).read_text())
        result = ShardResult(**record)
    except (OSError, ValueError, TypeError):
        return None
    if result.plan_digest != task.plan_digest or result.error is not None:
        return None
    final = out_dir / task.shard
    if result.keys:
        if not final.is_file() or final.stat().st_size != result.bytes:
            return None
        if sha256_file(final) != result.sha256:
            return None
    elif final.exists():
        return None
    result.reused = True
    return result


def _clean_split_dir(out_dir: Path, name: str, split: str, planned: set[str]) -> None:
    """Remove temporaries of crashed runs and shards of an older, longer plan."""
    pattern = re.compile(rf"^\.?{re.escape(name)}-{re.escape(split)}-\d{{6}}\.tar(\.tmp-\d+)?$")
    for p in out_dir.iterdir():
        if not pattern.match(p.name):
            continue
        if ".tmp-" in p.name or p.name not in planned:
            p.unlink()
            _record_path(out_dir, p.name).unlink(missing_ok=True)


def _run_in_process(tasks, bar) -> list[ShardResult]:
    results = []
    for t in tasks:
        r = pack_shard(t, progress=bar.update)
        results.append(r)
        if r.error:
            break
    return results


@contextlib.contextmanager
def ray_session(workers: int, ray_address: str | None):
    """Connect to Ray for the duration (shared by all splits), unless already connected.

    Without an address a private local Ray is started with `workers` CPUs, no dashboard,
    bound to the loopback interface (pipeline.ray_local).
    """
    import ray

    from pipeline.ray_local import RayJoinError, join_cluster, start_local, stop_local

    if ray.is_initialized():
        yield
        return
    if ray_address:
        try:
            join_cluster(ray_address, logging_level=logging.WARNING)
        except RayJoinError as e:
            raise PackError(str(e)) from None
    else:
        start_local(workers, logging_level=logging.WARNING)
    try:
        yield
    finally:
        stop_local()  # ray.shutdown(), and the reaper of a private cluster


def _run_on_ray(tasks, workers: int, ray_address: str | None, bar) -> list[ShardResult]:
    import ray

    with ray_session(workers, ray_address):
        remote = ray.remote(num_cpus=1, max_retries=0)(pack_shard)
        pending = {remote.remote(t): t for t in tasks}
        results = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            r = ray.get(done[0])
            pending.pop(done[0])
            results.append(r)
            bar.update(len(r.keys) + len(r.skipped))
            if r.error:
                for ref in pending:
                    ray.cancel(ref)
                break
        return results


@dataclass
class SplitPlan:
    """One split, listed and planned: its shard tasks and which of them a rerun can keep."""

    dataset: DatasetSpec
    name: str
    split: str
    out_dir: Path
    num_samples: int
    tasks: list[ShardTask]
    reused: dict[int, ShardResult] = field(default_factory=dict)

    @property
    def todo(self) -> list[ShardTask]:
        return [t for t in self.tasks if t.index not in self.reused]

    @property
    def todo_samples(self) -> int:
        return sum(len(t.samples) for t in self.todo)


def plan_split(
    dataset: DatasetSpec,
    src: str | os.PathLike,
    out: str | os.PathLike,
    split: str,
    *,
    name: str | None = None,
    max_count: int | None = DEFAULT_MAX_COUNT,
    max_size: int | None = None,
    skip_bad: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> SplitPlan:
    """List one split and plan its shards (SourceError for a bad layout), then find the shards
    a previous run completed (re-hashing each against its record)."""
    name = name or dataset.name
    if "." in name or "/" in name or "-" in name:
        raise ValueError(f"--name {name!r} may not contain '.', '/' or '-'")
    src = str(Path(src).resolve())
    if not Path(src).is_dir():
        raise SourceError(src, "--src folder does not exist")
    samples = dataset.source.list_split(Path(src), split)
    if not samples:
        raise SourceError(
            src, f"split {split!r} has no samples; expected layout: {dataset.source.layout}"
        )
    seen: dict[str, SourceSample] = {}
    for s in samples:
        if s.key in seen:
            raise SourceError(s.image_path, f"key {s.key!r} also used by {seen[s.key].image_path}")
        seen[s.key] = s
    out_dir = Path(out).resolve() / split
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [
        ShardTask(
            dataset.name, name, split, i, src, str(out_dir), tuple(g), skip_bad,
            plan_digest(name, split, src, g, skip_bad, limits), limits,
        )
        for i, g in enumerate(plan_shards(samples, max_count, max_size))
    ]  # fmt: skip
    _clean_split_dir(out_dir, name, split, {t.shard for t in tasks})
    plan = SplitPlan(dataset, name, split, out_dir, len(samples), tasks)
    for t in tasks:
        r = reusable_result(t)
        if r is not None:
            plan.reused[t.index] = r
    return plan


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # not imported: not connected (and no import cost)
    return ray is not None and ray.is_initialized()


def wants_ray(todo_samples: int, workers: int, ray_address: str | None) -> bool:
    """Ray for a named cluster, or for a parallel job big enough to pay for Ray's start-up (or
    when a session is open already)."""
    if ray_address:
        return True
    return workers > 1 and todo_samples > 0 and (todo_samples >= SMALL_JOB or _ray_connected())


def run_split(
    plan: SplitPlan,
    *,
    workers: int = 1,
    ray_address: str | None = None,
    progress: bool = True,
    use_ray: bool | None = None,
) -> dict:
    """Pack the shards `plan` still needs and write the manifest; return it.

    Raises PackError for a bad sample (unless the plan skips bad samples).
    """
    from tqdm import tqdm

    with tqdm(
        total=plan.num_samples, unit="img", desc=f"{plan.name}/{plan.split}",
        disable=None if progress else True, file=sys.stderr, dynamic_ncols=True,  # terminal only
    ) as bar:  # fmt: skip
        bar.update(sum(len(r.keys) + len(r.skipped) for r in plan.reused.values()))
        results = dict(plan.reused)
        todo = plan.todo
        if todo:
            # The old manifest describes shards about to change: drop it until the new one.
            (plan.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        if use_ray is None:
            use_ray = wants_ray(plan.todo_samples, workers, ray_address)
        if todo and not use_ray:
            new = _run_in_process(todo, bar)
        elif todo:
            new = _run_on_ray(todo, workers, ray_address, bar)
        else:
            new = []
        for r in new:
            if r.error:
                raise PackError(r.error)
            results[r.index] = r
    manifest = build_manifest(
        plan.dataset, plan.name, plan.split, [results[t.index] for t in plan.tasks]
    )
    write_manifest(plan.out_dir, manifest)
    return manifest


def up_to_date(plan: SplitPlan) -> bool:
    """Every shard re-hashed equal to its record and the manifest on disk is the one they make."""
    if plan.todo:
        return False
    try:
        on_disk = read_manifest(plan.out_dir)
    except ManifestError:
        return False
    results = [plan.reused[t.index] for t in plan.tasks]
    return on_disk == build_manifest(plan.dataset, plan.name, plan.split, results)


def pack_split(
    dataset: DatasetSpec,
    src: str | os.PathLike,
    out: str | os.PathLike,
    split: str,
    *,
    name: str | None = None,
    max_count: int | None = DEFAULT_MAX_COUNT,
    max_size: int | None = None,
    workers: int = 1,
    ray_address: str | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    use_ray: bool | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict:
    """Pack one split into ``out/<split>/``; return the manifest written there.

    Raises SourceError for a bad --src and PackError for a bad sample (unless skip_bad).
    One Ray task per shard (reusing an open Ray session) when use_ray, which defaults to
    `wants_ray`; else in-process, shard after shard (same per-shard code).
    """
    plan = plan_split(
        dataset, src, out, split, name=name, max_count=max_count, max_size=max_size,
        skip_bad=skip_bad, limits=limits,
    )  # fmt: skip
    return run_split(
        plan, workers=workers, ray_address=ray_address, progress=progress, use_ray=use_ray
    )


def build_manifest(dataset: DatasetSpec, name: str, split: str, results: list[ShardResult]) -> dict:
    spec = dataset.labels
    hist = np.zeros(spec.num_classes, dtype=np.int64)
    for r in results:
        hist += np.asarray(r.class_histogram, dtype=np.int64)
    shards = [
        {"name": r.name, "num_samples": r.num_samples, "keys": r.keys, "bytes": r.bytes,
         "sha256": r.sha256}
        for r in results
        if r.keys
    ]  # fmt: skip
    return {
        "dataset": name,
        "split": split,
        "packer_version": PACKER_VERSION,
        "num_classes": spec.num_classes,
        "ignore_index": spec.ignore_index,
        "class_names": list(spec.class_names),
        "palette": [list(c) for c in spec.palette],
        "label_map": {str(k): v for k, v in sorted(spec.label_map.items())},
        "num_samples": sum(r.num_samples for r in results),
        "shards": shards,
        "class_histogram": hist.tolist(),
        "ignore_pixels": sum(r.ignore_pixels for r in results),
        "skipped": [s for r in results for s in r.skipped],
    }


def build_parser() -> argparse.ArgumentParser:
    splits = "\n".join(
        f"  {name:<14} {' '.join(d.splits)} (known: {' '.join(d.source.known_splits)})"
        for name, d in sorted(DATASETS.items())
    )
    p = argparse.ArgumentParser(
        prog="python -m pipeline.pack",
        description="Pack a dataset from its original layout into WebDataset shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""splits packed by default (others with --splits):
{splits}

writes <out>/<split>/<name>-<split>-NNNNNN.tar and <out>/<split>/manifest.json; a rerun
skips shards that are complete and verify; a bad file stops the job naming the file and
the reason, unless --skip-bad (then it is recorded in the manifest). Jobs under {SMALL_JOB}
samples, or with --workers 1, run in this process; larger ones on a private local Ray.

examples:
  python -m pipeline.pack cityscapes --src /data/cityscapes --out shards/cityscapes
  python -m pipeline.pack voc --src /data/voc --out shards/voc --workers 8
  python -m pipeline.pack ade20k --src /data/ADEChallengeData2016 --out shards/ade20k
  python -m pipeline.pack scenes --src data/scenes --out shards/scenes
  python -m pipeline.verify shards/cityscapes""",
    )
    p.add_argument("dataset", choices=sorted(DATASETS), help="the dataset (its layout and labels)")
    p.add_argument("--src", required=True, help="dataset root in its original layout")
    p.add_argument("--out", required=True, help="output folder, e.g. shards/cityscapes")
    p.add_argument("--splits", nargs="+", help="splits to pack (default: the dataset's usual ones)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--max-count", type=int, help=f"samples per shard (default {DEFAULT_MAX_COUNT})"
    )
    size.add_argument("--max-size", type=int, help="approximate bytes per shard")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1,
        help=f"shards packed in parallel on Ray (jobs under {SMALL_JOB} samples run in-process)",
    )  # fmt: skip
    p.add_argument(
        "--ray-address",
        help="an existing Ray cluster (paths must be shared; it needs the cluster's token: "
        "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...)",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help=f"pack on Ray even a job under {SMALL_JOB} samples (with --workers above 1)",
    )
    p.add_argument("--skip-bad", action="store_true", help="skip bad files, recording them")
    p.add_argument("--name", help="dataset name in the manifest and shard names (default: dataset)")
    add_limit_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dataset = DATASETS[args.dataset]
    splits = args.splits or list(dataset.splits)
    for split in splits:
        if split not in dataset.source.known_splits:
            print(f"error: unknown {args.dataset} split {split!r}; known: "
                  f"{dataset.source.known_splits}", file=sys.stderr)  # fmt: skip
            return 2
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        limits = Limits(args.max_pixels, args.max_member_bytes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_count = args.max_count if args.max_size is None else None
    if max_count is None and args.max_size is None:
        max_count = DEFAULT_MAX_COUNT
    if not Path(args.src).is_dir():
        print(f"error: {args.src}: --src folder does not exist", file=sys.stderr)
        return 1
    plans = []
    for split in splits:  # every layout problem shows before any packing or Ray start-up
        try:
            plans.append(plan_split(
                dataset, args.src, args.out, split, name=args.name, max_count=max_count,
                max_size=args.max_size, skip_bad=args.skip_bad, limits=limits,
            ))  # fmt: skip
        except (SourceError, ValueError) as e:
            print(f"error: {args.dataset} {split}: {e}", file=sys.stderr)
            return 1
    todo = sum(p.todo_samples for p in plans)
    use_ray = todo > 0 and args.workers > 1 and args.ray
    use_ray = use_ray or wants_ray(todo, args.workers, args.ray_address)
    try:
        with ray_session(args.workers, args.ray_address) if use_ray else contextlib.nullcontext():
            return _pack_splits(args, plans, use_ray)
    except PackError as e:  # the Ray cluster could not be reached
        print(f"error: {e}", file=sys.stderr)
        return 1


def _pack_splits(args: argparse.Namespace, plans: list[SplitPlan], use_ray: bool) -> int:
    summary = []
    for plan in plans:
        t0 = time.perf_counter()
        if up_to_date(plan):
            m = read_manifest(plan.out_dir)
            summary.append(_summary_line(plan, m, "already packed and verified, skipped", t0))
            print(summary[-1])
            continue
        reused = len(plan.reused)
        try:
            m = run_split(
                plan, workers=args.workers, ray_address=args.ray_address,
                progress=not args.no_progress, use_ray=use_ray,
            )  # fmt: skip
        except (SourceError, PackError, ValueError) as e:
            print(f"error: {args.dataset} {plan.split}: {e}", file=sys.stderr)
            return 1
        for s in m["skipped"]:
            print(f"skipped: {s['file']}: {s['reason']}", file=sys.stderr)
        if m["skipped"]:
            print(f"{plan.split}: skipped {len(m['skipped'])} bad file(s), recorded in the "
                  "manifest", file=sys.stderr)  # fmt: skip
        where = "on Ray" if use_ray else "in-process"
        done = f"packed {len(plan.tasks) - reused} shard(s) {where}, kept {reused}"
        summary.append(_summary_line(plan, m, done, t0))
        print(summary[-1])
    print(f"summary ({args.dataset} -> {Path(args.out)}):")
    for line in summary:
        print(f"  {line}")
    return 0


def _summary_line(plan: SplitPlan, m: dict, what: str, t0: float) -> str:
    skipped = f", {len(m['skipped'])} bad file(s) skipped (in the manifest)" if m["skipped"] else ""
    return (
        f"{plan.split}: {m['num_samples']} samples in {len(m['shards'])} shards{skipped}; "
        f"{what} ({time.perf_counter() - t0:.1f} s)"
    )


if __name__ == "__main__":
    sys.exit(main())
