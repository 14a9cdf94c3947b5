"""Shared helpers of the benchmark scripts: timing, peak memory, FLOPs, hardware, table, JSON.

Needs torch only (no DeepSpeed, Ray, MLflow or WebDataset), so the scripts that use it run on a
bare CUDA machine.

Peak memory:
- CUDA: torch.cuda.max_memory_allocated() (bytes held by tensors; the caching allocator's
  reserve is not counted), reset before the measured region.
- CPU: the resident-set high-water mark VmHWM of a fresh subprocess, reset through
  /proc/self/clear_refs, minus VmRSS at the start of the measured region. The subprocess runs
  with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor of
  64 KiB or more is its own mapping and freed tensors leave the resident set: the high-water
  mark then follows live tensor memory rather than glibc's retained heap.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULT_MARK = "@@BENCH-RESULT@@ "
CPU_MEMORY_METHOD = (
    "VmHWM - VmRSS at region start, fresh subprocess per case, MALLOC_MMAP_THRESHOLD_=65536"
)
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated()"

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
# Matched as a substring of torch.cuda.get_device_name(); first match wins, so the more specific
# names come first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU by name, or None when the name is not in the table."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None


# ----------------------------------------------------------------------------- hardware


def cpu_model() -> str:
    """The CPU's model name as lscpu / /proc/cpuinfo give it."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def hardware(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": device.type,
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info["gpu"] = name
        info["gpu_memory_gb"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1
        )
        info["gpu_bf16_peak_tflops"] = bf16_peak_tflops(name)
    return info


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when present else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks: --device cuda asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"benchmarks: --device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call; CUDA with events around it and a synchronise after."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_times(
    cases: dict[str, Callable[[], Any]], device: torch.device, warmup: int, iters: int
) -> dict[str, list[float]]:
    """Per-case step times (ms), the cases taking turns so that machine noise hits all alike.

    Each case gets `warmup` untimed calls first (one-time costs: allocator growth, kernel
    selection, pages faulted in).
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
        sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(iters):
        for name, fn in cases.items():
            times[name].append(time_call(fn, device))
    return times


def summary(times_ms: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of times (ms)."""
    return {
        "median_ms": round(statistics.median(times_ms), 3),
        "min_ms": round(min(times_ms), 3),
        "max_ms": round(max(times_ms), 3),
        "n": len(times_ms),
    }


# ----------------------------------------------------------------------------- memory


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"benchmarks/common.py: no {field} in /proc/self/status")


def release_free_heap() -> None:
    """Collect garbage and give glibc's free heap pages back to the OS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory (MiB) of the region inside `with`, over the memory held when it began.

    CPU: VmHWM reset via /proc/self/clear_refs; run it in a subprocess started by
    run_in_subprocess (mmap threshold set) for figures that follow tensor memory.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base_mb = 0.0
        self.peak_mb: float | None = None
        self.method = CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            release_free_heap()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := VmRSS
            except OSError as exc:
                raise RuntimeError(
                    "benchmarks/common.py: cannot reset the RSS high-water mark "
                    f"(/proc/self/clear_refs: {exc}); CPU peak memory needs Linux"
                ) from exc
            self.base_mb = status_mb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base_mb
        else:
            self.peak_mb = status_mb("VmHWM") - self.base_mb

    @property
    def absolute_peak_mb(self) -> float:
        """Peak including what was held at the start (CUDA: all tensors of the process)."""
        assert self.peak_mb is not None
        return self.peak_mb + self.base_mb


def available_memory_gb() -> float:
    """MemAvailable of /proc/meminfo in GiB (inf where unknown)."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


# ----------------------------------------------------------------------------- subprocesses


def run_in_subprocess(script: Path, case: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run `script --child JSON` in a fresh interpreter and return the record it prints.

    The child prints one line RESULT_MARK + json (see child_main). A crash, a kill (e.g. out of
    memory) or a timeout gives a record with "error" naming what happened.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(script), "--child", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"{script.name} child timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"{script.name} child exited with code {proc.returncode}: {' | '.join(tail)}"}


def child_main(argv: Sequence[str], fn: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If argv is `--child JSON`, run fn(case), print its record and return True."""
    if len(argv) != 2 or argv[0] != "--child":
        return False
    record = fn(json.loads(argv[1]))
    print(RESULT_MARK + json.dumps(record), flush=True)
    return True


# ----------------------------------------------------------------------------- FLOPs


def _cpu_flash_mapping() -> dict[Any, Any]:
    """FlopCounterMode counts CUDA's SDPA kernels but not the CPU flash kernel: add it."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping: dict[Any, Any] = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:

        def fwd_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query, key, value)

        mapping[fwd] = fwd_flop  # FlopCounterMode turns tensors into shapes itself
    if bwd is not None:

        def bwd_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)

        mapping[bwd] = bwd_flop
    grouped = getattr(aten, "_grouped_mm", None)
    if grouped is not None:  # the CDGC fast path's per-class products (cdgcnet/cdgc/precision.py)

        def grouped_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
            if len(a_shape) == 2 and len(b_shape) == 3:  # (T, k) rows by group x (G, k, n)
                return 2 * a_shape[0] * a_shape[1] * b_shape[2]
            if len(a_shape) == 2 and len(b_shape) == 2:  # (m, T) x (T, n), T by group
                return 2 * a_shape[0] * a_shape[1] * b_shape[1]
            batch = a_shape[0] if len(a_shape) == 3 else b_shape[0]  # (G, m, k) x (G, k, n)
            return 2 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]

        mapping[grouped] = grouped_flop
    return mapping


def count_flops(fn: Callable[[], Any]) -> dict[str, Any]:
    """FLOPs of one call by torch.utils.flop_counter.FlopCounterMode.

    Counted: matmul/conv/SDPA families (one multiply-add = 2 FLOPs); the CPU flash-attention
    kernel and torch's grouped matmul (the CDGC fast path's per-class products) are added. Not counted: elementwise ops, normalisation, softmax outside SDPA,
    pooling, interpolation, index/scatter ops (small next to the convolutions).
    Returns total and the top-level op names with their counts.
    """
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False, custom_mapping=_cpu_flash_mapping())
    with mode:
        fn()
    per_op = mode.get_flop_counts().get("Global", {})
    return {
        "total": int(mode.get_total_flops()),
        "by_op": {str(k): int(v) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
    }


# ----------------------------------------------------------------------------- inputs


def cdgc_inputs(
    b: int,
    c: int,
    h: int,
    w: int,
    m: int,
    cells: tuple[int, int],
    device: torch.device,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CDGC module inputs that look like a training step: x (B,C,H,W); coarse logits (B,M,H,W)
    of smooth random class blobs (`cells` blobs per side); a target (B,H,W) made of the same
    blobs, perturbed, with an ignored top band."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    low = torch.randn(b, m, *cells, generator=g)
    coarse = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    coarse = 4.0 * coarse + 0.1 * torch.randn(coarse.shape, generator=g)  # (B, M, H, W)
    noisy = low + 0.3 * torch.randn(low.shape, generator=g)
    target = F.interpolate(noisy, size=(h, w), mode="bilinear", align_corners=False).argmax(1)
    target[:, : max(h // 16, 1)] = 255
    x = torch.randn(b, c, h, w, generator=g)
    return x.to(device), coarse.to(device), target.to(device)


def blob_labels(b: int, h: int, w: int, m: int, cells: int, seed: int) -> torch.Tensor:
    """(B, H, W) int64 labels made of smooth random class blobs (cells x cells seeds per side).

    Looks like a segmentation map (connected regions, many classes) rather than pixel noise.
    """
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    low = torch.randn(b, m, max(cells, 2), max(cells, 2), generator=g)
    scores = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return scores.argmax(1)  # (B, H, W)


# ----------------------------------------------------------------------------- output


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """A plain fixed-width table of the given columns (missing values print as '-')."""

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_json(path: str | Path, payload: dict[str, Any] | list[Any]) -> None:
    """Write payload as JSON atomically (pipeline.atomic) and say where."""
    write_json_atomic(path, payload, indent=2)
    print(f"\nwrote {path}")


def write_results(
    path: str | Path, name: str, argv: Sequence[str], hardware: dict, records: list, **extra: Any
) -> None:
    """The JSON result file of benchmarks/<name>.py: its command line, the hardware, `extra`
    fields, then the records."""
    command = f"python benchmarks/{name}.py " + " ".join(argv)
    payload = {"benchmark": name, "command": command, "hardware": hardware, **extra}
    write_json(path, {**payload, "records": records})


def gpu_rows(cuda: bool) -> str:
    """What a result file says about its GPU rows."""
    return "measured" if cuda else "not measured (no GPU in this environment)"


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) against log(x) (y ~ x^k); None with < 2 usable points."""
    import math

    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return round(sxy / sxx, 3)
