"""The body of one stage's process (`python -m lease --stage NAME`, started by the supervisor in
its own process group): it hides MLflow and Ray, runs the stage's function and records how it
ended in `stages.<name>.status`; it ends its whole group once the lease process is gone."""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from collections.abc import Callable

from lease.absent import hide_absent_packages
from lease.context import Ctx
from lease.results import record


def stage_function(name: str) -> Callable[[Ctx], None]:
    """The stage's function. Imported here, once MLflow and Ray are hidden, and only the one
    stage: a stage whose imports fail on the image (a missing wheel) must not stop the others.
    """
    if name == "env":
        from lease.env import stage_env as run
    elif name == "gpu_tests":
        from lease.gpu_tests import stage_gpu_tests as run
    elif name == "cdgc":
        from lease.cdgc import stage_cdgc as run
    elif name == "trainer":
        from lease.trainer import stage_trainer as run
    elif name == "train_step":
        from lease.train_step import stage_train_step as run
    elif name == "extras":
        from lease.extras import stage_extras as run
    else:
        raise ValueError(f"no stage {name!r}")
    return run


def _die_with_parent() -> None:
    """End this stage's whole process group (trainer, loader workers, pytest) once the lease
    process is gone: a kill of the command must not leave a stage running on the machine."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def stage_main(name: str, ctx: Ctx) -> int:
    """One stage in this (child) process; its section of lease.json says how it ended."""
    _die_with_parent()
    hide_absent_packages()
    t0 = time.time()
    record(ctx.out, name, {"status": "running"})
    try:
        stage_function(name)(ctx)
    except Exception as exc:
        traceback.print_exc()
        msg = f"failed: {type(exc).__name__}: {str(exc)[:400]}"
        record(ctx.out, name, {"status": msg, "seconds": round(time.time() - t0, 1)})
        return 1
    record(ctx.out, name, {"status": "ok", "seconds": round(time.time() - t0, 1)})
    return 0
