"""Stage env: torch, CUDA, cuDNN, the GPU and its driver, the versions of the packages the
project needs (which of them the carried wheels supplied is in `lease.wheels`)."""

from __future__ import annotations

import contextlib
import platform
import subprocess
from importlib import metadata
from typing import Any

import torch

from benchmarks import common
from lease.context import Ctx
from lease.measure import device
from lease.results import record

PACKAGES = ("deepspeed", "webdataset", "pydantic", "torchvision", "timm", "opencv-python-headless",
            "numpy", "pytest-timeout", "mlflow", "ray")  # fmt: skip


def stage_env(ctx: Ctx) -> None:
    dev = device()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": dev.type,
        "hardware": common.hardware(dev),
    }
    info.update(gpu=None, capability=None, multiprocessors=None, nvidia_smi=None)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["capability"] = list(torch.cuda.get_device_capability(dev))
        info["multiprocessors"] = props.multi_processor_count
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            info["nvidia_smi"] = smi.stdout.strip()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info["packages"] = versions
    line = f"torch {info['torch']} cuda {info['cuda']} cudnn {info['cudnn']}"
    line += f" {info['gpu'] or common.cpu_model()} python {info['python']}"
    info["line"] = line
    print("env:", line, flush=True)
    record(ctx.out, "env", info)
