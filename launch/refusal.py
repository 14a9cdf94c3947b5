"""How a run that is refused ends: one line `error: ...` on stderr, exit status 2, from one rank.

A refusal is an exception that means "the input is wrong", not "the program is wrong": a bad
config, a checkpoint or shard that is damaged or unsafe, unusable pretrained weights, labels
outside the label set, a run dir held by another run, a full disk (`user_errors`). It may come
before the process group exists (every rank meets the same config: rank 0 speaks) or after it,
on some ranks only (a shard one rank reads). After, the ranks that meet it race for a counter in
the process group's store; the first speaks, the others stay quiet. A rank that ends for another
reason (its peer's exit broke a collective, the launcher's SIGTERM) looks at the counter and
exits quietly with status 2 when some rank refused. No traceback is printed for a refusal.

DataLoader workers re-raise a worker's exception in the main process with the worker's
traceback in its message; `one_line` takes the original message back out of it.
"""

from __future__ import annotations

import datetime
import errno
import re
import sys

from launch.bounded import clip
from launch.distributed import WorldInfo

EXIT_USAGE = 2
_COUNTER = "cdgcnet/refusals"
_STORE_TIMEOUT = datetime.timedelta(seconds=10)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are refusals (imported when needed: each module is heavy)."""
    from cdgcnet.pretrained import PretrainedWeightsError
    from cdgcnet.torch_files import TorchFileError
    from launch.checkpoint import CheckpointError
    from launch.config import ConfigError
    from launch.evaluation import LabelError
    from launch.run_lock import RunDirBusy
    from pipeline.atomic import DiskFullError
    from pipeline.manifest import ManifestError
    from pipeline.shards import ShardError

    return (
        ConfigError, CheckpointError, ShardError, ManifestError, LabelError,
        PretrainedWeightsError, TorchFileError, RunDirBusy, DiskFullError,
    )  # fmt: skip


def is_refusal(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, user_errors())


def one_line(exc: BaseException) -> str:
    """The exception's message as one line (a DataLoader worker's original message; a full disk
    named as one)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) and exc.filename:
        from pipeline.atomic import DiskFullError

        if not isinstance(exc, DiskFullError):
            return f"{exc.filename}: writing failed: the disk is full (no space left on device)"
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        text = re.sub(r"^[\w.]+: ", "", last.strip())
    return clip(text, 2000)


def _store():
    """The process group's store when several ranks share one, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(_STORE_TIMEOUT)
        return store
    except Exception:
        return None


def _count(store, add: int) -> int | None:
    """The refusal counter after adding `add`; None when the store is gone (rank 0 ended)."""
    try:
        return int(store.add(_COUNTER, add))
    except Exception:
        return None


def report(exc: BaseException, world: WorldInfo) -> int:
    """Print `error: <one line>` if this rank is the one to speak; EXIT_USAGE."""
    store = _store()
    # No group yet: every rank meets the same refusal and rank 0 speaks. With one, the first to
    # count speaks (None: the store went with rank 0, which spoke).
    speak = world.is_main if store is None else _count(store, 1) == 1
    if speak:
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def exit_code(exc: BaseException, world: WorldInfo) -> int | None:
    """The exit status of a run that ends with `exc`, having printed what to print; None when
    `exc` is for the caller to handle (an interruption, a bug: re-raise it)."""
    if is_refusal(exc):
        return report(exc, world)
    store = _store()
    if store is None:
        return None
    count = _count(store, 0)
    if count:
        return EXIT_USAGE  # another rank refused; this one ended on its way out
    if count is None and not world.is_main and _peer_gone(exc):
        return 1  # rank 0 ended and said why (a refusal or its traceback)
    return None


def _peer_gone(exc: BaseException) -> bool:
    """An error that a peer's exit causes in a collective (gloo/NCCL/the store)."""
    import torch.distributed as dist

    if isinstance(exc, KeyboardInterrupt):
        return False  # Ctrl-C: the caller's interruption line and status
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(
        s in text
        for s in ("Connection closed by peer", "Connection reset", "Broken pipe", "gloo", "NCCL")
    )
