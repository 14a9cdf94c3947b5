"""The GPU lease end to end on CPU (`python -m lease --dry-run`): every stage writes its keys and
ends ok; a kill of the lease process keeps what was measured and ends every stage process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lease.context import DRY, STAGES
from lease.results import LOG, RESULTS

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
