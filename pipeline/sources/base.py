"""What every dataset reader shares: the sample record, errors, and the image/label decoders.

A reader lists a split as `SourceSample`s in a deterministic order; `load_sample` then reads
one sample, decodes the image once (to validate it and learn its size), reads the label in the
dataset's source-id space and checks it. Every problem is a `SampleError` naming the file.

Source trees are untrusted too: a file must be a regular file (a FIFO, socket or device named
like an image is refused from its `stat`, never opened, so it cannot hang the packer), no larger
than `Limits.max_member_bytes`, and an image or PNG label may not declare more than
`Limits.max_pixels` in its header (checked before decoding). libjpeg reports damaged JPEG data
on the process's stderr and decodes anyway; those messages are caught and the file refused.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.shards import DEFAULT_LIMITS, Limits

# OpenCV prints its own warnings for broken files; we report them ourselves, naming the file.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_JPEG_SOS = b"\xff\xda"
# What libjpeg prints (and then decodes anyway, filling the damage with grey) for a broken file.
_LIBJPEG_DAMAGE = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid JPEG")


class SourceError(ValueError):
    """The --src folder is empty or not laid out as the dataset expects."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # keeps the two fields when the error crosses a process (Ray)
        return (type(self), (self.path, self.reason))


class SampleError(ValueError):
    """One file of one sample is missing or invalid."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


LabelReader = Callable[[Path, Limits], np.ndarray]


@dataclass(frozen=True)
class SourceSample:
    """One (image, label) pair of a split, as found in the source layout.

    `read_label(path, limits)` is a module-level function (so the record pickles to Ray workers)
    that returns the label as a (H, W) uint8 array of source ids in the space of the dataset's
    label table.
    """

    key: str
    image_path: Path
    label_path: Path
    read_label: LabelReader


@dataclass(frozen=True)
class DatasetSource:
    """One original layout: how to list its splits and which source ids its labels may hold.

    Which label table maps those ids, which splits are packed by default and how the layout is
    generated are the dataset's facts (pipeline.datasets.DatasetSpec): `scenes` is read with
    the Cityscapes layout, for instance.
    """

    name: str  # the layout: cityscapes | voc | cocostuff10k | cocostuff164k | ade20k
    known_splits: tuple[str, ...]
    list_split: Callable[[Path, str], list[SourceSample]]
    valid_ids: frozenset[int]  # source ids a label pixel may take (others are an error)
    layout: str  # one-line description for error messages

    def valid_mask(self) -> np.ndarray:
        """(256,) bool: which uint8 source values are in the table."""
        mask = np.zeros(256, dtype=bool)
        mask[sorted(self.valid_ids)] = True
        return mask


@dataclass
class LoadedSample:
    """A validated sample: the untouched image bytes and the label in source ids."""

    image_bytes: bytes
    image_ext: str  # "png" | "jpg"
    height: int
    width: int
    source_ids: np.ndarray  # (H, W) uint8


def make_key(name: str) -> str:
    """A WebDataset key from a file stem: dots and slashes would split it into fields."""
    return name.replace(".", "_").replace("/", "_")


_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def read_bytes(path: Path, what: str, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """A regular file's bytes, refusing other file types (from stat, unopened) and big files."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SampleError(path, f"{what} file is missing") from None
    except OSError as e:
        raise SampleError(path, f"cannot read {what} file: {e.strerror or e}") from None
    kind = _not_regular(st.st_mode)
    if kind:
        raise SampleError(path, f"{what} path is {kind}, not a regular file")
    too_big = limits.check_bytes(st.st_size, f"{what} file")
    if too_big:
        raise SampleError(path, too_big)
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, open does not wait
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            kind = _not_regular(os.fstat(f.fileno()).st_mode)
            if kind:
                raise SampleError(path, f"{what} path is {kind}, not a regular file")
            data = f.read(limits.max_member_bytes + 1)
    except OSError as e:
        raise SampleError(path, f"cannot read {what} file: {e.strerror or e}") from None
    if not data:
        raise SampleError(path, f"{what} file is empty")
    too_big = limits.check_bytes(len(data), f"{what} file")
    if too_big:  # it grew since the stat
        raise SampleError(path, too_big)
    return data


def check_pixels(path: Path, data: bytes, what: str, limits: Limits) -> None:
    """Refuse an image whose header declares more than limits.max_pixels (before decoding)."""
    reason = limits.check_image(data, what)
    if reason:
        raise SampleError(path, reason)


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Collect what native code (libjpeg) writes to file descriptor 2 meanwhile.

    Yields a list that holds the text once the block ends. Python-level sys.stderr is flushed
    first so nothing of ours is caught.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    out: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read(1 << 16).decode("utf-8", "replace"))


def _decode_jpeg(path: Path, data: bytes) -> np.ndarray | None:
    """cv2.imdecode of a JPEG, refusing the file when libjpeg reports damaged data."""
    with _native_stderr() as printed:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    text = printed[0].strip()
    damage = [line for line in text.splitlines() if line.startswith(_LIBJPEG_DAMAGE)]
    if damage:
        raise SampleError(path, f"corrupt JPEG: libjpeg says {damage[0]!r}")
    if text:  # anything else native code said: pass it on, naming the file
        print(f"{path}: {text}", file=sys.stderr)
    return img


def image_format(data: bytes) -> str | None:
    """'png' or 'jpg' from the magic bytes, else None."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpg"
    return None


def check_complete(path: Path, data: bytes, fmt: str) -> None:
    """Catch truncation that decoders may not report (libjpeg pads a cut JPEG with grey).

    PNG: the IEND chunk (8 bytes with its CRC) must be in the last 4 KiB, as some writers
    append data after it. JPEG: an end-of-image marker must follow the last start-of-scan
    marker; entropy-coded data cannot contain either (0xFF bytes are stuffed), and bytes
    after the end marker are allowed.
    """
    if fmt == "png" and _PNG_IEND not in data[-4096:]:
        raise SampleError(path, "truncated PNG (no IEND chunk at the end)")
    if fmt == "jpg":
        sos = data.rfind(_JPEG_SOS)
        if sos < 0 or data.find(_JPEG_EOI, sos) < 0:
            raise SampleError(path, "truncated JPEG (no end-of-image marker after the last scan)")


def decode_image(path: Path, data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[str, int, int]:
    """Validate image bytes by decoding them once; return (ext, height, width)."""
    fmt = image_format(data)
    if fmt is None:
        raise SampleError(path, "not a PNG or JPEG file (unknown magic bytes)")
    check_complete(path, data, fmt)
    check_pixels(path, data, "image", limits)
    if fmt == "jpg":
        img = _decode_jpeg(path, data)
    else:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise SampleError(path, f"corrupt {fmt.upper()}: OpenCV cannot decode it")
    h, w = img.shape[:2]
    return fmt, h, w


def read_png_ids(path: Path, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """A single-channel 8-bit PNG of ids (Cityscapes labelIds, COCO-Stuff 164k maps)."""
    data = read_bytes(path, "label", limits)
    if image_format(data) != "png":
        raise SampleError(path, "label is not a PNG file")
    check_complete(path, data, "png")
    check_pixels(path, data, "label", limits)
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise SampleError(path, "corrupt PNG: OpenCV cannot decode it")
    if arr.ndim != 2:
        raise SampleError(
            path,
            f"label has {arr.shape[2]} channels (RGB/colour label?); one channel of ids expected",
        )
    if arr.dtype != np.uint8:
        raise SampleError(path, f"label is {arr.dtype}, 8-bit ids expected")
    return arr


def read_palette_png(path: Path, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """A palette (or grayscale) PNG whose pixel indices are the ids (VOC SegmentationClass).

    OpenCV expands palettes to colours, so Pillow reads the indices.
    """
    from PIL import Image

    data = read_bytes(path, "label", limits)
    if image_format(data) != "png":
        raise SampleError(path, "label is not a PNG file")
    check_complete(path, data, "png")
    check_pixels(path, data, "label", limits)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("P", "L"):
                raise SampleError(
                    path, f"label is a {im.mode} image; one channel of palette indices expected"
                )
            arr = np.array(im, dtype=np.uint8)
    except SampleError:
        raise
    except Exception as e:  # Pillow raises several types for broken files
        raise SampleError(path, f"corrupt PNG: {e}") from None
    return arr


def load_mat_field(
    path: Path, field: str, sub: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> np.ndarray:
    """``mat[field]`` or ``mat[field].sub`` from a MATLAB .mat file, as a 2-D integer array."""
    import scipy.io

    data = read_bytes(path, "label", limits)  # file type, size, empty: the usual messages
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises ValueError/TypeError/MatReadError for broken files
        raise SampleError(path, f"corrupt .mat file: {e}") from None
    if field not in mat:
        raise SampleError(path, f".mat file has no variable {field!r}")
    value = mat[field]
    name = field
    if sub is not None:
        if not hasattr(value, sub):
            raise SampleError(path, f".mat variable {field!r} has no field {sub!r}")
        value = getattr(value, sub)
        name = f"{field}.{sub}"
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise SampleError(path, f"{name} has shape {arr.shape}; a 2-D label map expected")
    is_int = np.issubdtype(arr.dtype, np.integer)
    if not is_int and (not np.issubdtype(arr.dtype, np.floating) or np.any(arr != np.round(arr))):
        raise SampleError(path, f"{name} is {arr.dtype}, integer ids expected")
    return arr


def to_uint8_ids(path: Path, arr: np.ndarray, what: str) -> np.ndarray:
    """Integer ids -> uint8, refusing values that would wrap."""
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 255:
        raise SampleError(path, f"{what} values {lo}..{hi} outside 0..255 (outside the table)")
    return arr.astype(np.uint8)


def load_sample(sample: SourceSample, limits: Limits = DEFAULT_LIMITS) -> LoadedSample:
    """Read and validate one sample; the image is decoded exactly once."""
    image_bytes = read_bytes(sample.image_path, "image", limits)
    ext, h, w = decode_image(sample.image_path, image_bytes, limits)
    ids = sample.read_label(sample.label_path, limits)
    if ids.shape != (h, w):
        raise SampleError(
            sample.label_path,
            f"label is {ids.shape[1]}x{ids.shape[0]} but image {sample.image_path.name} is {w}x{h}",
        )
    return LoadedSample(image_bytes, ext, h, w, ids)


def require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise SourceError(path, f"folder missing; expected layout: {layout}")
    return path


def read_id_list(path: Path, layout: str, allow_empty: bool = False) -> list[str]:
    """A split list file (one id per line); blank lines ignored, duplicates refused."""
    if not path.is_file():
        raise SourceError(path, f"split list missing; expected layout: {layout}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids and not allow_empty:
        raise SourceError(path, "split list is empty")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise SourceError(path, f"split list repeats ids {dup}")
    return ids
