"""Shard reader for training (TrainStream) and evaluation (EvalStream).

Training stream. Each (rank, worker) runs its own WebDataset pipeline: resampled shards
(``wds.ResampledShards``, shards weighted by their sample counts) -> tar members grouped into
samples and checked against the manifest -> shuffle buffer -> OpenCV decode -> augmentation
(pipeline.transforms) -> batches. Shards are "split by node and worker" by seeding: every
(seed, rank, worker, epoch) gets its own deterministic resampling and shuffle order, so ranks
and workers draw different, reproducible streams and none runs out of data. An epoch is a fixed
number of batches, counted in the main process, identical on every rank, so DDP never waits on a
rank that ran out.

Exact resumption. Batch i of an epoch comes from worker stream i % num_workers (the DataLoader
round-robins over its workers and returns results in order; a resumed iteration rotates which
process runs which stream), and each worker stream is a pure function of (seed, rank, stream,
epoch): the shard draws and the shuffle are seeded, and each sample's augmentation uses a
Generator seeded by (seed, rank, stream, epoch, position in the stream). The state is therefore
just (epoch, step). To resume at step k, stream w skips the ``len(range(w, k, num_workers)) *
batch_size`` samples it had already delivered, right after the shuffle buffer and before any
decoding, so fast-forward costs only reading tar bytes. A resumed stream yields exactly the
batches the uninterrupted one would have, provided the seed, rank, world size, workers, batch
size, augmentation and shards are the same (load_state_dict checks them). Each epoch starts
fresh worker processes. One limit: with on_corrupt="skip", a sample that fails to decode
inside the skipped prefix is not detected again, so the resumed batches are shifted by it.

Evaluation stream. The manifest's shard order and per-shard keys define a global sample order;
rank r gets one contiguous range of it (sizes differ by at most one, no padding), and reads only
the shards holding that range. Inside a rank, worker w takes the range's samples w, w + W, ...;
the DataLoader's round-robin then returns them in the global order. Every worker reads the rank's
shards but only extracts its own members.

Corrupt shards. A tar that cannot be read, a sample missing a member or holding a member of
another field, a sample whose image or label does not decode, a training label with ids outside
the manifest's classes, a shard that ends before all its manifest keys were seen, or a shard
whose size or sha256 differs from the manifest's raises ShardError naming the shard (and the
key) (on_corrupt="raise"), or is skipped and counted in ``.skipped`` (samples not delivered),
each skip logged as a warning with its reason and the first reasons kept in ``.skip_log``
(on_corrupt="skip"). The size is checked before a shard is opened, the sha256 while it is read:
a same-size change is found at the shard's end, after its samples were delivered (with "raise"
the run stops there; with "skip" the warning says the samples were used). The tar parsing, the
sample schema, the hashing and the size limits (pixels per image, bytes per member, checked
from headers before anything is decoded) are pipeline.shards'.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import manifest as _manifest
from pipeline import shards
from pipeline.shards import DEFAULT_LIMITS, LABEL_FIELD, Limits, ShardError
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainAugment, as_hw, normalize

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalStream",
    "Limits",
    "ShardError",
    "TrainStream",
    "decode_sample",
    "read_manifest",
]

_ON_CORRUPT = ("raise", "skip")
_MAX_SKIP_LOG = 100  # reasons kept in .skip_log; every skip is logged and counted
_log = logging.getLogger(__name__)


def read_manifest(split_dir: str | os.PathLike) -> dict:
    """Read and validate ``split_dir/manifest.json`` and check that every listed shard exists.

    Errors (pipeline.manifest.ManifestError, a ValueError) name the file and the reason.
    """
    m = _manifest.read_manifest(split_dir)
    folder = _manifest.manifest_path(split_dir).parent
    for s in m["shards"]:
        if not (folder / s["name"]).is_file():
            raise _manifest.ManifestError(
                f"{folder / s['name']}: shard listed in {_manifest.MANIFEST_NAME} does not exist"
            )
    return m


@dataclass
class _ShardInfo:
    path: str
    keys: tuple[str, ...]
    sha256: str | None = None
    size: int | None = None


def _shard_infos(split_dir: str | os.PathLike) -> tuple[dict, list[_ShardInfo]]:
    m = read_manifest(split_dir)
    folder = _manifest.manifest_path(split_dir).parent
    infos = [
        _ShardInfo(str(folder / s["name"]), tuple(s["keys"]), s["sha256"], s["bytes"])
        for s in m["shards"]
    ]
    return m, infos


@dataclass
class _SkipLog:
    """Skipped-sample count and reasons gathered inside one worker, shipped with its output."""

    count: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, n: int, reason: str) -> None:
        self.count += n
        # emptied with each batch/sample shipped, so every reason reaches the main process
        self.reasons.append(reason if n == 1 else f"{n} samples lost: {reason}")

    def pop(self) -> tuple[int, list[str]]:
        out = (self.count, self.reasons)
        self.count, self.reasons = 0, []
        return out


def _note_skips(skip_log: list[str], reasons: Sequence[str]) -> None:
    """Log every skipped sample with its reason; keep the first ones in `skip_log`."""
    for reason in reasons:
        _log.warning("skipped: %s", reason)
    skip_log.extend(reasons[: max(0, _MAX_SKIP_LOG - len(skip_log))])


def _check_on_corrupt(on_corrupt: str) -> None:
    if on_corrupt not in _ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {_ON_CORRUPT}, got {on_corrupt!r}")


def _read_shard(
    shard: _ShardInfo, wanted: set[str] | None, on_corrupt: str, log: _SkipLog, limits: Limits
) -> Iterator[dict]:
    """Yield raw samples {"__key__", "__shard__", "<field>": bytes} of one shard, in tar order.

    Only the members of ``wanted`` keys (all keys when None) are read. The shard must hold
    exactly the manifest's keys; anything else is a ShardError naming the shard.
    """
    expected = set(shard.keys)
    want = expected if wanted is None else wanted
    seen: set[str] = set()
    strangers: list[str] = []
    delivered = 0

    def note(key: str) -> None:
        if key in expected:
            seen.add(key)
        else:
            strangers.append(key)

    try:
        for sample in shards.iter_samples(
            shard.path, limits=limits, keep=lambda key, _: key in want, on_member=note,
            sha256=shard.sha256, size=shard.size,
        ):  # fmt: skip
            if sample["__key__"] in want:
                yield sample
                delivered += 1
        if strangers:
            raise ShardError(
                f"{shard.path}: {len(strangers)} member(s) with keys not in the manifest "
                f"(first: {strangers[0]})"
            )
        if seen != expected:
            missing = sorted(expected - seen)
            raise ShardError(
                f"{shard.path}: truncated or damaged shard, {len(missing)} of {len(expected)} "
                f"manifest keys not found (first: {missing[0]})"
            )
    except Exception as exn:
        if isinstance(exn, ShardError):
            reason = str(exn)
        else:
            reason = f"{shard.path}: corrupt shard ({type(exn).__name__}: {exn})"
        if on_corrupt == "raise" and isinstance(exn, ShardError):
            raise
        if on_corrupt == "raise":
            raise ShardError(reason) from exn
        # the rest of the shard is lost: count what was wanted and not delivered
        lost = max(len(want) - delivered, 0)
        log.add(lost, reason if lost else f"{reason} ({delivered} of its samples were used)")


def _imdecode(data: bytes, flags: int) -> np.ndarray | None:
    try:
        return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error:
        return None


def decode_sample(
    sample: dict, limits: Limits = DEFAULT_LIMITS, classes: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Raw shard sample -> (image (H, W, 3) uint8 RGB, label (H, W) uint8 train ids).

    Raises ShardError naming the shard and the key when a member is missing, an image header
    declares more than ``limits.max_pixels`` (checked before decoding), either does not decode,
    they differ in size, or (with ``classes=(num_classes, ignore_index)``) the label holds ids
    that are neither a class nor the ignore id.
    """
    where = shards.sample_where(sample)
    shards.check_sample(sample, limits)
    field_ = shards.image_field(sample)
    image = _imdecode(sample[field_], cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise ShardError(f"{where}: image .{field_} does not decode")
    label = _imdecode(sample[LABEL_FIELD], cv2.IMREAD_UNCHANGED)
    if label is None:
        raise ShardError(f"{where}: {LABEL_FIELD} does not decode")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ShardError(
            f"{where}: {LABEL_FIELD} must be single-channel uint8, got {label.dtype} {label.shape}"
        )
    if label.shape != image.shape[:2]:
        raise ShardError(f"{where}: image {image.shape[:2]} and label {label.shape} sizes differ")
    if classes is not None and (bad := shards.foreign_labels(label, *classes)):
        raise ShardError(
            f"{where}: {LABEL_FIELD} holds ids {bad[:8]} outside the {classes[0]} classes "
            f"(0..{classes[0] - 1}, {classes[1]} = ignore) of the manifest"
        )
    return image, label


def _decode_or_skip(
    sample: dict, on_corrupt: str, log: _SkipLog, limits: Limits, classes=None
) -> tuple[np.ndarray, np.ndarray] | None:
    """decode_sample, or None (counted in `log`) for a corrupt sample when skipping."""
    try:
        return decode_sample(sample, limits, classes)
    except ShardError as exn:
        if on_corrupt == "raise":
            raise
        log.add(1, str(exn))
        return None


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    if info is None:
        return 0, 1
    # No cv2.setNumThreads(1) here: in a forked worker it can block forever joining the
    # parent's OpenCV pool threads (seen after the parent resized 2048x1024 images).
    return info.id, info.num_workers


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _loader(dataset: IterableDataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset batches; each item is one batch or one eval sample
        num_workers=num_workers,
        prefetch_factor=2 if num_workers > 0 else None,
        # Page-locked batches: a copy from pageable memory would wait for the GPU's queue.
        pin_memory=pin_memory,
        # Its own generator: creating the loader leaves the global torch RNG alone (the streams
        # are seeded explicitly and never use the worker seeds it derives).
        generator=torch.Generator().manual_seed(0),
    )


# --------------------------------------------------------------------------- training


class _TrainWorkerStream(IterableDataset):
    """One epoch of batches for one rank, built inside each worker (nothing wds is pickled)."""

    def __init__(self, stream: TrainStream, epoch: int, start_step: int) -> None:
        super().__init__()
        self.shards = stream._shards
        self.augment = stream.augment
        self.batch_size = stream.batch_size
        self.shuffle_buffer = stream.shuffle_buffer
        self.on_corrupt, self.limits = stream.on_corrupt, stream.limits
        self.label_check = stream.label_check
        self.classes = (stream.manifest["num_classes"], stream.manifest["ignore_index"])
        self.seed, self.rank, self.epoch = stream.seed, stream.rank, epoch
        self.start_step = start_step

    def _shard_slots(self) -> list[str]:
        # ResampledShards draws uniformly from its list; repeating each shard in proportion to
        # its sample count (1/16 resolution) keeps a short last shard from being oversampled.
        most = max(len(s.keys) for s in self.shards)
        return [
            str(i)
            for i, s in enumerate(self.shards)
            for _ in range(max(1, round(16 * len(s.keys) / most)))
        ]

    def _samples(self, worker: int, log: _SkipLog) -> Iterator[dict]:
        shard_seed = _seed(self.seed, self.rank, worker, self.epoch, 0)
        shuffle_seed = _seed(self.seed, self.rank, worker, self.epoch, 1)

        def expand(src: Iterator[dict]) -> Iterator[dict]:
            barren = 0  # consecutive shards that gave nothing: all corrupt in skip mode
            for item in src:
                got = False
                for sample in _read_shard(
                    self.shards[int(item["url"])], None, self.on_corrupt, log, self.limits
                ):
                    got = True
                    yield sample
                barren = 0 if got else barren + 1
                if barren > 10 * len(self.shards) + 10:
                    raise ShardError(
                        f"no readable sample in {barren} shard draws: {log.reasons[:3]}"
                    )

        return iter(
            wds.DataPipeline(
                wds.ResampledShards(
                    self._shard_slots(), seed=0, worker_seed=lambda: shard_seed, deterministic=True
                ),
                expand,
                wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=shuffle_seed),
            )
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, list[str]]]:
        loader_worker, num_workers = _worker()
        # The DataLoader gives its j-th batch to worker j % W, counting from this (resumed)
        # iteration's start; the stream of batch i of the epoch is stream i % W.
        worker = (loader_worker + self.start_step) % num_workers
        log = _SkipLog()
        samples = self._samples(worker, log)
        position = 0  # index in this worker's post-shuffle stream; seeds the augmentation
        done = len(range(worker, self.start_step, num_workers))  # batches already delivered
        for _ in range(done * self.batch_size):
            next(samples)  # fast-forward: tar bytes only, nothing decoded
            position += 1
        log.pop()  # skips met while fast-forwarding were counted before the stream was saved
        images, labels = [], []
        for sample in samples:
            rng = np.random.default_rng([self.seed, self.rank, worker, self.epoch, position])
            position += 1
            decoded = _decode_or_skip(sample, self.on_corrupt, log, self.limits, self.classes)
            if decoded is None:
                continue
            image, label = self.augment(*decoded, rng)
            self._check_label(sample, label)
            images.append(image)
            labels.append(label)
            if len(images) == self.batch_size:
                batch_images = torch.from_numpy(np.stack(images))  # (B, 3, ch, cw) float32
                batch_labels = torch.from_numpy(np.stack(labels).astype(np.int64))  # (B, ch, cw)
                images, labels = [], []
                yield (batch_images, batch_labels, *log.pop())

    def _check_label(self, sample: dict, label: np.ndarray) -> None:
        """label_check on one augmented label; its ValueError names the shard and the key."""
        if self.label_check is None:
            return
        try:
            self.label_check(torch.from_numpy(label))
        except ValueError as exc:
            raise ValueError(f"{shards.sample_where(sample)}: {exc}") from None


class TrainStream:
    """Infinite-data training stream; each ``iter()`` is one epoch of ``batches_per_epoch`` batches.

    Yields (images float32 (B, 3, ch, cw) normalised, labels int64 (B, ch, cw), 255 = pad/ignore).
    Breaking out of an epoch and iterating again continues where it stopped. ``state_dict()``
    / ``load_state_dict()`` save and restore the position exactly (see the module docstring).
    Each worker holds ``shuffle_buffer`` encoded samples (about 2.5 MB each for Cityscapes PNGs).
    ``pin_memory`` yields page-locked batches (for training on a GPU, where it lets the step's
    ``.to(device, non_blocking=True)`` overlap with the work already queued). ``label_check``
    runs on each augmented label (int tensor (ch, cw)) in the loader workers, off the training
    step's path; its ValueError comes out naming the shard and the sample key.
    """

    def __init__(
        self,
        split_dir: str | os.PathLike,
        *,
        batch_size: int,
        crop_size: int | tuple[int, int],
        batches_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        jitter: bool = False,
        shuffle_buffer: int = 128,
        on_corrupt: str = "raise",
        pin_memory: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        label_check: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        _check_on_corrupt(on_corrupt)
        for name, v, low in (
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 1),
        ):
            if not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.split_dir = str(split_dir)
        self.manifest, self._shards = _shard_infos(split_dir)
        if self.manifest["num_samples"] == 0:
            raise ValueError(f"{_manifest.manifest_path(split_dir)}: the split has no samples")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, int(seed), shuffle_buffer
        self.on_corrupt, self.pin_memory = on_corrupt, bool(pin_memory)
        self.limits, self.label_check = limits, label_check
        self.augment = TrainAugment(as_hw(crop_size), tuple(scale_range), flip, jitter)
        if batches_per_epoch is None:
            # about one pass over the split per epoch across all ranks
            batches_per_epoch = max(1, self.manifest["num_samples"] // (batch_size * world_size))
        if not isinstance(batches_per_epoch, int) or batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be a positive int, got {batches_per_epoch!r}")
        self.batches_per_epoch = batches_per_epoch
        self.epoch, self.step = 0, 0
        self.skipped = 0
        self.skip_log: list[str] = []

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _roll(self) -> None:
        if self.step >= self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._roll()
        epoch, start = self.epoch, self.step
        dataset = _TrainWorkerStream(self, epoch, start)
        batches = iter(_loader(dataset, self.num_workers, self.pin_memory))
        try:
            for _ in range(start, self.batches_per_epoch):
                images, labels, n_skipped, reasons = next(batches)
                self._count_skips(n_skipped, reasons)
                self.step += 1
                yield images, labels
            self._roll()
        finally:
            del batches  # shuts the worker processes down

    def _count_skips(self, n: int, reasons: Sequence[str]) -> None:
        self.skipped += int(n)
        _note_skips(self.skip_log, reasons)

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.manifest["shards"]:
            h.update(f"{s['name']}:{s['num_samples']}:{s['sha256']};".encode())
        return h.hexdigest()[:16]

    def _config(self) -> dict[str, Any]:
        a = self.augment
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "batches_per_epoch": self.batches_per_epoch,
            "shuffle_buffer": self.shuffle_buffer,
            "crop_size": list(a.crop_size),
            "scale_range": list(a.scale_range),
            "flip": a.flip,
            "jitter": a.jitter,
            "shards": self._fingerprint(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Position (epoch, step), skip count and the settings the position depends on."""
        self._roll()
        return {
            "epoch": self.epoch,
            "step": self.step,
            "skipped": self.skipped,
            "config": self._config(),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore a position. ``strict`` refuses a state saved with other settings (the batches
        would differ); ``strict=False`` keeps only epoch and step (e.g. after a world-size change).
        """
        if strict:
            saved, now = state.get("config", {}), self._config()
            diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            if diff:
                raise ValueError(
                    "TrainStream state was saved with other settings (saved, now): "
                    f"{diff}; pass strict=False to keep only the epoch and step"
                )
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step <= self.batches_per_epoch:
            raise ValueError(f"bad TrainStream state: epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step
        self.skipped = int(state.get("skipped", 0))
        self._roll()


# --------------------------------------------------------------------------- evaluation


def _rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [lo, hi) of n items for one rank; sizes differ by at most one."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class _EvalWorkerStream(IterableDataset):
    def __init__(self, items: list[tuple[_ShardInfo, str]], on_corrupt: str, limits: Limits):
        super().__init__()
        self.items = items
        self.on_corrupt, self.limits = on_corrupt, limits

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        mine = self.items[worker::num_workers]
        log = _SkipLog()
        by_shard: dict[str, tuple[_ShardInfo, set[str]]] = {}
        for shard, key in mine:  # insertion order = the manifest's shard order
            by_shard.setdefault(shard.path, (shard, set()))[1].add(key)
        for shard, wanted in by_shard.values():
            for sample in _read_shard(shard, wanted, self.on_corrupt, log, self.limits):
                decoded = _decode_or_skip(sample, self.on_corrupt, log, self.limits)
                if decoded is None:
                    continue
                image, label = decoded
                n_skipped, reasons = log.pop()
                yield {
                    "key": sample["__key__"],
                    "image": torch.from_numpy(normalize(image)[None]),  # (1, 3, H, W)
                    "label": torch.from_numpy(label[None].astype(np.int64)),  # (1, H, W)
                    "image_uint8": image,  # (H, W, 3) RGB
                    "_skipped": n_skipped,
                    "_reasons": reasons,
                }
        if log.count:
            n_skipped, reasons = log.pop()
            yield {"key": None, "_skipped": n_skipped, "_reasons": reasons}


class EvalStream:
    """Every sample of a split exactly once across ranks and workers, full resolution, batch 1.

    Yields {"key": str, "image": float32 (1, 3, H, W) normalised, "label": int64 (1, H, W),
    "image_uint8": uint8 (H, W, 3) RGB} in the manifest's order. ``len()`` is this rank's
    sample count (with on_corrupt="skip", ``len() - skipped`` are delivered).
    """

    def __init__(
        self,
        split_dir: str | os.PathLike,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        on_corrupt: str = "raise",
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        _check_on_corrupt(on_corrupt)
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank!r} is outside [0, world_size={world_size})")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.split_dir = str(split_dir)
        self.manifest, shards = _shard_infos(split_dir)
        items = [(s, k) for s in shards for k in s.keys]
        lo, hi = _rank_range(len(items), rank, world_size)
        self._items = items[lo:hi]
        self.keys: list[str] = [k for _, k in self._items]
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.on_corrupt, self.limits = num_workers, on_corrupt, limits
        self.skipped = 0
        self.skip_log: list[str] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[dict]:
        self.skipped, self.skip_log = 0, []
        if not self._items:
            return
        workers = min(self.num_workers, len(self._items))
        stream = _EvalWorkerStream(self._items, self.on_corrupt, self.limits)
        for out in _loader(stream, workers):
            self.skipped += int(out.pop("_skipped"))
            _note_skips(self.skip_log, out.pop("_reasons"))
            if out["key"] is None:
                continue
            if isinstance(out["image_uint8"], torch.Tensor):
                out["image_uint8"] = out["image_uint8"].numpy()
            yield out


def shard_paths(split_dir: str | os.PathLike) -> list[Path]:
    """Paths of a split's shards in manifest order (validated)."""
    _, shards = _shard_infos(split_dir)
    return [Path(s.path) for s in shards]
