"""The lease: each stage in its own process group with its own deadline inside the overall
budget, most valuable first, so that a kill at any point leaves the most important results
written; the carried wheels installed before the first stage; the headline figures at the end.

Exit status 1 when a stage failed or timed out (a failing CUDA test is a finding, counted in
gpu_tests, not a stage failure); 2 without a GPU unless --dry-run."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lease import ROOT
from lease.context import DRY, GPU, STAGES, Sizes
from lease.results import LOG, RESULTS, load_results, record, record_lease
from lease.wheels import prepare_wheels


def stage_cap_s(sizes: Sizes, name: str, args: argparse.Namespace) -> float:
    """The most one stage may take; the trainer's cap holds for each configuration."""
    cap = sizes.stage_caps_s[name]
    return cap * max(1, len(args.variant or ())) if name == "trainer" else cap


def run_stage(name: str, args: argparse.Namespace, env: dict[str, str], deadline: float) -> str:
    """One stage in its own process group, killed at its deadline; returns its status."""
    out = Path(args.out)
    cmd = [sys.executable, "-m", "lease", "--stage", name, "--out", str(out)]
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


def run_lease(args: argparse.Namespace) -> int:
    """The whole lease: the wheels, then every stage asked for while the budget lasts."""
    sizes = DRY if args.dry_run else GPU
    if not args.dry_run and not torch.cuda.is_available():
        print("lease: torch sees no CUDA device; use --dry-run for the CPU check", file=sys.stderr)
        return 2
    budget = args.budget_s if args.budget_s is not None else sizes.budget_s
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (RESULTS, LOG):
        (out / name).unlink(missing_ok=True)
    args.work = tempfile.mkdtemp(prefix="lease-")
    stages = args.only or list(STAGES)
    record_lease(
        out,
        {
            "command": "python3 -m lease " + " ".join(sys.argv[1:]),
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
    print(f"lease: {sizes.label}; wheels: {wheels['status']}", flush=True)
    end = t_start + budget
    broken = []
    try:
        for name in stages:
            left = end - time.time()
            if left < 20:
                record(out, name, {"status": "skipped: the lease budget is used up"})
                print(f"lease: {name}: skipped (budget used up)", flush=True)
                continue
            deadline = time.time() + min(stage_cap_s(sizes, name, args), left)
            print(f"lease: {name} (limit {deadline - time.time():.0f} s) ...", flush=True)
            status = run_stage(name, args, env, deadline)
            print(f"lease: {name}: {status}", flush=True)
            if status != "ok":
                broken.append(name)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
        record_lease(out, {"seconds": round(time.time() - t_start, 1)})
    print_summary(out)
    if broken:
        print(f"lease: stages that failed or timed out: {broken}; see {out / LOG}")
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
