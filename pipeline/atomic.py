"""Files that appear whole or not at all: written under a temporary name in the target's folder,
flushed to disk, then renamed over the target (a rename within one filesystem is atomic).

The one helper for every file this project writes outside the shard streams: manifests, configs,
jsonl trims, exports, pictures, benchmark results. It lives in `pipeline/`, the lowest layer that
writes files, so that `pipeline`, `launch`, `sweeps` and `benchmarks` can all import it. The file
gets the process's normal permissions (umask), not the 0600 of `tempfile.mkstemp`.

A write that fails because the disk is full raises DiskFullError, whose message names the path
and says so (torch's C++ writer reports a full disk as "unexpected pos" or "basic_ios::clear";
`disk_full` recognises those by the free space left). The target is left as it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FULL_DISK_BYTES = 64 << 20
"""Below this much free space after a failed write, the failure is taken for a full disk."""


class DiskFullError(OSError):
    """Writing `path` failed because its filesystem is full (or over quota); one line."""

    def __init__(self, path: str | os.PathLike, hint: str = "free space and rerun") -> None:
        path = Path(path)
        super().__init__(errno.ENOSPC, "No space left on device", str(path))
        self.message = (
            f"{path}: writing failed: the disk is full (no space left on the device holding "
            f"{path.parent}); {hint}"
        )

    def __str__(self) -> str:
        return self.message


def disk_full(exc: BaseException, where: str | os.PathLike) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain, or (torch's C++ writer reports neither)
    almost no space left at `where`."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(where).free < FULL_DISK_BYTES
    except OSError:
        return False


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit fsync it and rename it to `path`,
    on an error remove it (the target is left as it was). A full disk is a DiskFullError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed it without syncing
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if not isinstance(e, DiskFullError) and disk_full(e, path.parent):
            raise DiskFullError(path) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes (or UTF-8 text) to `path` atomically."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    """Write `obj` as JSON (one trailing newline) to `path` atomically."""
    write_atomic(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")
