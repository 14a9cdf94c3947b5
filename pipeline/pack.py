"""Pack a dataset from its original layout into WebDataset tar shards, one Ray task per shard.

    python -m pipeline.pack {cityscapes,voc,cocostuff10k,cocostuff164k} --src DIR --out shards/NAME
        [--splits S ...] [--max-count N | --max-size BYTES] [--workers K] [--ray-address ADDR]
        [--skip-bad] [--name NAME] [--no-progress]

Writes ``OUT/<split>/<name>-<split>-NNNNNN.tar`` and ``OUT/<split>/manifest.json`` (schema in
pipeline/manifest.py). ``--name`` sets the manifest's dataset field and the shard prefix
(default: the packer name), e.g. ``--name scenes`` for the synthetic scenes in Cityscapes layout.

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
import webdataset as wds

from .atomic import write_json_atomic
from .manifest import MANIFEST_NAME, write_manifest
from .sources import SOURCES, DatasetSource, SampleError, SourceError, SourceSample, load_sample

PACKER_VERSION = "pipeline.pack/1"
DEFAULT_MAX_COUNT = 256
RECORD_DIR = ".pack"  # per-shard completion records, for resuming
_LABEL_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]
# Fixed tar member fields: the same input gives the same bytes on any machine, any day.
_TAR_FIELDS = {"mtime": 0, "user": "cdgcnet", "group": "cdgcnet", "mode": 0o444}


class PackError(RuntimeError):
    """A sample could not be packed; the message names the file and the reason."""


def shard_name(name: str, split: str, index: int) -> str:
    return f"{name}-{split}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardTask:
    """Everything one worker needs to pack one shard (pickled to Ray workers)."""

    source: str  # key of SOURCES
    name: str  # manifest dataset field / shard prefix
    split: str
    index: int
    src: str
    out_dir: str  # the split folder
    samples: tuple[SourceSample, ...]
    skip_bad: bool
    plan_digest: str

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
    name: str, split: str, src: str, samples: Sequence[SourceSample], skip_bad: bool
) -> str:
    """Identifies a shard's inputs; a changed file (size or mtime) or plan means repacking."""
    h = hashlib.sha256(f"{PACKER_VERSION}\0{name}\0{split}\0{int(skip_bad)}".encode())
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


def encode_sample(task: ShardTask, s: SourceSample, src: DatasetSource, lut: np.ndarray, valid):
    """Load, validate and map one sample; return (tar sample dict, source-id pixel counts)."""
    loaded = load_sample(s)
    counts = np.bincount(loaded.source_ids.ravel(), minlength=256)  # (256,) pixels per source id
    bad = np.flatnonzero(counts * ~valid)
    if bad.size:
        raise SampleError(
            s.label_path,
            f"label values {bad.tolist()[:10]} are outside the {src.name} label table",
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
    sample = {
        "__key__": s.key,
        loaded.image_ext: loaded.image_bytes,
        "label.png": png.tobytes(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    return sample, counts


def pack_shard(task: ShardTask, progress: Callable[[int], None] | None = None) -> ShardResult:
    """Pack one shard under a temporary name and rename it when complete.

    A bad sample stops the shard (no file is left) unless task.skip_bad, in which case it is
    recorded in the result's `skipped`. A shard whose samples were all skipped writes no file.
    """
    source = SOURCES[task.source]
    spec = source.spec
    lut = spec.lut()
    valid = source.valid_mask()
    out_dir = Path(task.out_dir)
    final = out_dir / task.shard
    tmp = out_dir / f".{task.shard}.tmp-{os.getpid()}"
    result = ShardResult(task.shard, task.index, task.plan_digest)
    source_counts = np.zeros(256, dtype=np.int64)
    try:
        with open(tmp, "wb") as raw:
            hashed = _HashingFile(raw)
            with wds.TarWriter(hashed, encoder=False, compress=False, **_TAR_FIELDS) as writer:
                for s in task.samples:
                    try:
                        sample, counts = encode_sample(task, s, source, lut, valid)
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
    bound to the loopback interface.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if ray_address:
        try:
            ray.init(address=ray_address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PackError(
                f"cannot connect to the Ray cluster at {ray_address}: {reason}"
            ) from None
    else:
        # address="local": never attach to a cluster named by a leftover
        # /tmp/ray/ray_current_cluster from an earlier `ray start`.
        ray.init(
            address="local",
            num_cpus=workers,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
        )
    try:
        yield
    finally:
        ray.shutdown()


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


def pack_split(
    source: DatasetSource,
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
) -> dict:
    """Pack one split into ``out/<split>/``; return the manifest written there.

    Raises SourceError for a bad --src and PackError for a bad sample (unless skip_bad).
    One Ray task per shard (reusing an open Ray session) when use_ray, which defaults to
    workers > 1 or a ray_address; else in-process, shard after shard (same per-shard code).
    """
    from tqdm import tqdm

    name = name or source.name
    if "." in name or "/" in name or "-" in name:
        raise ValueError(f"--name {name!r} may not contain '.', '/' or '-'")
    src = str(Path(src).resolve())
    if not Path(src).is_dir():
        raise SourceError(src, "--src folder does not exist")
    samples = source.list_split(Path(src), split)
    if not samples:
        raise SourceError(src, f"split {split!r} has no samples; expected layout: {source.layout}")
    seen: dict[str, SourceSample] = {}
    for s in samples:
        if s.key in seen:
            raise SourceError(s.image_path, f"key {s.key!r} also used by {seen[s.key].image_path}")
        seen[s.key] = s
    out_dir = Path(out).resolve() / split
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = plan_shards(samples, max_count, max_size)
    tasks = [
        ShardTask(
            source.name, name, split, i, src, str(out_dir), tuple(g), skip_bad,
            plan_digest(name, split, src, g, skip_bad),
        )
        for i, g in enumerate(groups)
    ]  # fmt: skip
    _clean_split_dir(out_dir, name, split, {t.shard for t in tasks})

    with tqdm(
        total=len(samples), unit="img", desc=f"{name}/{split}", disable=not progress,
        file=sys.stderr, dynamic_ncols=True,
    ) as bar:  # fmt: skip
        results: dict[int, ShardResult] = {}
        todo = []
        for t in tasks:
            r = reusable_result(t)
            if r is None:
                todo.append(t)
            else:
                results[t.index] = r
                bar.update(len(r.keys) + len(r.skipped))
        if todo:
            # The old manifest describes shards about to change: drop it until the new one.
            (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        if use_ray is None:
            use_ray = workers > 1 or bool(ray_address)
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
    ordered = [results[t.index] for t in tasks]
    manifest = build_manifest(source, name, split, ordered)
    write_manifest(out_dir, manifest)
    return manifest


def build_manifest(
    source: DatasetSource, name: str, split: str, results: list[ShardResult]
) -> dict:
    spec = source.spec
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
        f"  {name:<14} {' '.join(src.splits)} (known: {' '.join(src.known_splits)})"
        for name, src in sorted(SOURCES.items())
    )
    p = argparse.ArgumentParser(
        prog="python -m pipeline.pack",
        description="Pack a dataset from its original layout into WebDataset shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""splits packed by default (others with --splits):
{splits}

writes <out>/<split>/<name>-<split>-NNNNNN.tar and <out>/<split>/manifest.json; a rerun
skips shards that are complete and verify; a bad file stops the job naming the file and
the reason, unless --skip-bad (then it is recorded in the manifest).

examples:
  python -m pipeline.pack cityscapes --src /data/cityscapes --out shards/cityscapes
  python -m pipeline.pack voc --src /data/voc --out shards/voc --workers 8
  python -m pipeline.pack cityscapes --src data/scenes --out shards/scenes --name scenes
  python -m pipeline.verify shards/cityscapes""",
    )
    p.add_argument("dataset", choices=sorted(SOURCES), help="the source layout to read")
    p.add_argument("--src", required=True, help="dataset root in its original layout")
    p.add_argument("--out", required=True, help="output folder, e.g. shards/cityscapes")
    p.add_argument("--splits", nargs="+", help="splits to pack (default: the dataset's usual ones)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--max-count", type=int, help=f"samples per shard (default {DEFAULT_MAX_COUNT})"
    )
    size.add_argument("--max-size", type=int, help="approximate bytes per shard")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Ray tasks in parallel")
    p.add_argument("--ray-address", help="an existing Ray cluster (paths must be shared)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad files, recording them")
    p.add_argument("--name", help="dataset name in the manifest and shard names (default: dataset)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = SOURCES[args.dataset]
    splits = args.splits or list(source.splits)
    for split in splits:
        if split not in source.known_splits:
            print(f"error: unknown {args.dataset} split {split!r}; known: {source.known_splits}",
                  file=sys.stderr)  # fmt: skip
            return 2
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    max_count = args.max_count if args.max_size is None else None
    if max_count is None and args.max_size is None:
        max_count = DEFAULT_MAX_COUNT
    if not Path(args.src).is_dir():
        print(f"error: {args.src}: --src folder does not exist", file=sys.stderr)
        return 1
    use_ray = args.workers > 1 or bool(args.ray_address)
    try:
        with ray_session(args.workers, args.ray_address) if use_ray else contextlib.nullcontext():
            return _pack_splits(args, source, splits, max_count)
    except PackError as e:  # the Ray cluster could not be reached
        print(f"error: {e}", file=sys.stderr)
        return 1


def _pack_splits(args: argparse.Namespace, source: DatasetSource, splits, max_count) -> int:
    for split in splits:
        t0 = time.perf_counter()
        try:
            m = pack_split(
                source, args.src, args.out, split, name=args.name, max_count=max_count,
                max_size=args.max_size, workers=args.workers, ray_address=args.ray_address,
                skip_bad=args.skip_bad, progress=not args.no_progress,
            )  # fmt: skip
        except (SourceError, PackError, ValueError) as e:
            print(f"error: {args.dataset} {split}: {e}", file=sys.stderr)
            return 1
        dt = time.perf_counter() - t0
        for s in m["skipped"]:
            print(f"skipped: {s['file']}: {s['reason']}", file=sys.stderr)
        if m["skipped"]:
            print(f"{split}: skipped {len(m['skipped'])} bad file(s), recorded in the manifest",
                  file=sys.stderr)  # fmt: skip
        print(f"{split}: {m['num_samples']} samples in {len(m['shards'])} shards -> "
              f"{Path(args.out) / split} ({dt:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
