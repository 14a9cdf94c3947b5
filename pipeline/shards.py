"""The shard sample format: member names, JSON metadata, size limits, and the one tar reader.

A shard is an uncompressed tar of samples. Sample ``KEY`` is three consecutive members:

    KEY.jpg | KEY.png   the image bytes exactly as in the source (IMAGE_FIELDS)
    KEY.label.png       single-channel uint8 PNG of train ids, 255 = ignore (LABEL_FIELD)
    KEY.json            metadata (META_FIELD, keys META_KEYS)

Keys hold no '.' or '/' (WebDataset splits fields at the first dot). The packer writes with
`sample_members`, and both the training reader and `pipeline.verify` read with `iter_samples`,
so the format is stated here once. A member of any other field is refused by name, unread.

Integrity. `iter_samples(sha256=...)` hashes the shard while it reads it and raises a ShardError
at its end when the digest differs from the manifest's (`bytes=` is checked from `stat` before
reading): the reader's samples come from the shards that were packed and verified.

Limits. A shard is untrusted input: a 3 MB PNG can declare 30000 x 30000 pixels and a member can
claim gigabytes. `Limits` bounds the bytes of every member (checked from the tar header, before
reading it) and the pixels of every image (checked from the PNG/JPEG header, before decoding).
The defaults fit the largest real dataset (Cityscapes, 2048 x 1024 = 2.1 M pixels, PNGs up to
about 3 MB) with a wide margin. A violation is a ShardError naming the shard and the key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

IMAGE_FIELDS = ("jpg", "png")
LABEL_FIELD = "label.png"
META_FIELD = "json"
META_KEYS = ("key", "image_path", "label_path", "height", "width", "dataset", "split")
FIELDS = (*IMAGE_FIELDS, LABEL_FIELD, META_FIELD)
DEFAULT_MAX_PIXELS = 1 << 25  # 33.5 M: 8192 x 4096, 16x a Cityscapes frame
DEFAULT_MAX_MEMBER_BYTES = 64 << 20  # 64 MiB, about 20x the largest Cityscapes PNG
# Fixed tar member fields: the same input gives the same bytes on any machine, any day.
TAR_FIELDS = {"mtime": 0, "user": "cdgcnet", "group": "cdgcnet", "mode": 0o444}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG start-of-frame markers carry the size: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ShardError(RuntimeError):
    """A shard (or one of its samples) cannot be read; the message names the shard (and key)."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what one sample may cost to read and decode."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    """Pixels (width x height) of one image or label."""
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    """Bytes of one tar member (and of one source file when packing)."""

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_member_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {v!r}")

    def check_bytes(self, size: int, what: str) -> str | None:
        """None if `size` bytes are allowed, else the reason naming `what`."""
        if size > self.max_member_bytes:
            return f"{what} is {size} bytes, over the limit of {self.max_member_bytes} (max_member_bytes)"
        return None

    def check_image(self, data: bytes, what: str) -> str | None:
        """None if the PNG/JPEG header declares an allowed size, else the reason."""
        size = image_size(data)
        if size is None:
            return f"{what} has no readable PNG or JPEG header"
        w, h = size
        if w * h > self.max_pixels:
            return (
                f"{what} is {w}x{h} = {w * h} pixels, over the limit of {self.max_pixels} "
                "(max_pixels)"
            )
        return None


DEFAULT_LIMITS = Limits()


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG start-of-frame header, without decoding."""
    if data.startswith(_PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    if data.startswith(_JPEG_MAGIC):
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
                i += 2
                continue
            (length,) = struct.unpack(">H", data[i + 2 : i + 4])
            if marker in _JPEG_SOF:
                if i + 9 > len(data):
                    return None
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return w, h
            if marker == 0xDA:  # start of scan before any frame header
                return None
            i += 2 + length
    return None


def split_member(name: str) -> tuple[str, str]:
    """'KEY.label.png' -> ('KEY', 'label.png'); the field is lower-cased."""
    key, _, field = name.partition(".")
    return key, field.lower()


def unsafe_member(name: str) -> str | None:
    """Why a member name could not come from our packer, or None: the format is flat."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        return "path traversal (absolute path or '..')"
    if "/" in name:
        return "a member in a subfolder"
    if not name or name.startswith("."):
        return "an empty or hidden name"
    return None


def sample_members(key: str, image_ext: str, image: bytes, label_png: bytes, meta: dict) -> dict:
    """The dict a WebDataset TarWriter writes as one sample (members KEY.<field>)."""
    if image_ext not in IMAGE_FIELDS:
        raise ValueError(f"image type {image_ext!r} is not one of {IMAGE_FIELDS}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"sample {key}: metadata lacks {missing}")
    return {
        "__key__": key,
        image_ext: image,
        LABEL_FIELD: label_png,
        META_FIELD: json.dumps(meta, sort_keys=True).encode(),
    }


def image_field(sample: dict) -> str | None:
    """Which image member a raw sample holds (None: none)."""
    return next((f for f in IMAGE_FIELDS if f in sample), None)


def sample_where(sample: dict) -> str:
    """ "<shard>: sample <key>", how every message about a raw sample starts."""
    return f"{sample.get('__shard__', '?')}: sample {sample.get('__key__', '?')}"


def foreign_labels(label: np.ndarray, num_classes: int, ignore: int) -> list[int]:
    """The values of a uint8 train-id label that are neither a class (< num_classes) nor the
    ignore id, sorted."""
    counts = np.bincount(label.ravel(), minlength=256)
    return [v for v in np.flatnonzero(counts).tolist() if v >= num_classes and v != ignore]


def check_sample(sample: dict, limits: Limits) -> None:
    """Members complete, headers within the limits: a ShardError naming shard and key if not.

    Only headers are read, so this is safe to call on any sample before decoding it.
    """
    where = sample_where(sample)
    fields = sorted(k for k in sample if not k.startswith("__"))
    images = [f for f in IMAGE_FIELDS if f in sample]
    if len(images) != 1 or LABEL_FIELD not in sample or META_FIELD not in sample:
        raise ShardError(
            f"{where} has members {fields}, expected image + {LABEL_FIELD} + {META_FIELD}"
        )
    for name, what in ((images[0], f"image .{images[0]}"), (LABEL_FIELD, LABEL_FIELD)):
        reason = limits.check_image(sample[name], what)
        if reason:
            raise ShardError(f"{where}: {reason}")


class _HashingReader:
    """A file's read(), feeding sha256 with every byte read."""

    def __init__(self, f) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        return data

    def drain(self) -> str:
        """Read to the end; the hex digest of the whole file."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def iter_samples(
    path: str,
    *,
    limits: Limits,
    keep: Callable[[str, str], bool] = lambda key, field: True,
    on_member: Callable[[str], None] | None = None,
    sha256: str | None = None,
    size: int | None = None,
) -> Iterator[dict]:
    """Raw samples {"__key__", "__shard__", "<field>": bytes} of one shard, in tar order.

    Every member is checked before its data is read: a regular file, a flat name (no path
    traversal), one of the format's FIELDS, at most `limits.max_member_bytes`. Members for which
    ``keep(key, field)`` is False are skipped unread (their sample still appears, without that
    field). `on_member(key)` sees every member's key. With `size`, the file must have that many
    bytes (checked before reading); with `sha256`, the file is hashed as it is read and, once
    the last sample was yielded, must match. Problems are ShardErrors naming the shard (and
    key); I/O and tar format errors are raised as they come (the caller names them).
    """
    if size is not None and (found := os.stat(path).st_size) != size:
        raise ShardError(
            f"{path}: {found} bytes, the manifest says {size}: the shard changed after packing "
            "(re-pack it; python -m pipeline.verify checks a whole set)"
        )
    with open(path, "rb") as raw:
        f = _HashingReader(raw)
        yield from _samples_of_tar(path, f, limits, keep, on_member)
        if sha256 is not None and (digest := f.drain()) != sha256:
            raise ShardError(
                f"{path}: sha256 {digest[:16]}... differs from the manifest's {sha256[:16]}...: "
                "the shard changed after packing (re-pack it; python -m pipeline.verify checks "
                "a whole set)"
            )


def _samples_of_tar(path, f, limits, keep, on_member) -> Iterator[dict]:
    with tarfile.open(fileobj=f, mode="r|") as tar:
        current: dict | None = None
        for member in tar:
            name = member.name
            if not member.isfile():
                raise ShardError(f"{path}: member {name!r} is not a regular file")
            reason = unsafe_member(name)
            if reason:
                raise ShardError(f"{path}: member {name!r} is {reason}")
            key, field = split_member(name)
            if field not in FIELDS:
                raise ShardError(
                    f"{path}: sample {key}: member {name!r} is not a field of the shard format "
                    f"({', '.join(FIELDS)}); refused unread"
                )
            if on_member is not None:
                on_member(key)
            too_big = limits.check_bytes(member.size, f"member {name!r}")
            if too_big:
                raise ShardError(f"{path}: sample {key}: {too_big}")
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__shard__": path}
            if field in current:
                raise ShardError(f"{path}: sample {key} has two {field!r} members")
            if keep(key, field):
                current[field] = tar.extractfile(member).read()
            else:
                current[field] = None
        if current is not None:
            yield current


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """--max-pixels and --max-member-bytes, for the command lines that read samples."""
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help=f"refuse an image or label above this many pixels (default {DEFAULT_MAX_PIXELS})",
    )  # fmt: skip
    parser.add_argument(
        "--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
        help=f"refuse a file or shard member above this size (default {DEFAULT_MAX_MEMBER_BYTES})",
    )  # fmt: skip
