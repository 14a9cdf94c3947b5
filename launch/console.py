"""What a training run prints, and what it leaves off the console (and why).

- Library chatter that says nothing about this run: DeepSpeed's "You are using ZeRO with an
  untested optimizer" (DeepSpeed tests ZeRO with its own optimizers; this project trains with
  torch.optim.SGD, the paper's optimizer, whose ZeRO 1/2/3 training the launch tests cover) and
  MLflow's "Creating initial MLflow database tables..." on a new store.
- A failure: one line per failure however many ranks meet it. The first rank to fail says
  `error: <what happened>` and where its traceback is (`<run_dir>/error-rank<k>.log`); ranks
  that fail after it (or are stopped because of it) write their traceback and say nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import sys
import traceback
from pathlib import Path

import torch

FAILURES_KEY = "cdgcnet/failures"  # a counter in the process group's store


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_libraries() -> None:
    """Leave the library messages above off the console (idempotent)."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropMessages) for f in ds.filters):
        ds.addFilter(_DropMessages("untested optimizer"))


def _store():
    """The process group's key-value store, or None without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    store.set_timeout(datetime.timedelta(seconds=5))
    return store


def _count_failure(increment: int) -> int | None:
    """Add to the failure counter; its new value, None when there is no store to ask (no
    process group, or the rank that held the store is gone)."""
    try:
        store = _store()
        return None if store is None else int(store.add(FAILURES_KEY, increment))
    except Exception:
        return None


def peer_failed() -> bool:
    """Whether some rank has reported a failure (then a stop is its consequence)."""
    return bool(_count_failure(0))


def report_failure(error: BaseException, run_dir: str | Path, rank: int, world_size: int) -> None:
    """Write this rank's traceback to the run dir; print one `error:` line if this rank is the
    first to fail."""
    log = Path(run_dir) / f"error-rank{rank}.log"
    where = f"traceback in {log}"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(error)))
    except OSError:
        where = "no traceback file: the run dir is not writable"
    count = _count_failure(1)
    if count is not None and count > 1:
        return  # a peer failed first and said so
    who = f"rank {rank}: " if world_size > 1 else ""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    with contextlib.suppress(OSError):
        print(f"error: {who}{text} ({where})", file=sys.stderr, flush=True)
