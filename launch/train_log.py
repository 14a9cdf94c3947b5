"""What a training run records, on rank 0: the run directory's files (config.json,
ds_config.json, launch.txt, metrics.jsonl, eval.jsonl), the MLflow run (launch.tracking), the
console and the progress bar. It logs what the step and the evaluation measured; it runs nothing.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cdgcnet.metrics import ConfusionMatrix
from launch.config import TrainConfig, to_dict
from launch.distributed import WorldInfo
from launch.hooks import Hook, StepResult, say
from launch.tracking import Tracker
from pipeline.atomic import write_atomic


def read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """The records of a metrics.jsonl / eval.jsonl (JSON objects with an integer "iteration")
    and the numbers of the lines that are not (a last line torn by a kill)."""
    records, torn = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                ok = isinstance(rec, dict) and type(rec.get("iteration")) is int
            except ValueError:  # JSONDecodeError, UnicodeDecodeError
                ok = False
            if ok:
                records.append(rec)
            else:
                torn.append(number)
    return records, torn


class LoaderWatch:
    """The share of each step spent waiting for the next batch, and one warning when the data
    loader holds training up: the median share over `window` steps (after the first `skip`,
    which include the workers' start) above `threshold`."""

    def __init__(
        self, num_workers: int, window: int = 50, threshold: float = 0.10, skip: int = 5
    ) -> None:
        self.num_workers = num_workers
        self.window, self.threshold, self.skip = window, threshold, skip
        self.shares: list[float] = []
        self.seen = 0
        self.warned = False

    def add(self, wait_s: float, step_s: float) -> str | None:
        """Record one step; return the warning the first time the loader is the bottleneck."""
        self.seen += 1
        if self.seen <= self.skip or self.warned:
            return None
        self.shares = [*self.shares[-(self.window - 1) :], wait_s / max(step_s, 1e-9)]
        if len(self.shares) < self.window:
            return None
        median = sorted(self.shares)[len(self.shares) // 2]
        if median <= self.threshold:
            return None
        self.warned = True
        return (
            f"the data loader holds training up: the median step waited {median:.0%} of its "
            f"time for the next batch over the last {self.window} steps; raise "
            f"data.num_workers (now {self.num_workers}) if the machine has idle CPU cores"
        )


class ProgressLines:
    """Progress as plain lines, for output that is not a terminal (where a bar's every update
    would be a line): one line per tenth of the run, or after `max_quiet_s` without one."""

    def __init__(self, total: int, start: int, max_quiet_s: float = 600.0) -> None:
        self.total, self.start = total, start
        self.every = max(1, total // 10)
        self.max_quiet_s = max_quiet_s
        self.t0 = self.last = time.monotonic()

    def step(self, step: StepResult, images_per_s: float) -> None:
        it, now = step.iteration, time.monotonic()
        if not (it % self.every == 0 or it == self.total or now - self.last > self.max_quiet_s):
            return
        self.last = now
        done = it - self.start
        eta = (now - self.t0) / done * (self.total - it) if done else 0.0
        print(
            f"iteration {it}/{self.total}: loss {step.losses.get('total', float('nan')):.4f}, "
            f"lr {step.lr:.2e}, {images_per_s:.1f} img/s, {eta / 60:.1f} min left",
            flush=True,
        )


class TrainLog(Hook):
    """Rank-0 records of one run; every rank holds one (only rank 0's writes)."""

    def __init__(self, cfg: TrainConfig, world: WorldInfo, run_dir: Path) -> None:
        self.cfg, self.world, self.run_dir = cfg, world, run_dir
        self.main = world.is_main
        self.tracker = Tracker(cfg, enabled=world.is_main)
        self.watch = LoaderWatch(cfg.data.num_workers)
        self.images_per_iter = 0
        self.trainer = None  # set by before_train: the engine, device and non-finite count
        self.bar = None
        self.lines: ProgressLines | None = None

    def write_config(self, start: int, ds_config: dict) -> None:
        """The resolved config in the run dir (and one console line saying where; MLflow gets it
        as config.yaml); records past `start` dropped."""
        if not self.main:
            return
        path = self.run_dir / "config.json"
        write_atomic(path, json.dumps(to_dict(self.cfg), indent=1))
        print(f"run dir {self.run_dir}: resolved config in {path.name}", flush=True)
        write_atomic(self.run_dir / "ds_config.json", json.dumps(ds_config, indent=1))
        self._trim_jsonl(start)

    def start(self, ds_config: dict, resume_run_id: str | None, launch_text: str) -> None:
        """Open (or reopen) the MLflow run and record how the job was launched."""
        self.tracker.start(
            self.cfg.logging.run_name, ds_config=ds_config, resume_run_id=resume_run_id
        )
        if self.main:
            write_atomic(self.run_dir / "launch.txt", launch_text)
            self.tracker.log_text(launch_text, "launch.txt")

    def _trim_jsonl(self, start: int) -> None:
        """Drop records past the resumed iteration (a killed run may have logged further), and
        lines that are not records (the last one torn by a kill), with a warning."""
        for name in ("metrics.jsonl", "eval.jsonl"):
            f = self.run_dir / name
            if not f.exists():
                continue
            if start == 0:
                f.unlink()
                continue
            records, torn = read_jsonl(f)
            keep = [json.dumps(r) for r in records if r["iteration"] <= start]
            if torn:
                lines = ", ".join(map(str, torn[:3])) + (" ..." if len(torn) > 3 else "")
                print(
                    f"warning: {f}: dropped {len(torn)} unreadable line(s) (line {lines}: a write "
                    "cut short by a kill)",
                    file=sys.stderr,
                    flush=True,
                )
            write_atomic(f, "".join(ln + "\n" for ln in keep))

    def before_train(self, trainer) -> None:
        from tqdm import tqdm

        self.trainer = trainer
        self.images_per_iter = self.cfg.data.batch_size * self.world.world_size * trainer.accum
        show = self.main and self.cfg.runtime.progress
        self.bar = tqdm(
            total=self.cfg.schedule.iterations,
            initial=trainer.state.start,
            desc="train",
            dynamic_ncols=True,
            disable=None if show else True,  # None: a bar on a terminal only
        )
        # Not on a terminal (a log file, CI): one line every tenth of the run or 10 minutes.
        self.lines = (
            ProgressLines(self.cfg.schedule.iterations, trainer.state.start)
            if (show and self.bar.disable)
            else None
        )

    def after_step(self, step: StepResult) -> None:
        images_per_s = self.images_per_iter / step.seconds
        wait_share = step.wait_seconds / step.seconds
        if self.main:
            self._append("metrics.jsonl", self._record(step, wait_share))
            if self._mlflow_due(step):
                self.tracker.log_metrics(
                    self._metrics(step, images_per_s, wait_share), step.iteration
                )
        warning = self.watch.add(step.wait_seconds, step.seconds)
        if warning:
            say(self.world, f"iteration {step.iteration}: {warning}")
        if self.lines is not None:
            self.lines.step(step, images_per_s)
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{step.losses.get('total', float('nan')):.4f}",
            lr=f"{step.lr:.2e}",
            img_s=f"{images_per_s:.1f}",
        )

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _record(self, step: StepResult, wait_share: float) -> dict:
        return {
            "iteration": step.iteration,
            "lr": step.lr,
            "finite": step.finite,
            "loss": step.losses,
            "nonfinite_total": self.trainer.nonfinite.total,
            "data_wait_fraction": round(wait_share, 4),
        }

    def _mlflow_due(self, step: StepResult) -> bool:
        return not step.finite or self._due(step.iteration)

    def _due(self, it: int) -> bool:
        return it % self.cfg.logging.every == 0 or it == self.cfg.schedule.iterations

    def logs_grad_norm(self, it: int) -> bool:
        """Whether MLflow records train/grad_norm at iteration `it` (the same on every rank)."""
        return self.cfg.logging.enabled and self._due(it)

    def _metrics(self, step: StepResult, images_per_s: float, wait_share: float) -> dict:
        out = {f"train/loss/{k}": v for k, v in step.losses.items() if math.isfinite(v)}
        out.update(
            {
                "train/lr": step.lr,
                "train/images_per_s": images_per_s,
                "train/data_wait_fraction": wait_share,
                "train/nonfinite_skipped": self.trainer.nonfinite.total,
            }
        )
        norm = self.trainer.engine.get_global_grad_norm() if step.finite else None
        if norm is not None and math.isfinite(float(norm)):
            out["train/grad_norm"] = float(norm)
        device = self.trainer.device
        if device.type == "cuda":
            out["train/memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            out["train/memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return out

    def log_evaluation(
        self,
        cm: ConfusionMatrix,
        metrics: dict,
        pictures: Sequence[tuple[str, dict[str, np.ndarray]]],
        class_names: Sequence[str],
    ) -> None:
        """One evaluation's metrics, IoU table, confusion plot, pictures and eval.jsonl line."""
        if not self.main:
            return
        it = metrics["iteration"]
        self.tracker.log_evaluation(cm, class_names, step=it)
        if pictures:
            self.tracker.log_pictures(pictures, step=it)
        print(
            f"iteration {it}: val mIoU {metrics['miou']:.4f}, "
            f"pixel accuracy {metrics['pixel_accuracy']:.4f}",
            flush=True,
        )
        self._append("eval.jsonl", metrics)

    def _append(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")
