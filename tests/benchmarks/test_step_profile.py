"""benchmarks/step_profile.py: the profile summary from device and host events."""

from __future__ import annotations

from types import SimpleNamespace as NS

import torch

from benchmarks import step_profile


def test_profile_summary_from_device_and_host_events() -> None:
    assert step_profile.busy_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25.0
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(name, device, start, end):
        return NS(name=name, device_type=device, time_range=NS(start=start, end=end))

    events = [
        ev("aten::mm", cpu, 0, 100),
        ev("cudaLaunchKernel", cpu, 10, 12),
        ev("cudaLaunchKernel", cpu, 20, 22),
        ev("cudaStreamSynchronize", cpu, 30, 90),
        ev("cudaMemcpyAsync", cpu, 92, 93),  # an async copy: no wait
        ev("gemm_kernel", cuda, 12, 60),
        ev("Memcpy DtoH", cuda, 50, 80),
    ]

    def avg(key, device, self_cpu=0.0, self_dev=0.0, count=1):
        return NS(key=key, device_type=device, self_cpu_time_total=self_cpu,
                  self_device_time_total=self_dev, count=count)  # fmt: skip

    averages = [
        avg("aten::mm", cpu, self_cpu=40.0),
        avg("cudaLaunchKernel", cpu, self_cpu=4.0, count=2),
        avg("gemm_kernel", cuda, self_dev=48.0),
        avg("Memcpy DtoH", cuda, self_dev=30.0),
    ]
    got = step_profile.summarize(events, averages, steps=2, wall_s=200e-6)
    assert got["gpu_busy_ms_per_step"] == 0.034  # (12..80) = 68 us over 2 steps
    assert got["gpu_busy_fraction"] == 0.34
    assert got["host_sync_wait_ms_per_step"] == 0.03 and got["host_syncs_per_step"] == 0.5
    assert got["host_busy_ms_per_step"] == 0.07 and got["kernel_launches_per_step"] == 1.0
    assert [k["name"] for k in got["top_kernels"]] == ["gemm_kernel", "Memcpy DtoH"]
    assert got["top_host_ops"][0] == {"name": "aten::mm", "self_ms_per_step": 0.02,
                                      "calls_per_step": 0.5}  # fmt: skip
