"""One trainer run of the trainer stage: launch/train.py's command line in a child process
(`trainer_child`, through `launch.train.main` with a `StepProbe`), followed from the stage's
process (`run_trainer`), and what its records say: the step times, the losses, the
checkpoints."""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from benchmarks.step_profile import StepProbe
from lease import ROOT
from lease.absent import hide_absent_packages
from lease.context import Ctx


def peaks() -> dict[str, float | None]:
    """Peak memory of this process: on the device the tensors (allocated) and the caching
    allocator's hold (reserved), None on CPU; on the host the resident high-water mark
    (interpreter and libraries included)."""
    cuda, mb = torch.cuda.is_available(), 2**20
    return {
        "peak_allocated_mb": round(torch.cuda.max_memory_allocated() / mb, 1) if cuda else None,
        "peak_reserved_mb": round(torch.cuda.max_memory_reserved() / mb, 1) if cuda else None,
        "peak_rss_mb": round(common.status_mb("VmHWM"), 1),
    }


def trainer_child(result_path: str, window: str, argv: list[str]) -> int:
    """Run launch/train.py's command line in this process with a StepProbe (benchmarks/
    step_profile.py) over the iterations `window` ("FIRST:STEPS") names, then write its exit
    code, peak memory and the probe's record."""
    hide_absent_packages()
    sys.argv = [str(ROOT / "launch" / "train.py"), *argv]  # as `python launch/train.py ...`
    first, steps = (int(x) for x in window.split(":"))
    probe = StepProbe(first, steps)
    code: Any = 0
    error = None
    try:
        # Imported here, once MLflow and Ray are hidden: the trainer must not need them.
        from launch.train import main as train_main

        code = train_main(argv, hooks=[probe])
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:
        traceback.print_exc()
        code, error = 1, f"{type(exc).__name__}: {str(exc)[:400]}"
    finally:
        res = {"exit_code": code if isinstance(code, int) else 1, "error": error, **peaks()}
        res.update(probe.record())
        Path(result_path).write_text(json.dumps(res))
    return res["exit_code"]


def run_trainer(
    ctx: Ctx, run_dir: Path, argv: list[str], on_iteration: Callable[[list[dict]], None]
) -> dict[str, Any]:
    """launch/train.py in a child (see trainer_child); follows run_dir/metrics.jsonl to time
    each iteration by when its record appears (the trainer appends one line per iteration)."""
    result_path = ctx.work / f"{run_dir.name}.result.json"
    window = "{}:{}".format(*ctx.sizes.profile_at)
    cmd = [sys.executable, "-m", "lease", "--trainer-child", str(result_path)]
    proc = subprocess.Popen([*cmd, window, "--", *argv], cwd=ROOT)
    metrics = run_dir / "metrics.jsonl"
    t0 = time.time()
    rows: list[dict] = []
    seen = reported = 0
    timed_out = False
    while True:
        code = proc.poll()
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            now = time.time()
            for line in lines[seen:]:
                if not line.endswith("}"):
                    break  # a line still being written
                rec = json.loads(line)
                rows.append({**rec, "t_s": round(now - t0, 3)})
                seen += 1
            if len(rows) > reported:
                on_iteration(rows)
                reported = len(rows)
        if code is not None:
            break
        if ctx.left() < 5:
            proc.kill()
            timed_out = True
        time.sleep(0.01)
    res = json.loads(result_path.read_text()) if result_path.is_file() else {}
    res.setdefault("exit_code", proc.returncode)
    res["seconds"] = round(time.time() - t0, 1)
    res["timed_out"] = timed_out
    res["iterations"] = rows
    return res


def step_summary(rows: list[dict], skip: set[int], warmup: int) -> dict[str, Any]:
    """Median step time after warm-up from the record arrival times (iterations in `skip`
    follow a checkpoint save and are left out)."""
    dts = []
    for prev, cur in itertools.pairwise(rows):
        it = cur["iteration"]
        if it > warmup and it not in skip and it == prev["iteration"] + 1:
            dts.append(1e3 * (cur["t_s"] - prev["t_s"]))
    if not dts:
        return {"step_ms_median": None, "steps_timed": 0}
    waits = [r["data_wait_fraction"] for r in rows if r["iteration"] > warmup]
    return {
        "step_ms_median": round(statistics.median(dts), 1),
        "step_ms_min": round(min(dts), 1),
        "step_ms_max": round(max(dts), 1),
        "steps_timed": len(dts),
        "data_wait_fraction_median": round(statistics.median(waits), 4) if waits else None,
    }


def loss_summary(rows: list[dict]) -> dict[str, Any]:
    totals = [r["loss"].get("total") for r in rows]
    finite = all(r["finite"] for r in rows) and all(t is not None for t in totals)
    k = max(1, len(totals) // 4)
    first, last = statistics.mean(totals[:k]), statistics.mean(totals[-k:])
    return {
        "losses_finite": finite,
        "loss_total_first": round(first, 4),
        "loss_total_last": round(last, 4),
        "loss_falling": last < first,
        "loss_total": [round(t, 4) for t in totals],
    }


def checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    root = run_dir / "checkpoints"
    for tag in sorted(root.glob("iter_*")) if root.is_dir() else []:
        size = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
        out.append(
            {"tag": tag.name, "complete": (tag / "COMPLETE").is_file(), "mb": round(size / 2**20)}
        )
    return out
