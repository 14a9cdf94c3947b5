"""One writer per run directory: rank 0 holds an OS file lock on `<run_dir>/.lock` for the run's
life; a second training run on the same directory is refused in one line naming the holder.

The lock is `flock(LOCK_EX | LOCK_NB)` on an open file, so the kernel releases it whenever the
holder ends: a normal exit, an exception, Ctrl-C, SIGKILL, a machine reboot. A lock file left
behind by a dead process is therefore never in the way (its record is simply overwritten). The
file records the holder's pid, host and start time, which the refusal quotes. Processes forked
without exec (DataLoader workers) share the lock while they live; they end with their parent.
The file is not removed on release (removing it would let two runs lock two different files).
On NFS, flock works between machines on Linux >= 2.6.12 (as an NFS byte-range lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from launch.distributed import WorldInfo, all_gather_object

LOCK_NAME = ".lock"


class RunDirBusy(RuntimeError):
    """Another process holds the run directory; the message names its pid and host."""


def _holder(fd: int) -> dict:
    """The record the holder wrote (it may still be writing it: a few tries)."""
    for _ in range(5):
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        with contextlib.suppress(ValueError):
            record = json.loads(raw)
            if isinstance(record, dict):
                return record
        time.sleep(0.05)
    return {}


def _describe(record: dict) -> str:
    pid, host = record.get("pid", "?"), record.get("host", "?")
    since = record.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if since else ""
    text = f"pid {pid} on host {host}{when}"
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        text += f" (pid {pid} has ended; a process it started still holds the lock)"
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(run_dir: str | os.PathLike) -> int:
    """Lock run_dir (created if needed) for this process; the lock's file descriptor. RunDirBusy
    when another process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirBusy(
            f"run dir {run_dir} is in use by {_describe(holder)}: one training run writes a "
            f"run dir at a time; wait for it, stop it, or give another --run-dir"
        ) from None
    except OSError:
        os.close(fd)
        raise
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.time(),
        "argv": " ".join(sys.argv)[:500],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def release(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # closing the last descriptor of the open file releases the flock


class RunDirClaim:
    """Rank 0's hold on a run dir, taken when made (before the process group, so that a world
    of one is refused at once) and released on leaving the `with` block. `confirm()` is
    collective: every rank raises RunDirBusy, with rank 0's message, when the dir is taken."""

    def __init__(self, run_dir: str | os.PathLike, world: WorldInfo) -> None:
        self.fd: int | None = None
        self.refusal: str | None = None
        if world.is_main:
            try:
                self.fd = acquire(run_dir)
            except RunDirBusy as e:
                if world.world_size == 1:
                    raise
                self.refusal = str(e)  # the other ranks hear it in confirm()

    def confirm(self) -> None:
        refusal = all_gather_object(self.refusal)[0]
        if refusal is not None:
            raise RunDirBusy(refusal)

    def release(self) -> None:
        if self.fd is not None:
            release(self.fd)
            self.fd = None

    def __enter__(self) -> RunDirClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
