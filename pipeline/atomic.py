"""Files that appear whole or not at all: written under a temporary name in the target's folder,
flushed to disk, then renamed over the target (a rename within one filesystem is atomic).

The one helper for every file this project writes outside the shard streams: manifests, configs,
jsonl trims, exports, pictures, benchmark results. It lives in `pipeline/`, the lowest layer that
writes files, so that `pipeline`, `launch`, `sweeps` and `benchmarks` can all import it. The file
gets the process's normal permissions (umask), not the 0600 of `tempfile.mkstemp`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit fsync it and rename it to `path`,
    on an error remove it (the target is left as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed it without syncing
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
