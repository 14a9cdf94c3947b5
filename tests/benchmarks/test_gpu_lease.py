"""The GPU lease (lease/): the CPU dry run writes the files and keys of a GPU lease; the carried
wheels are installed only where a package is missing or older; the helpers that read the
trainer's records and the profiler's op names."""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch

from lease.cdgc import cdgc_model_gflop
from lease.context import DRY, GPU, STAGES, Ctx, parse_trainer_overrides
from lease.results import LOG, RESULTS, load_results
from lease.supervisor import stage_cap_s
from lease.trainer import FROM_SCRATCH, _variant_writer, trainer_variants, versus_plain
from lease.trainer_run import step_summary
from lease.wheels import (
    WHEEL_PACKAGES,
    _constraint_pins,
    install_wheels,
    plan_wheels,
    prepare_wheels,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # about a minute of CPU: two short DeepSpeed runs and the benchmark stages
def test_dry_run_writes_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lease", "--dry-run", "--out", str(out)]
    cmd += ["--wheels", str(tmp_path / "no_wheels"), "--set", "runtime.seed=1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [RESULTS, LOG]
    data = json.loads((out / RESULTS).read_text())
    assert data["lease"]["gpu_rows"] == "not measured (dry run on CPU)"
    assert data["lease"]["wheels"]["status"].startswith("no wheel folder")
    st = data["stages"]
    assert list(st) == list(STAGES)
    assert {name: s["status"] for name, s in st.items()} == dict.fromkeys(STAGES, "ok")

    assert st["env"]["device"] == "cpu" and st["env"]["torch"].startswith("2.")
    # Without CUDA every GPU test is collected and skipped, none deselected by mistake.
    assert st["gpu_tests"]["counts"] == {"SKIPPED": len(st["gpu_tests"]["tests"])}
    assert len(st["gpu_tests"]["tests"]) >= 10

    run, resume = st["trainer"]["run"], st["trainer"]["resume"]
    n, half = DRY.iterations, DRY.iterations // 2
    assert [r["iteration"] for r in run["iterations"]] == list(range(1, n + 1))
    assert run["status"] == "ok" and run["losses_finite"] and run["step_ms_median"] > 0
    assert [(c["tag"], c["complete"]) for c in run["checkpoints"]] == [
        (f"iter_{half:08d}", True),
        (f"iter_{n:08d}", True),
    ]
    assert run["exported_model"]
    assert run["pretrained_override"] == "model.pretrained=none"
    assert resume["status"] == "ok"
    assert resume["iterations_after_resume"] == list(range(half + 1, n + 1))
    assert resume["loss_max_rel_diff_vs_run"] == 0.0  # fp32 on CPU: the resume is exact
    trainer = st["trainer"]
    assert trainer["set"] == ["runtime.seed=1"] and "runtime.seed=1" in trainer["command"]
    assert data["lease"]["trainer_set"] == ["runtime.seed=1"]
    prof = trainer["profile"]
    assert prof["status"] == "ok" and prof["iterations"] == [3, 3] and prof["steps"] == 1
    assert prof["wall_ms_per_step"] > 0 and prof["top_host_ops"]
    assert prof["gpu_busy_fraction"] is None and prof["top_kernels"] == []  # CPU
    assert trainer["plain"]["status"] == "ok" and trainer["plain"]["step_ms"] > 0
    (goal,) = trainer["goals"]
    assert goal["set"] == ["runtime.seed=1"] and goal["status"] == "ok"
    assert goal["time_ratio"] == round(run["step_ms_median"] / trainer["plain"]["step_ms"], 3)
    assert goal["memory_extra_mb"] is None  # CPU: no device memory to compare

    rows = {r["case"]: r for r in st["train_step"]["records"]}
    for case in ("cdgc", "baseline", "cdgc_fp32"):
        r = rows[case]
        assert r["status"] == "ok", r
        assert r["step_ms"] > 0 and r["images_per_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["fraction_of_matmul_peak"] > 0
    assert rows["cdgc"]["gflop_per_step"] > rows["baseline"]["gflop_per_step"]
    assert rows["baseline"]["time_vs_baseline"] == 1.0

    cdgc = st["cdgc"]
    assert cdgc["triton"] is (importlib.util.find_spec("triton") is not None)
    recs = cdgc["records"]
    assert [(r["queries"], r["precision"]) for r in recs] == [
        (c["queries"], c["precision"]) for c in DRY.cdgc_cases
    ]
    for r in recs:
        assert r["status"] == "ok" and r["fwd_bwd_ms"] > 0 and r["model_gflop"] > 0, r
        assert r["top_kernels"] == [] and r["warnings"] == []  # CPU: no device kernels
        assert len(r["keys_per_image"]) == r["B"] and min(r["classes_per_image"]) >= 1
    assert set(cdgc["block_max_ms"]) == {"segment_reduce", "scatter_reduce"}

    assert {r["case"] for r in st["extras"]["presets"]} == {"cdgc", "baseline"}
    inference = st["extras"]["inference"]
    assert inference["status"] == "ok"
    assert [r["case"] for r in inference["records"]] == ["whole", "slide"]


@pytest.mark.slow  # one DeepSpeed start-up, killed once the first iterations are on disk
def test_a_kill_keeps_what_was_measured(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lease", "--dry-run", "--out", str(out)]
    cmd += ["--wheels", str(tmp_path / "no_wheels"), "--only", "trainer"]
    (tmp_path / "tmp").mkdir()  # the script's work folder goes here (TMPDIR), not in /tmp
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path / "tmp"))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    results = out / RESULTS
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if results.is_file():
                run = json.loads(results.read_text())["stages"].get("trainer", {}).get("run", {})
                if run.get("iterations"):
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "the dry run ended before it could be killed"
    finally:
        proc.kill()  # the lease process alone, as a kill of the whole command would
        proc.wait()
    # Its stage notices and takes its process group (the trainer, loader workers) with it.
    deadline = time.time() + 30
    while time.time() < deadline and _processes_naming(out):
        time.sleep(0.5)
    assert not _processes_naming(out)
    data = json.loads(results.read_text())  # whole: every write is a rename
    trainer = data["stages"]["trainer"]
    assert trainer["status"] == "running"
    assert trainer["data"]["samples"] == {
        "train": DRY.synth_train,
        "val": DRY.synth_val,
    }
    assert trainer["run"]["status"] == "running"
    first = trainer["run"]["iterations"][0]
    assert first["iteration"] == 1 and first["finite"] and first["t_s"] > 0
    assert sorted(p.name for p in out.iterdir()) == [RESULTS, LOG]


def _processes_naming(path: Path) -> list[str]:
    """Command lines of live processes that mention path."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(
                line
                for line in (proc / "status").read_text().splitlines()
                if line.startswith("State:")
            )
        except (OSError, StopIteration):
            continue
        if str(path) in cmdline and "zombie" not in state:
            found.append(cmdline)
    return found


# ----------------------------------------------------------------------------- wheels


def _wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal valid pure-Python wheel."""
    dist = f"{name}-{version}.dist-info"
    members = dict(files)
    members[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    members[f"{dist}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, text in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    members[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in members.items():
            z.writestr(member, text)
    return path


def test_wheels_are_installed_only_where_missing_or_older(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    have = metadata.version("tqdm")
    missing = _wheel(wheels, "lease_probe", "1.0", {"lease_probe/__init__.py": "VALUE = 42\n"})
    _wheel(wheels, "tqdm", have, {})  # present at the same version: kept
    _wheel(wheels, "packaging", "0.1", {})  # present and newer than the wheel: kept
    newer = _wheel(wheels, "PyYAML", "999.0", {})  # present but older than the wheel
    install, kept = plan_wheels(wheels)
    assert set(install) == {missing, newer}
    assert set(kept) == {"tqdm", "packaging"}
    assert kept["tqdm"] == f"present ({have} >= {have})"

    site = tmp_path / "site"
    install_wheels([missing], site)
    env = dict(os.environ, PYTHONPATH=str(site))
    probe = [sys.executable, "-c", "import lease_probe; print(lease_probe.VALUE)"]
    assert subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip() == "42"


def test_two_wheels_of_one_package_are_refused(tmp_path: Path) -> None:
    _wheel(tmp_path, "lease_probe", "1.0", {})
    _wheel(tmp_path, "Lease_Probe", "1.1", {})  # the same package, spelled otherwise
    with pytest.raises(SystemExit, match="two wheels of lease-probe"):
        plan_wheels(tmp_path)


def test_missing_wheel_folder_says_how_to_build_it(tmp_path: Path) -> None:
    info = prepare_wheels(tmp_path / "absent", tmp_path / "site")
    assert "make gpu-wheels" in info["status"] and info["site"] is None


def test_every_carried_package_is_pinned() -> None:
    pins = _constraint_pins(WHEEL_PACKAGES)
    assert len(pins) == len(WHEEL_PACKAGES)
    assert all("==" in p for p in pins)


# ----------------------------------------------------------------------------- helpers


def test_step_time_leaves_out_warmup_and_the_step_after_a_save() -> None:
    t = [0.0, 5.0, 5.5, 6.0, 9.0, 9.5]  # iteration 1 at 0 s; iteration 5 follows a 2.5 s save
    rows = [{"iteration": i + 1, "t_s": s, "data_wait_fraction": 0.1 * i} for i, s in enumerate(t)]
    got = step_summary(rows, skip={5}, warmup=2)
    assert got["steps_timed"] == 3  # iterations 3, 4 and 6
    assert got["step_ms_median"] == 500.0 and got["step_ms_max"] == 500.0
    assert got["data_wait_fraction_median"] == 0.35  # iterations 3-6


def test_cdgc_model_flops_count_each_product_once() -> None:
    import torch

    nodes = torch.zeros(1, 3, 2, 2, dtype=torch.bool)  # N = 4
    nodes[0, 0, 0] = True  # 2 keys of class 0
    nodes[0, 2, 1, 1] = True  # 1 key of class 2: T = 3, K' = 2
    n, t, k, c = 4, 3, 2, 8
    forward = 2 * (2 * n * c * c + t * c * c + 2 * n * t * c + n * k * c * c)
    assert cdgc_model_gflop(nodes, c) == pytest.approx(3 * forward / 1e9)


def test_from_scratch_override_loads_the_paper_preset() -> None:
    from launch.config import check_pretrained, load_config

    cfg = load_config("cityscapes", [FROM_SCRATCH])
    check_pretrained(cfg)  # the paper preset refuses to start without it
    assert cfg.model.pretrained == "none"


def test_trainer_overrides_and_variants(tmp_path: Path) -> None:
    def error(message: str) -> None:
        raise ValueError(message)

    sets, variants = parse_trainer_overrides(
        ["runtime.precision=bf16"], ["model.queries=members", "a.b=1 'c.d=[1, 2]'"], error
    )
    assert sets == ("runtime.precision=bf16",)
    assert variants == (("model.queries=members",), ("a.b=1", "c.d=[1, 2]"))
    with pytest.raises(ValueError, match="'members' is not KEY=VALUE"):
        parse_trainer_overrides(None, ["members"], error)
    ctx = Ctx(tmp_path, tmp_path, GPU, False, 0.0, sets, variants)
    assert trainer_variants(ctx) == [
        (*sets, "model.queries=members"),
        (*sets, "a.b=1", "c.d=[1, 2]"),
    ]
    alone = Ctx(tmp_path, tmp_path, GPU, False, 0.0, sets, ())
    assert trainer_variants(alone) == [sets]
    # Each configuration gets the trainer's cap; the first writes stages.trainer, the rest
    # stages.trainer.variants[].
    args = argparse.Namespace(variant=["x=1", "y=2"])
    assert stage_cap_s(GPU, "trainer", args) == 2 * 200
    assert stage_cap_s(GPU, "trainer", argparse.Namespace(variant=None)) == 200
    assert stage_cap_s(GPU, "cdgc", args) == 75
    _variant_writer(ctx, 0)({"set": []})
    _variant_writer(ctx, 2)({"set": ["y=2"]})
    _variant_writer(ctx, 1)({"set": ["x=1"], "run": {"status": "ok"}})
    trainer = load_results(tmp_path)["stages"]["trainer"]
    assert trainer["set"] == []
    assert trainer["variants"] == [{"set": ["x=1"], "run": {"status": "ok"}}, {"set": ["y=2"]}]


def test_trainer_against_the_plain_step() -> None:
    run = {"step_ms_median": 60.0, "train_peak_allocated_mb": 7000.0}
    plain = {"step_ms": 50.0, "peak_mem_mb": 5800.0, "device": "cuda"}
    row = versus_plain(run, plain, {"gpu_busy_fraction": 0.93})
    assert row["time_ratio"] == 1.2 and row["time_ok"] is False
    assert row["memory_extra_mb"] == 1200.0 and row["memory_ok"] is True
    assert row["gpu_busy_fraction"] == 0.93
    cpu = versus_plain(run, {**plain, "device": "cpu"}, None)
    assert cpu["memory_extra_mb"] is None and cpu["memory_ok"] is None
    assert versus_plain({}, plain, None)["time_ok"] is None  # the run failed


def test_profile_summary_from_device_and_host_events() -> None:
    from types import SimpleNamespace as NS

    from benchmarks import step_profile

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
