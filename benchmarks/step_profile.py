"""What a few training steps spend their time on, from torch.profiler: for the GPU lease's
trainer stage (lease/trainer_run.py), which adds `StepProbe` to launch/train.py's hooks.

The summary answers "host-bound or GPU-bound, and where": the share of the wall time the GPU was
busy (the union of its kernel, copy and memset intervals), how long the host waited in CUDA
synchronisation calls and how many it made, kernel launches per step, the top kernels by device
time and the top host ops by their own CPU time. On CPU only the host figures exist.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from launch.hooks import Hook, StepResult

TOP = 10
# CUDA runtime calls in which the host waits for the device: torch follows a copy to the host
# (.item(), .cpu()) with a stream synchronisation; cudaMemcpy (not ...Async) blocks by itself.
_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
_BLOCKING = ("cudaMemcpy",)
_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")


def busy_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (us): the time something ran."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def _per_step(x: float, steps: int) -> float:
    return round(x / steps, 3)


def device_ops(averages: Iterable[Any]) -> list[Any]:
    """Profiler key averages of device activity (kernels, copies), most device time first."""
    cpu = torch.autograd.DeviceType.CPU
    found = [e for e in averages if e.device_type != cpu and e.self_device_time_total > 0]
    return sorted(found, key=lambda e: -e.self_device_time_total)


def summarize(events: Sequence[Any], averages: Sequence[Any], steps: int, wall_s: float) -> dict:
    """The breakdown of `steps` profiled steps that took `wall_s` of wall time together.
    `events`: profiler FunctionEvents (prof.events()); `averages`: prof.key_averages()."""
    cpu = torch.autograd.DeviceType.CPU
    device = [e for e in events if e.device_type != cpu]
    waits = [
        e
        for e in events
        if e.device_type == cpu and (e.name.startswith(_WAITS) or e.name in _BLOCKING)
    ]
    wall_us = wall_s * 1e6
    wait_us = sum(e.time_range.end - e.time_range.start for e in waits)
    busy = busy_us((e.time_range.start, e.time_range.end) for e in device) if device else None
    kernels = device_ops(averages)
    host = sorted(
        (e for e in averages if e.device_type == cpu), key=lambda e: -e.self_cpu_time_total
    )
    return {
        "steps": steps,
        "wall_ms_per_step": _per_step(wall_us / 1e3, steps),
        "gpu_busy_ms_per_step": None if busy is None else _per_step(busy / 1e3, steps),
        "gpu_busy_fraction": None if busy is None else round(busy / wall_us, 4),
        "host_sync_wait_ms_per_step": _per_step(wait_us / 1e3, steps),
        "host_syncs_per_step": _per_step(len(waits), steps),
        # What is left when the host is not waiting for the GPU: Python, dispatch, launches.
        "host_busy_ms_per_step": _per_step((wall_us - wait_us) / 1e3, steps),
        "kernel_launches_per_step": _per_step(
            sum(1 for e in events if e.device_type == cpu and e.name.startswith(_LAUNCHES)),
            steps,
        ),
        "top_kernels": [
            {
                "name": e.key[:160],
                "ms_per_step": _per_step(e.self_device_time_total / 1e3, steps),
                "calls_per_step": _per_step(e.count, steps),
            }
            for e in kernels[:TOP]
        ],
        "top_host_ops": [
            {
                "name": e.key[:160],
                "self_ms_per_step": _per_step(e.self_cpu_time_total / 1e3, steps),
                "calls_per_step": _per_step(e.count, steps),
            }
            for e in host[:TOP]
        ],
    }


class StepProbe(Hook):
    """Profiles iterations first .. first + steps - 1 of a run (none when it resumes past them)
    and notes the peak device memory of the training steps, before the final evaluation and the
    export. `record()` holds both; a profiler failure is recorded, never raised."""

    def __init__(self, first: int, steps: int) -> None:
        self.first, self.steps = first, steps
        self.device: torch.device | None = None
        self.prof: Any = None
        self.t0 = 0.0
        self.profile: dict[str, Any] = {"status": "not reached"}
        self.train_peak_mb: float | None = None

    def before_train(self, trainer: Any) -> None:
        self.device = trainer.device

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self, iteration: int) -> None:
        if iteration != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device is not None and self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self._sync()
        self.prof = profile(activities=activities)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def after_step(self, step: StepResult) -> None:
        if self.prof is None or step.iteration != self.first + self.steps - 1:
            return
        self._sync()
        wall = time.perf_counter() - self.t0
        prof, self.prof = self.prof, None
        try:
            prof.__exit__(None, None, None)
            summary = summarize(prof.events(), prof.key_averages(), self.steps, wall)
            self.profile = {"status": "ok", "iterations": [self.first, step.iteration], **summary}
        except Exception as exc:  # the breakdown explains the run; it must not end it
            self.profile = {"status": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}

    def after_train(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            self.train_peak_mb = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def record(self) -> dict[str, Any]:
        return {"profile": self.profile, "train_peak_allocated_mb": self.train_peak_mb}
