"""The GPU check of the whole project in one command that fits one short GPU lease.

    python3 benchmarks/gpu_lease.py --out DIR [--budget-s 560] [--wheels .whl] [--only STAGE ...]
        [--set KEY=VALUE ...] [--variant "KEY=VALUE ..." ...]    # trainer config overrides
    python3 benchmarks/gpu_lease.py --dry-run --out DIR       # CPU, tiny sizes, fp32 (a test runs it)
    python3 benchmarks/gpu_lease.py --build-wheels [DIR]      # what `make gpu-wheels` runs

Writes two files to DIR: lease.json (every result, rewritten after each step, so a kill at any
point leaves what was measured so far) and lease.log (everything the stages printed). The
stages run in this order, most valuable first, each in its own process group with its own
time limit inside the overall budget:

1. env         torch, CUDA, cuDNN, GPU, driver; which carried wheels were installed
2. gpu_tests   pytest -m gpu tests/cdgcnet (per-test timeout where pytest-timeout exists)
3. cdgc        the CDGC module alone, forward + backward under bf16 autocast, at the presets'
               feature grids (97x97 M=19, 65x65 M=21, 65x65 M=171; B=2, C=512) and, at the
               Cityscapes grid, the other precisions and readings: time, model FLOP/s against
               a bf16 matmul peak measured here, peak memory, top kernels, warnings (a Triton or
               grouped-kernel fallback says so); the two block-max kernels timed
4. trainer     launch/train.py through its command line: DeepSpeed ZeRO-2, bf16, CDGC
               checkpointing, ResNet-101 at the Cityscapes preset (769x769, 2 images, 19
               classes) on a generated Cityscapes-layout set packed on the spot, MLflow off;
               per-iteration times, peak memory, losses, a torch.profiler breakdown of 3
               steps, then a resume from the middle checkpoint whose losses are compared with
               the uninterrupted run, and the plain PyTorch step of the same network (the
               goals: trainer step <= 1.1x plain, peak memory <= plain + 1.5 GiB). `--set`
               overrides go to every run; each `--variant` is one configuration (its
               overrides on top of --set) measured this way, one after another on the
               generated data
5. train_step  CDGCNet, the same net without CDGC, and CDGCNet with its graph in float32 at the
               Cityscapes preset; images/s, peak memory, model FLOP/s
6. extras      (time permitting) the VOC and COCO-Stuff presets; inference whole / sliding
               window at 1024x2048

--dry-run runs the same stages on CPU at tiny sizes (ResNet-18, a few iterations, fp32) with
the same files and keys; its figures mean nothing. The bare GPU image lacks DeepSpeed and
WebDataset: they travel as wheels in an ignored folder (--build-wheels), and each wheel whose
package is missing or older here is installed with `pip install --no-index --no-deps
--target` into a temporary folder that goes on the stages' PYTHONPATH. Stages also run with
MLflow and Ray made unimportable, as on that image.

Exit status 1 when a stage failed or timed out (a failing CUDA test is a finding, counted in
gpu_tests, not a stage failure); 2 without a GPU unless --dry-run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "lease.json"
LOG = "lease.log"
STAGES = ("env", "gpu_tests", "cdgc", "trainer", "train_step", "extras")
ABSENT = ("mlflow", "ray")  # not on the GPU image; hidden in every stage so the dry run sees it too
WHEEL_DIR = ROOT / ".whl"
# What the GPU image lacks for launch/ and pipeline/ (DeepSpeed, WebDataset and their needs),
# plus needs the image is listed with, as a fallback where it holds an older version or none.
# Versions come from constraints.txt.
WHEEL_PACKAGES = (
    "deepspeed", "webdataset", "braceexpand", "hjson", "pydantic", "pydantic_core",
    "annotated-types", "typing-inspection", "typing_extensions", "msgpack", "ninja", "psutil",
    "py-cpuinfo", "PyYAML", "tqdm", "packaging", "einops", "safetensors",
)  # fmt: skip
WHEEL_LIMIT_MB = 48.0  # of the 64 MiB the working tree may carry to the GPU machine
PIP_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""

    label: str
    budget_s: float  # the whole command
    stage_caps_s: dict[str, float]  # the most one stage may take
    matmul_n: int  # square matmul for the measured peak
    train_preset: str  # benchmarks/train_step.py PRESETS key for stage 4
    extra_presets: tuple[str, ...]  # the same for stage 5
    step_warmup: int
    step_iters: int
    trainer_overrides: tuple[str, ...]  # key=value for launch/train.py
    iterations: int  # trainer run; it checkpoints halfway and resumes from there
    profile_at: tuple[int, int]  # (first iteration, steps) the trainer's profiler covers
    synth_size: tuple[int, int]  # (width, height) of the generated Cityscapes images
    synth_train: int
    synth_val: int
    cdgc_cases: tuple[dict[str, Any], ...]  # the module alone: B, C, side, M, queries, precision
    block_max_shape: tuple[int, int, int]  # (T, n, K') of one chunk's block max
    inference_args: tuple[str, ...]  # benchmarks/inference.py arguments


GPU = Sizes(
    label="gpu",
    budget_s=560.0,  # a 600 s command: room for the wheels' install and the last record
    stage_caps_s=dict(env=40, gpu_tests=100, cdgc=75, trainer=200, train_step=75, extras=120),
    matmul_n=8192,
    train_preset="cityscapes",
    extra_presets=("voc", "cocostuff"),
    step_warmup=3,
    step_iters=10,
    trainer_overrides=(
        "runtime.precision=bf16",
        "data.num_workers=6",
    ),
    iterations=20,
    profile_at=(4, 3),  # after 3 warm-up steps, clear of the saves at 10 and 20
    synth_size=(2048, 1024),
    synth_train=48,  # more than the 2 x 20 crops of the run: one loader epoch, no restart
    synth_val=2,
    cdgc_cases=(
        # the presets' feature grids (crop / 8), B=2, C=512, the default model
        dict(B=2, C=512, side=97, M=19, queries="all", precision="split"),
        dict(B=2, C=512, side=65, M=21, queries="all", precision="split"),
        dict(B=2, C=512, side=65, M=171, queries="all", precision="split"),
        # the other precisions and readings at the cityscapes shape
        dict(B=2, C=512, side=97, M=19, queries="all", precision="fp32"),
        dict(B=2, C=512, side=97, M=19, queries="all", precision="autocast"),
        dict(B=2, C=512, side=97, M=19, queries="members", precision="split"),
        dict(B=2, C=512, side=97, M=19, queries="masked", precision="split"),
    ),
    block_max_shape=(18818, 1664, 19),
    inference_args=("--setting", "paper", "--cases", "whole", "slide", "--iters", "3"),
)
DRY = Sizes(
    label="dry run (CPU, tiny sizes: the figures mean nothing)",
    budget_s=600.0,  # about a minute on an idle 2-core machine; room for a busy one
    stage_caps_s=dict(env=60, gpu_tests=120, cdgc=90, trainer=300, train_step=120, extras=120),
    matmul_n=256,
    train_preset="smoke",
    extra_presets=("smoke",),
    step_warmup=1,
    step_iters=2,
    trainer_overrides=(
        "runtime.precision=fp32",
        "data.num_workers=1",
        "model.depth=18",
        "model.channels=64",
        "model.aspp_channels=64",
        "data.crop_size=65",
        "eval.crop=65",
        "eval.stride=43",
        "loss.ohem_min_kept=4096",
    ),
    iterations=4,
    profile_at=(3, 1),  # the one iteration without a save after it
    synth_size=(256, 128),
    synth_train=8,
    synth_val=1,
    cdgc_cases=(
        dict(B=2, C=32, side=9, M=5, queries="all", precision="split"),
        dict(B=2, C=32, side=9, M=5, queries="members", precision="split"),
    ),
    block_max_shape=(162, 88, 5),
    inference_args=("--smoke", "--cases", "whole", "slide", "--iters", "1", "--device", "cpu"),
)


# ----------------------------------------------------------------------------- results file


def load_results(out: Path) -> dict[str, Any]:
    path = out / RESULTS
    if not path.is_file():
        return {"lease": {}, "stages": {}}
    with open(path) as f:
        return json.load(f)


def record(out: Path, stage: str, payload: dict[str, Any]) -> None:
    """Merge payload into stages[stage] of DIR/lease.json (atomic rewrite: a kill keeps it)."""
    from pipeline.manifest import write_json_atomic

    results = load_results(out)
    results["stages"].setdefault(stage, {}).update(payload)
    write_json_atomic(out / RESULTS, results)


def record_lease(out: Path, payload: dict[str, Any]) -> None:
    from pipeline.manifest import write_json_atomic

    results = load_results(out)
    results["lease"].update(payload)
    write_json_atomic(out / RESULTS, results)


# ----------------------------------------------------------------------------- wheels


def _dist_key(name: str) -> str:
    """PEP 503 normalised distribution name (wheel file names use '_' for '-')."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_tuple(text: str) -> tuple:
    """A comparable version; packaging's parser where present (it is on both machines)."""
    try:
        from packaging.version import Version

        return (Version(text),)
    except Exception:  # no packaging, or a version it rejects: compare the digits
        return tuple(int(p) for p in re.findall(r"\d+", text))


def plan_wheels(wheel_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """(wheels to install, {package: why not}) for the wheels in wheel_dir.

    A wheel is installed when its package is missing from this interpreter or older than the
    wheel; a package present at the same or a newer version is left alone. Two wheels of one
    package are refused (pip would stop the whole install).
    """
    from importlib import metadata

    wheels = sorted(wheel_dir.glob("*.whl"))
    by_name: dict[str, Path] = {}
    for w in wheels:
        parts = w.name.split("-")
        if len(parts) < 5:
            raise SystemExit(f"gpu_lease: {w}: not a wheel file name (name-version-...-tag.whl)")
        key = _dist_key(parts[0])
        if key in by_name:
            raise SystemExit(
                f"gpu_lease: {wheel_dir}: two wheels of {key}: {by_name[key].name}, {w.name}"
            )
        by_name[key] = w
    install, kept = [], {}
    for key, w in sorted(by_name.items()):
        wanted = w.name.split("-")[1]
        try:
            have = metadata.version(key)
        except metadata.PackageNotFoundError:
            install.append(w)
            continue
        try:
            newer = _version_tuple(have) >= _version_tuple(wanted)
        except TypeError:  # one parsed by packaging, the other not: take the wheel
            newer = False
        if newer:
            kept[key] = f"present ({have} >= {wanted})"
        else:
            install.append(w)
    return install, kept


def install_wheels(wheels: Sequence[Path], site: Path) -> None:
    """pip install --no-index --no-deps --target site: nothing is fetched, nothing resolved."""
    if not wheels:
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--disable-pip-version-check", "--target", str(site)]
    proc = subprocess.run([*cmd, *map(str, wheels)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"pip install --target {site} failed: {' | '.join(tail)}")


def prepare_wheels(wheel_dir: Path, site: Path) -> dict[str, Any]:
    """Install what is missing into site; returns the record for lease.json."""
    info: dict[str, Any] = {"wheel_dir": str(wheel_dir), "site": None}
    if not wheel_dir.is_dir():
        info["status"] = f"no wheel folder {wheel_dir} (run `make gpu-wheels` before the lease)"
        return info
    t0 = time.perf_counter()
    install, kept = plan_wheels(wheel_dir)
    info["kept"] = kept
    info["installed"] = [w.name for w in install]
    if install:
        install_wheels(install, site)
        info["site"] = str(site)
        info["status"] = f"installed {len(install)} wheel(s)"
    else:
        info["status"] = "skipped: every package present"
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return info


def _constraint_pins(names: Sequence[str]) -> list[str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_dist_key(name)] = f"{name}=={version.strip()}"
    missing = [n for n in names if _dist_key(n) not in pins]
    if missing:
        raise SystemExit(f"gpu_lease: constraints.txt pins no version of {missing}")
    return [pins[_dist_key(n)] for n in names]


def build_wheels(dest: Path) -> int:
    """Wheels for Python 3.12 / manylinux x86_64 (the GPU image) into dest, replacing it."""
    pins = _constraint_pins(WHEEL_PACKAGES)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    binary = [p for p in pins if not p.startswith("deepspeed==")]
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    download = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    download += ["--implementation", "cp", "-d", str(tmp)]
    for plat in PIP_PLATFORMS:
        download += ["--platform", plat]
    subprocess.run([*download, *binary], check=True)
    # DeepSpeed ships an sdist only; without ops it builds into a pure-Python wheel (the ops
    # compile just in time where they are used, which ZeRO-2 with torch's SGD is not).
    ds_pin = next(p for p in pins if p.startswith("deepspeed=="))
    env = dict(os.environ, DS_BUILD_OPS="0")
    wheel = [*pip, "wheel", "--no-deps", "--no-cache-dir", "-w", str(tmp), ds_pin]
    subprocess.run(wheel, check=True, env=env)
    got = sorted(p.name for p in tmp.glob("*.whl"))
    if len(got) != len(pins):
        raise SystemExit(f"gpu_lease: expected {len(pins)} wheels, got {len(got)}: {got}")
    size_mb = sum(p.stat().st_size for p in tmp.glob("*.whl")) / 2**20
    if size_mb > WHEEL_LIMIT_MB:
        raise SystemExit(f"gpu_lease: wheels take {size_mb:.1f} MiB, over {WHEEL_LIMIT_MB} MiB")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    print(f"{len(got)} wheels, {size_mb:.1f} MiB in {dest}:")
    for name in got:
        print(f"  {name}")
    return 0


# ----------------------------------------------------------------------------- stage helpers


class _Absent:
    """A meta-path finder that makes the named top-level packages unimportable."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU image)")
        return None


def hide_absent_packages() -> None:
    sys.meta_path.insert(0, _Absent(ABSENT))


@dataclass
class Ctx:
    """What a stage process knows: where to write, how big, until when."""

    out: Path
    work: Path
    sizes: Sizes
    dry_run: bool
    deadline: float  # time.time() by which the stage must be done
    sets: tuple[str, ...] = ()  # --set: trainer overrides of every variant
    variants: tuple[tuple[str, ...], ...] = ()  # --variant: more trainer runs, overrides each

    def left(self) -> float:
        return self.deadline - time.time()


def matmul_peak_tflops(device: Any, n: int) -> dict[str, Any]:
    """Measured peak of one square matmul: bf16 on CUDA (tensor cores), fp32 on CPU."""
    import torch

    from benchmarks import common

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = [common.time_call(lambda: a @ b, device) for _ in range(10)]
    ms = statistics.median(times)
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "median_ms": round(ms, 4),
        "tflops": round(2 * n**3 / (ms / 1e3) / 1e12, 2),
    }


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- 1. env


def stage_env(ctx: Ctx) -> None:
    import platform
    from importlib import metadata

    import torch

    from benchmarks import common

    device = _device()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device.type,
        "hardware": common.hardware(device),
    }
    info.update(gpu=None, capability=None, multiprocessors=None, nvidia_smi=None)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = list(torch.cuda.get_device_capability(device))
        info["multiprocessors"] = props.multi_processor_count
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            info["nvidia_smi"] = smi.stdout.strip()
    versions = {}
    for name in ("deepspeed", "webdataset", "pydantic", "torchvision", "timm", "opencv-python-headless",
                 "numpy", "pytest-timeout", "mlflow", "ray"):  # fmt: skip
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


# ----------------------------------------------------------------------------- 2. gpu tests

_TEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_SUMMARY_LINE = re.compile(r"^(FAILED|ERROR|SKIPPED) (?:\[\d+\] )?(tests/\S+?)(?: - (.*))?$")


def stage_gpu_tests(ctx: Ctx) -> None:
    import importlib.util

    per_test = 90 if not ctx.dry_run else 30
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "-m", "gpu"]
    cmd += ["tests/cdgcnet"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += [f"--timeout={per_test}"]
    else:
        per_test = None
    tests: dict[str, dict[str, Any]] = {}
    record(ctx.out, "gpu_tests", {"command": " ".join(cmd[1:]), "per_test_timeout_s": per_test})
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        m = _TEST_LINE.match(line)
        if m:
            tests[m.group(1)] = {"outcome": m.group(2)}
            record(ctx.out, "gpu_tests", {"tests": tests})
        m = _SUMMARY_LINE.match(line.strip())
        if m and m.group(2) in tests and m.group(3):
            tests[m.group(2)]["message"] = m.group(3)[:300]
    code = proc.wait()
    counts: dict[str, int] = {}
    for t in tests.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    record(ctx.out, "gpu_tests", {"tests": tests, "counts": counts, "pytest_exit_code": code})


# ----------------------------------------------------------------------------- 3. trainer


def make_dataset(ctx: Ctx) -> dict[str, Any]:
    """A generated Cityscapes-layout set, packed in this process (no Ray) into shards."""
    from pipeline.datasets import DATASETS
    from pipeline.pack import pack_split
    from pipeline.synth import generate

    s = ctx.sizes
    src, shards = ctx.work / "cityscapes_src", ctx.work / "cityscapes_shards"
    t0 = time.perf_counter()
    workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    generate("cityscapes", src, train=s.synth_train, val=s.synth_val, size=s.synth_size,
             workers=workers)  # fmt: skip
    t1 = time.perf_counter()
    counts = {}
    for split in ("train", "val"):
        # one image per shard: every loader worker gets shards to read
        m = pack_split(DATASETS["cityscapes"], src, shards, split, max_count=1, progress=False,
                       use_ray=False)  # fmt: skip
        counts[split] = m["num_samples"]
    shutil.rmtree(src)
    return {
        "root": str(shards),
        "size": f"{s.synth_size[0]}x{s.synth_size[1]}",
        "samples": counts,
        "generate_s": round(t1 - t0, 1),
        "pack_s": round(time.perf_counter() - t1, 1),
    }


FROM_SCRATCH = "model.pretrained=none"  # no ImageNet file on the machine: random init, said so


def _peaks() -> dict[str, float | None]:
    """Peak memory of this process: on the device the tensors (allocated) and the caching
    allocator's hold (reserved), None on CPU; on the host the resident high-water mark
    (interpreter and libraries included)."""
    import torch

    from benchmarks import common

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
    import traceback

    from benchmarks.step_profile import StepProbe

    hide_absent_packages()
    sys.argv = [str(ROOT / "launch" / "train.py"), *argv]  # as `python launch/train.py ...`
    first, steps = (int(x) for x in window.split(":"))
    probe = StepProbe(first, steps)
    code: Any = 0
    error = None
    try:
        from launch.train import main as train_main

        code = train_main(argv, hooks=[probe])
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:
        traceback.print_exc()
        code, error = 1, f"{type(exc).__name__}: {str(exc)[:400]}"
    finally:
        res = {"exit_code": code if isinstance(code, int) else 1, "error": error, **_peaks()}
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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trainer-child", str(result_path)]
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


def _checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    root = run_dir / "checkpoints"
    for tag in sorted(root.glob("iter_*")) if root.is_dir() else []:
        size = sum(f.stat().st_size for f in tag.rglob("*") if f.is_file())
        out.append(
            {"tag": tag.name, "complete": (tag / "COMPLETE").is_file(), "mb": round(size / 2**20)}
        )
    return out


TIME_GOAL = 1.1
"""Issue 18: the trainer's step takes at most this many times the plain step of the network."""
MEMORY_GOAL_MB = 1536.0
"""Issue 18: the trainer's peak device memory exceeds the plain step's by at most this (MiB)."""


def trainer_variants(ctx: Ctx) -> list[tuple[str, ...]]:
    """The overrides of each trainer configuration: --set and each --variant in turn, or --set
    alone without any --variant."""
    return [ctx.sets + v for v in ctx.variants] or [ctx.sets]


def trainer_overrides(ctx: Ctx, root: str) -> list[str]:
    """launch/train.py key=value overrides of every trainer run of the stage."""
    s = ctx.sizes
    half = s.iterations // 2
    return [
        f"data.root={root}",
        "data.global_batch_size=null",  # 2 images per step, no accumulation
        f"schedule.iterations={s.iterations}", "schedule.warmup_iters=0",
        f"checkpoint.every={half}", "checkpoint.keep=2",
        "eval.every=0", "eval.num_pictures=0",
        "model.checkpoint=true", "runtime.zero_stage=2",
        "logging.enabled=false", "runtime.progress=false",
        *s.trainer_overrides,
        FROM_SCRATCH,
    ]  # fmt: skip


def stage_trainer(ctx: Ctx) -> None:
    from launch.config import load_config

    variants = trainer_variants(ctx)
    # A bad --set or --variant stops here, naming the key, before the data is made.
    configs = [
        load_config("cityscapes", [*trainer_overrides(ctx, "generated"), *v]) for v in variants
    ]
    data = make_dataset(ctx)
    record(ctx.out, "trainer", {"data": data})
    base = trainer_overrides(ctx, data["root"])
    goals, failed = [], []
    for i, (overrides, cfg) in enumerate(zip(variants, configs, strict=True)):
        write = _variant_writer(ctx, i)
        write({"set": list(overrides)})
        result = run_variant(ctx, f"v{i}", [*base, *overrides], cfg, write)
        goals.append({"set": list(overrides), **result})
        record(ctx.out, "trainer", {"goals": goals})
        if result["status"] != "ok":
            failed.append(f"{list(overrides)}: {result['status']}")
    if failed:
        raise RuntimeError(f"trainer runs failed: {'; '.join(failed)}; see {LOG}")


def _variant_writer(ctx: Ctx, index: int) -> Callable[[dict[str, Any]], None]:
    """Where one configuration's records go: stages.trainer itself for the first, else
    stages.trainer.variants[index - 1]."""
    if index == 0:
        return lambda part: record(ctx.out, "trainer", part)

    def write(part: dict[str, Any]) -> None:
        variants = load_results(ctx.out)["stages"]["trainer"].get("variants", [])
        variants += [{} for _ in range(index - len(variants))]
        variants[index - 1].update(part)
        record(ctx.out, "trainer", {"variants": variants})

    return write


def run_variant(
    ctx: Ctx, name: str, overrides: list[str], cfg: Any, write: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """One trainer configuration: the run (profiled), its resume from the middle checkpoint, the
    plain step of the same network; returns the goals row (see `versus_plain`)."""
    s = ctx.sizes
    half = s.iterations // 2
    first, steps = s.profile_at
    warmup = 3 if s.iterations > 6 else 1
    # Left out of the step times: the step after the save, the profiled steps and the one after
    # them (it includes the profile's summary).
    skip = {half + 1, *range(first, first + steps + 1)}

    def live(part: str) -> Callable[[list[dict]], None]:
        return lambda rows: write({part: {"status": "running", "iterations": rows}})

    run1 = ctx.work / f"{name}_run"
    shutil.rmtree(run1, ignore_errors=True)
    argv = ["--config", "cityscapes", *overrides, "--run-dir", str(run1), "--resume", "none"]
    write({"command": "launch/train.py " + " ".join(argv)})
    res = run_trainer(ctx, run1, argv, live("run"))
    profile = res.pop("profile", None)
    res["pretrained_override"] = FROM_SCRATCH
    res.update(step_summary(res["iterations"], skip, warmup))
    if res["iterations"]:
        res.update(loss_summary(res["iterations"]))
        res["images_per_s"] = (
            round(2e3 / res["step_ms_median"], 3) if res.get("step_ms_median") else None
        )
    res["checkpoints"] = _checkpoints(run1)
    res["exported_model"] = (run1 / "model.pt").is_file()
    res["status"] = "ok" if res["exit_code"] == 0 else f"exit code {res['exit_code']}"
    write({"run": res, "profile": profile})
    if res["exit_code"] != 0:
        return {"status": f"run: {res['status']}"}

    # Resume from the halfway checkpoint in a new run directory; the second half must repeat
    # the first run's losses (exactly on CPU in fp32; to rounding on the GPU).
    run2 = ctx.work / f"{name}_resume"
    ckpt = run1 / "checkpoints" / f"iter_{half:08d}"
    argv = ["--config", "cityscapes", *overrides, "--run-dir", str(run2), "--resume", str(ckpt)]
    res2 = run_trainer(ctx, run2, argv, live("resume"))
    res2.pop("profile", None)  # resumed past the profiled steps
    first_losses = {r["iteration"]: r["loss"]["total"] for r in res["iterations"]}
    diffs = [
        abs(r["loss"]["total"] - first_losses[r["iteration"]])
        / max(abs(first_losses[r["iteration"]]), 1e-12)
        for r in res2["iterations"]
        if r["iteration"] in first_losses
    ]
    res2.update(
        resumed_from=ckpt.name,
        iterations_after_resume=[r["iteration"] for r in res2["iterations"]],
        loss_max_rel_diff_vs_run=max(diffs) if diffs else None,
        status="ok" if res2["exit_code"] == 0 else f"exit code {res2['exit_code']}",
    )
    write({"resume": res2})
    plain = measure_plain(ctx, cfg)
    write({"plain": plain})
    row = versus_plain(res, plain, profile)
    row["resume_loss_max_rel_diff"] = res2["loss_max_rel_diff_vs_run"]
    row["status"] = "ok" if res2["exit_code"] == 0 else f"resume: {res2['status']}"
    return row


def measure_plain(ctx: Ctx, cfg: Any) -> dict[str, Any]:
    """The plain PyTorch step of the trainer's network (its model config, crop, batch, input
    layout and precision) in this process: benchmarks/train_step.py's step, timed and measured
    as the train_step stage does."""
    import torch

    from cdgcnet.model import build_model
    from launch.ds_config import resolve_precision

    device = _device()
    cuda = device.type == "cuda"
    precision = resolve_precision(
        cfg.runtime.precision, device.type, cuda and torch.cuda.is_bf16_supported()
    )
    p = dict(crop=cfg.data.crop_size, batch=cfg.data.batch_size, classes=cfg.model.num_classes,
             depth=cfg.model.depth)  # fmt: skip

    def build(dev: torch.device) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(cfg.model).to(dev).train()

    case = "cdgc" if cfg.runtime.channels_last else "cdgc_nchw"  # the input layout only
    row: dict[str, Any] = {"case": case, "precision": precision}
    if precision == "fp16":  # DeepSpeed's loss-scaled fp16 has no plain twin here
        return {**row, "status": "skipped: no plain fp16 step"}
    if ctx.left() < 15:
        return {**row, "status": "skipped: stage time used up"}
    row.update(_measure_case(ctx, case, p, build=build, bf16=precision == "bf16"))
    return row


def versus_plain(run: dict[str, Any], plain: dict[str, Any], profile: Any) -> dict[str, Any]:
    """The goals row: the trainer's median step and training peak memory against the plain step
    of the same network (memory only on the GPU, where both are max_memory_allocated)."""
    t, p = run.get("step_ms_median"), plain.get("step_ms")
    mt, mp = run.get("train_peak_allocated_mb"), plain.get("peak_mem_mb")
    ratio = round(t / p, 3) if t and p else None
    cuda = plain.get("device") == "cuda"
    extra = round(mt - mp, 1) if mt is not None and mp is not None and cuda else None
    return {
        "trainer_step_ms": t,
        "plain_step_ms": p,
        "time_ratio": ratio,
        "time_goal": TIME_GOAL,
        "time_ok": None if ratio is None else ratio <= TIME_GOAL,
        "trainer_peak_mb": mt,
        "plain_peak_mb": mp if cuda else None,
        "memory_extra_mb": extra,
        "memory_goal_extra_mb": MEMORY_GOAL_MB,
        "memory_ok": None if extra is None else extra <= MEMORY_GOAL_MB,
        "gpu_busy_fraction": (profile or {}).get("gpu_busy_fraction"),
    }


# ----------------------------------------------------------------------------- 4. train step


def measure_train_step(
    ctx: Ctx,
    preset: str,
    cases: Sequence[str],
    peak: dict[str, Any],
    on_rows: Callable[[list[dict[str, Any]]], None],
) -> list[dict[str, Any]]:
    """Cases one after another in this process, each with its own model; on_rows(rows) after
    each case. The model FLOPs of cdgc_ckpt are those of cdgc (the recompute is no useful work).
    """
    from benchmarks import train_step

    p = train_step.PRESETS[preset]
    rows: list[dict[str, Any]] = []
    flops: dict[str, float] = {}
    for case in cases:
        row: dict[str, Any] = dict(preset=preset, case=case, crop=p["crop"], batch=p["batch"],
                                   classes=p["classes"])  # fmt: skip
        if case == "torchvision" and not train_step._has_torchvision():
            row["status"] = "skipped: torchvision not importable"
        elif ctx.left() < 15:
            row["status"] = "skipped: stage time used up"
        else:
            row.update(_measure_case(ctx, case, p))
        if row["status"] == "ok":
            flops[case] = row["gflop_per_step"]
            if case == "cdgc_ckpt" and "cdgc" in flops:
                row["gflop_per_step"] = flops["cdgc"]
            achieved = row["gflop_per_step"] * 1e9 / (row["step_ms"] / 1e3) / 1e12
            row["achieved_tflops"] = round(achieved, 3)
            row["fraction_of_matmul_peak"] = round(achieved / peak["tflops"], 4)
        rows.append(row)
        _ratios(rows)
        on_rows(rows)
    return rows


def _measure_case(
    ctx: Ctx,
    case: str,
    p: dict[str, Any],
    build: Callable[[Any], Any] | None = None,
    bf16: bool | None = None,
) -> dict[str, Any]:
    """Step times, FLOPs and the peak memory from model build to the last step (weights,
    gradients, momentum, activations) of one benchmarks/train_step.py case; `build(device)`
    makes another model for the case's step, `bf16` overrides its autocast (default: on CUDA)."""
    import torch

    from benchmarks import common, train_step

    device = _device()
    bf16 = device.type == "cuda" if bf16 is None else bf16
    gc.collect()  # the previous case's model, optimizer and inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        with common.PeakMemory(device) as mem:
            model = build(device) if build else train_step.build(case, p, device)
            step = train_step.make_step(case, model, p, device, bf16=bf16)
            flops = common.count_flops(step)  # also the first warm-up step
            for _ in range(max(ctx.sizes.step_warmup - 1, 0)):
                step()
            times = [common.time_call(step, device) for _ in range(ctx.sizes.step_iters)]
    except torch.OutOfMemoryError:
        return {"status": "out of memory"}
    finally:
        model = step = None  # free the case before the next one
    t = common.summary(times)
    return dict(
        status="ok",
        device=device.type,
        depth=101 if case == "torchvision" else p["depth"],
        dtype="bf16 autocast" if bf16 else "fp32",
        step_ms=t["median_ms"],
        step_ms_min=t["min_ms"],
        step_ms_max=t["max_ms"],
        iters=t["n"],
        images_per_s=round(p["batch"] / (t["median_ms"] / 1e3), 3),
        peak_mem_mb=round(mem.absolute_peak_mb if device.type == "cuda" else mem.peak_mb, 1),
        gflop_per_step=round(flops["total"] / 1e9, 2),
        flop_ops=list(flops["by_op"])[:6],
    )


def _ratios(rows: list[dict[str, Any]]) -> None:
    """time / memory of every case against the same net without CDGC and against torchvision."""
    for ref, suffix in (("baseline", "baseline"), ("torchvision", "torchvision")):
        for preset in {r["preset"] for r in rows}:
            base = next(
                (r for r in rows if r["preset"] == preset and r["case"] == ref and "step_ms" in r),
                None,
            )
            for r in rows:
                if base is None or r["preset"] != preset or "step_ms" not in r:
                    continue
                r[f"time_vs_{suffix}"] = round(r["step_ms"] / base["step_ms"], 3)
                if base["peak_mem_mb"] > 0:
                    r[f"mem_vs_{suffix}"] = round(r["peak_mem_mb"] / base["peak_mem_mb"], 3)


def stage_train_step(ctx: Ctx) -> None:
    device = _device()
    peak = matmul_peak_tflops(device, ctx.sizes.matmul_n)
    record(ctx.out, "train_step", {"matmul_peak": peak})
    # cdgc_fp32: what the split precision (the default) saves over a float32 graph
    cases = ("cdgc", "baseline", "cdgc_fp32")
    measure_train_step(
        ctx,
        ctx.sizes.train_preset,
        cases,
        peak,
        lambda rows: record(ctx.out, "train_step", {"records": rows}),
    )


# ----------------------------------------------------------------------------- 5. cdgc


def cdgc_model_gflop(nodes: Any, channels: int) -> float:
    """Model GFLOP of one CDGC forward + backward (backward = 2 x forward), from the node sets
    (B, G, H, W): per image N queries, T keys, K' classes present; the forward's products are
    q and k (2 N C^2 each), V' (T C^2), S and P V' (N T C each) and the aggregation (N K' C^2),
    2 FLOPs per multiply-add. The split precision's extra terms and the backward's recompute are
    not useful work and not counted."""
    b, _, h, w = nodes.shape
    n, c = h * w, channels
    total = 0.0
    for image in nodes.view(b, nodes.shape[1], n):
        t = int(image.sum())
        k = int(image.any(1).sum())
        total += 2 * (2 * n * c * c + t * c * c + 2 * n * t * c + n * k * c * c)
    return 3 * total / 1e9


def cdgc_inputs(b: int, c: int, side: int, m: int, device: Any) -> tuple[Any, Any, Any]:
    """X after a BN + ReLU in bf16 (as the network gives it), smooth random coarse logits and a
    target that disagrees with them in places (so hard negatives and positives exist)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    low = torch.randn(b, m, 6, 6, generator=g)
    coarse = 4.0 * F.interpolate(low, size=(side, side), mode="bilinear")
    noisy = low + 0.5 * torch.randn(low.shape, generator=g)
    target = F.interpolate(noisy, size=(side, side), mode="bilinear").argmax(1)
    x = torch.relu(torch.randn(b, c, side, side, generator=g)).bfloat16()
    return x.to(device), coarse.to(device), target.to(device)


def block_max_ms(device: Any, t: int, n: int, k: int, iters: int) -> dict[str, float]:
    """The two ways to take a max over each class's key block of S (T, n): torch.segment_reduce
    (what the fast path uses on CUDA) and scatter_reduce amax (what it uses on CPU)."""
    import torch

    from benchmarks import common

    s = torch.randn(t, n, device=device)
    lengths = torch.full((k,), t // k, device=device)
    lengths[-1] += t - int(lengths.sum())
    cls = torch.repeat_interleave(torch.arange(k, device=device), lengths)
    index = cls[:, None].expand(t, n)

    def seg() -> None:
        torch.segment_reduce(s, "max", lengths=lengths, axis=0)

    def scatter() -> None:
        s.new_full((k, n), float("-inf")).scatter_reduce_(0, index, s, "amax")

    out = {}
    for name, fn in (("segment_reduce", seg), ("scatter_reduce", scatter)):
        fn()
        out[name] = round(statistics.median(common.time_call(fn, device) for _ in range(iters)), 3)
    return out


def stage_cdgc(ctx: Ctx) -> None:
    """The CDGC module alone, forward + backward under bf16 autocast, at the presets' shapes."""
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import common, step_profile
    from cdgcnet.cdgc import CDGCModule, triton_blocks

    device = _device()
    cuda = device.type == "cuda"
    peak = matmul_peak_tflops(device, ctx.sizes.matmul_n)
    record(ctx.out, "cdgc", {"matmul_peak": peak, "triton": triton_blocks.blocks is not None})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows: list[dict[str, Any]] = []
    for case in ctx.sizes.cdgc_cases:
        row: dict[str, Any] = dict(case)
        if ctx.left() < 10:
            rows.append({**row, "status": "skipped: stage time used up"})
            record(ctx.out, "cdgc", {"records": rows})
            continue
        x, coarse, target = cdgc_inputs(case["B"], case["C"], case["side"], case["M"], device)
        torch.manual_seed(0)
        mod = CDGCModule(
            case["C"], case["M"], graph="ds", ratio=1.0, queries=case["queries"],
            precision=case["precision"],
        ).to(device).train()  # fmt: skip
        nodes = mod.node_sets(coarse, target)
        x.requires_grad_(True)

        def step(mod: CDGCModule = mod, inputs: tuple = (x, coarse, target)) -> None:
            mod.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = mod(*inputs)
            out.float().square().mean().backward()

        try:
            with warnings.catch_warnings(record=True) as caught, common.PeakMemory(device) as mem:
                warnings.simplefilter("always")
                for _ in range(2):
                    step()
                times = [common.time_call(step, device) for _ in range(ctx.sizes.step_iters)]
            with profile(activities=activities) as prof:
                step()
                common.sync(device)
        except (RuntimeError, NotImplementedError) as exc:
            row["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            record(ctx.out, "cdgc", {"records": rows})
            continue
        events = prof.key_averages()
        kernels = step_profile.device_ops(events)
        ms = common.summary(times)["median_ms"]
        gflop = cdgc_model_gflop(nodes, case["C"])
        tflops = gflop / ms  # GFLOP per ms = TFLOP/s
        row.update(
            status="ok",
            dtype="bf16 autocast" if cuda else "fp32",
            fwd_bwd_ms=ms,
            keys_per_image=[int(n.sum()) for n in nodes],
            classes_per_image=[int(n.flatten(1).any(1).sum()) for n in nodes],
            model_gflop=round(gflop, 2),
            achieved_tflops=round(tflops, 2),
            fraction_of_matmul_peak=round(tflops / peak["tflops"], 4),
            peak_mem_mb=round(mem.absolute_peak_mb if cuda else mem.peak_mb, 1),
            kernels=sum(e.count for e in kernels),
            warnings=sorted({str(w.message)[:200] for w in caught}),
            top_kernels=[
                {
                    "name": e.key[:120],
                    "calls": e.count,
                    "ms": round(e.self_device_time_total / 1e3, 3),
                }
                for e in kernels[:10]
            ],
        )
        rows.append(row)
        record(ctx.out, "cdgc", {"records": rows})
        mod = step = None
    if ctx.left() > 5:
        t, n, k = ctx.sizes.block_max_shape
        record(ctx.out, "cdgc", {"block_max_ms": block_max_ms(device, t, n, k, 10)})
    record(ctx.out, "cdgc", {"triton_available_after": triton_blocks.available()})


# ----------------------------------------------------------------------------- 6. extras


def stage_extras(ctx: Ctx) -> None:
    from benchmarks import inference

    device = _device()
    peak = matmul_peak_tflops(device, ctx.sizes.matmul_n)
    record(ctx.out, "extras", {"matmul_peak": peak})
    done: list[dict[str, Any]] = []

    def write(rows: list[dict[str, Any]]) -> None:
        record(ctx.out, "extras", {"presets": done + rows})

    for preset in ctx.sizes.extra_presets:
        done += measure_train_step(ctx, preset, ("cdgc", "baseline"), peak, write)
    if ctx.left() < (10 if ctx.dry_run else 30):
        record(ctx.out, "extras", {"inference": {"status": "skipped: stage time used up"}})
        return
    path = ctx.work / "inference.json"
    inference.main([*ctx.sizes.inference_args, "--json", str(path)])
    data = json.loads(path.read_text())
    record(ctx.out, "extras", {"inference": {"status": "ok", "records": data["records"]}})


STAGE_FUNCS: dict[str, Callable[[Ctx], None]] = {
    "env": stage_env,
    "gpu_tests": stage_gpu_tests,
    "trainer": stage_trainer,
    "train_step": stage_train_step,
    "cdgc": stage_cdgc,
    "extras": stage_extras,
}


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
        STAGE_FUNCS[name](ctx)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        msg = f"failed: {type(exc).__name__}: {str(exc)[:400]}"
        record(ctx.out, name, {"status": msg, "seconds": round(time.time() - t0, 1)})
        return 1
    record(ctx.out, name, {"status": "ok", "seconds": round(time.time() - t0, 1)})
    return 0


# ----------------------------------------------------------------------------- the lease


def run_stage(name: str, args: argparse.Namespace, env: dict[str, str], deadline: float) -> str:
    """One stage in its own process group, killed at its deadline; returns its status."""
    out = Path(args.out)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(out)]
    cmd += ["--work", args.work, "--deadline", str(deadline)]
    cmd += ["--dry-run"] if args.dry_run else []
    for item in args.set or ():
        cmd += ["--set", item]
    for item in args.variant or ():
        cmd += ["--variant", item]
    t0 = time.time()
    with open(out / LOG, "a") as log:
        log.write(f"\n===== {name} (limit {deadline - t0:.0f} s)\n")
        log.flush()
        # Its own process group (not a new session): killpg ends the stage with its loader
        # workers, and a kill of the whole command still reaches it.
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=os.setpgrp
        )
        try:
            code = proc.wait(timeout=max(deadline - t0, 1))
            killed = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code, killed = proc.returncode, True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # loader workers and the like, if any were left
    seconds = round(time.time() - t0, 1)
    status = load_results(out)["stages"].get(name, {}).get("status", "not started")
    if killed:
        status = f"timed out after {seconds} s (partial results kept)"
    elif status in ("running", "not started"):
        status = f"process ended with code {code} (partial results kept)"
    record(out, name, {"status": status, "seconds": seconds})
    return status


def parse_trainer_overrides(
    sets: Sequence[str] | None, variants: Sequence[str] | None, error: Callable[[str], Any]
) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """--set items and --variant strings (shell-split) as override tuples; error(message) for
    an item that is not KEY=VALUE (the trainer stage checks keys and values)."""
    parsed = tuple(tuple(shlex.split(v)) for v in variants or ())
    for item in [*(sets or ()), *itertools.chain.from_iterable(parsed)]:
        if "=" not in item or not item.split("=", 1)[0].strip():
            error(f"trainer override {item!r} is not KEY=VALUE (e.g. model.queries=members)")
    if any(not v for v in parsed):
        error("--variant needs at least one KEY=VALUE")
    return tuple(sets or ()), parsed


def stage_cap_s(sizes: Sizes, name: str, args: argparse.Namespace) -> float:
    """The most one stage may take; the trainer's cap holds for each configuration."""
    cap = sizes.stage_caps_s[name]
    return cap * max(1, len(args.variant or ())) if name == "trainer" else cap


def lease_main(args: argparse.Namespace) -> int:
    import torch

    sizes = DRY if args.dry_run else GPU
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_lease: torch sees no CUDA device; use --dry-run for the CPU check", file=sys.stderr
        )
        return 2
    budget = args.budget_s if args.budget_s is not None else sizes.budget_s
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (RESULTS, LOG):
        (out / name).unlink(missing_ok=True)
    args.work = tempfile.mkdtemp(prefix="gpu_lease-")
    stages = args.only or list(STAGES)
    record_lease(
        out,
        {
            "command": "python3 benchmarks/gpu_lease.py " + " ".join(sys.argv[1:]),
            "mode": sizes.label,
            "gpu_rows": "measured" if not args.dry_run else "not measured (dry run on CPU)",
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
            "budget_s": budget,
            "stages": stages,
            "trainer_set": args.set or [],
            "trainer_variants": args.variant or [],
        },
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:  # two torch threads per process on a busy 2-core machine crawl (spin-waits)
        env.setdefault("OMP_NUM_THREADS", "1")
    site = Path(args.work) / "site"
    try:
        wheels = prepare_wheels(Path(args.wheels), site)
    except (RuntimeError, SystemExit, subprocess.SubprocessError) as exc:
        wheels = {"status": f"failed: {exc}"}
    record_lease(out, {"wheels": wheels})
    paths = [str(site)] if wheels.get("site") else []
    paths += [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    print(f"gpu_lease: {sizes.label}; wheels: {wheels['status']}", flush=True)
    end = t_start + budget
    broken = []
    try:
        for name in stages:
            left = end - time.time()
            if left < 20:
                record(out, name, {"status": "skipped: the lease budget is used up"})
                print(f"gpu_lease: {name}: skipped (budget used up)", flush=True)
                continue
            deadline = time.time() + min(stage_cap_s(sizes, name, args), left)
            print(f"gpu_lease: {name} (limit {deadline - time.time():.0f} s) ...", flush=True)
            status = run_stage(name, args, env, deadline)
            print(f"gpu_lease: {name}: {status}", flush=True)
            if status != "ok":
                broken.append(name)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
        record_lease(out, {"seconds": round(time.time() - t_start, 1)})
    print_summary(out)
    if broken:
        print(f"gpu_lease: stages that failed or timed out: {broken}; see {out / LOG}")
    return 1 if broken else 0


def print_summary(out: Path) -> None:
    """The headline figures, for the end of the console output."""
    st = load_results(out)["stages"]
    lines = [f"env: {st.get('env', {}).get('line')}"]
    tests = st.get("gpu_tests", {})
    lines.append(f"gpu tests: {tests.get('counts')} (exit {tests.get('pytest_exit_code')})")
    run = st.get("trainer", {}).get("run", {})
    keys = ("step_ms_median", "images_per_s", "peak_allocated_mb", "peak_reserved_mb",
            "losses_finite", "loss_falling", "data_wait_fraction_median")  # fmt: skip
    lines.append("trainer: " + ", ".join(f"{k}={run.get(k)}" for k in keys))
    res = st.get("trainer", {}).get("resume", {})
    lines.append(
        f"resume: {res.get('status')}, loss rel diff {res.get('loss_max_rel_diff_vs_run')}"
    )
    prof = st.get("trainer", {}).get("profile") or {}
    lines.append(
        f"trainer profile: {prof.get('status')}, GPU busy {prof.get('gpu_busy_fraction')}, "
        f"host sync wait {prof.get('host_sync_wait_ms_per_step')} ms/step, "
        f"{prof.get('kernel_launches_per_step')} launches/step"
    )
    for g in st.get("trainer", {}).get("goals", []):
        lines.append(
            f"trainer vs plain {g['set']}: {g.get('status')}, step {g.get('trainer_step_ms')} / "
            f"{g.get('plain_step_ms')} ms = x{g.get('time_ratio')} (ok {g.get('time_ok')}), "
            f"memory +{g.get('memory_extra_mb')} MB (ok {g.get('memory_ok')}), resume "
            f"{g.get('resume_loss_max_rel_diff')}"
        )
    for r in st.get("train_step", {}).get("records", []):
        lines.append(
            f"train_step {r['case']}: {r.get('status')} {r.get('step_ms')} ms, "
            f"{r.get('images_per_s')} img/s, {r.get('peak_mem_mb')} MB, "
            f"{r.get('fraction_of_matmul_peak')} of matmul peak, "
            f"x{r.get('time_vs_baseline')} t / x{r.get('mem_vs_baseline')} mem vs baseline, "
            f"x{r.get('time_vs_torchvision')} t vs torchvision"
        )
    for r in st.get("cdgc", {}).get("records", []):
        lines.append(
            f"cdgc {r['side']}x{r['side']} M={r['M']} {r['queries']} {r['precision']}: "
            f"{r.get('status')} {r.get('fwd_bwd_ms')} ms, {r.get('achieved_tflops')} TFLOP/s "
            f"({r.get('fraction_of_matmul_peak')} of peak), {r.get('peak_mem_mb')} MB"
        )
    for name in STAGES:
        lines.append(f"stage {name}: {st.get(name, {}).get('status')}")
    print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--trainer-child"]:
        sep = argv.index("--")
        return trainer_child(argv[1], argv[2], argv[sep + 1 :])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", help="where lease.json and lease.log go (on the GPU machine: $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, fp32")
    ap.add_argument("--budget-s", type=float, default=None, help="whole run (GPU 560, dry 600)")
    ap.add_argument("--only", nargs="+", choices=STAGES, help="run these stages only")
    ap.add_argument("--wheels", default=str(WHEEL_DIR), help="wheel folder (default .whl)")
    ap.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="launch/train.py override for every trainer run (repeatable)",
    )
    ap.add_argument("--variant", action="append", metavar='"KEY=VALUE ..."',
                    help="a trainer configuration: these overrides on top of --set "
                         "(repeatable: one after another on the same data)")  # fmt: skip
    ap.add_argument("--build-wheels", nargs="?", const=str(WHEEL_DIR), metavar="DIR",
                    help="build the wheels for the GPU image into DIR and stop")  # fmt: skip
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_wheels:
        return build_wheels(Path(args.build_wheels))
    if not args.out:
        ap.error("--out is required")
    sets, variants = parse_trainer_overrides(args.set, args.variant, ap.error)
    if args.stage:
        ctx = Ctx(Path(args.out), Path(args.work), DRY if args.dry_run else GPU, args.dry_run,
                  args.deadline, sets, variants)  # fmt: skip
        return stage_main(args.stage, ctx)
    return lease_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
