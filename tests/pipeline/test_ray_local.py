"""Private Ray clusters die with their driver, and a refused join is one line."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.ray_local import (
    LOOPBACK_SWITCH,
    OWNER_MARK,
    marked_processes,
    reap,
    remember_descendants,
)

REPO = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    e.update(extra)
    return e


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def test_reap_kills_only_the_marked_processes() -> None:
    marked = subprocess.Popen(["sleep", "60"], env=_env(**{OWNER_MARK: "test-a"}))
    other = subprocess.Popen(["sleep", "60"], env=_env(**{OWNER_MARK: "test-b"}))
    try:
        assert [p.pid for p in marked_processes("test-a")] == [marked.pid]
        assert reap("test-a", grace_s=2) == 1
        marked.wait(timeout=5)  # ended (reap collected its status already)
        assert other.poll() is None and not marked_processes("test-a")
    finally:
        other.kill()
        marked.kill()


def test_reap_follows_remembered_children_that_lost_the_mark() -> None:
    """Ray's raylet starts its agents without the mark: the reaper remembers them as children of
    a marked process, and kills them after their parent died (re-parented to init)."""
    parent = subprocess.Popen(
        ["sh", "-c", f"env -u {OWNER_MARK} sleep 60 & echo $!; wait"],
        env=_env(**{OWNER_MARK: "test-d"}), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        known: dict[int, float] = {}
        remember_descendants("test-d", known)
        assert child.pid in known and parent.pid in known
        parent.kill()
        parent.wait()
        assert child.is_running() and not marked_processes("test-d")
        assert reap("test-d", known, grace_s=2) == 1
        assert not _wait_gone([child], 5)
    finally:
        with contextlib.suppress(psutil.Error):
            child.kill()


def test_the_reaper_acts_when_its_driver_is_killed() -> None:
    """The reaper waits on a pipe from the driver; SIGKILL of the driver closes it."""
    driver_code = (
        "import subprocess, sys, time\n"
        "r = subprocess.Popen([sys.executable, '-m', 'pipeline.ray_local', '--reap', 'test-c'],"
        " stdin=subprocess.PIPE, start_new_session=True)\n"
        "print(r.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    orphan = subprocess.Popen(["sleep", "60"], env=_env(**{OWNER_MARK: "test-c"}))
    driver = subprocess.Popen(
        [sys.executable, "-c", driver_code], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        reaper = psutil.Process(int(driver.stdout.readline()))
        time.sleep(0.5)
        assert orphan.poll() is None
        driver.kill()
        assert orphan.wait(timeout=15) == -signal.SIGTERM
        assert not _wait_gone([reaper], 10), "the reaper should exit after reaping"
    finally:
        orphan.kill()
        driver.kill()


def _ray_descendants(root: psutil.Process) -> list[psutil.Process]:
    try:
        kids = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in kids if _name(p).startswith(("ray::", "raylet", "gcs_server"))]


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


@pytest.mark.slow
def test_sigkill_of_a_ray_pack_leaves_no_ray_process(tmp_path: Path) -> None:
    from launch.demo import pack_command
    from pipeline.synth import generate

    data = tmp_path / "data"
    generate("scenes", data, train=40, val=2, size=(96, 64))
    cmd = [*pack_command(data, tmp_path / "shards"), "--no-progress", "--workers", "2", "--ray",
           "--max-count", "1"]  # fmt: skip
    driver = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    root = psutil.Process(driver.pid)
    deadline = time.monotonic() + 120
    seen: dict[int, psutil.Process] = {}
    while time.monotonic() < deadline and driver.poll() is None:
        for p in _ray_descendants(root):
            seen.setdefault(p.pid, p)
        if any(_name(p).startswith("ray::pack_shard") for p in seen.values()):
            break  # Ray workers are packing: kill the driver mid-job
        time.sleep(0.1)
    assert driver.poll() is None, "the pack ended before Ray workers were seen"
    for p in _ray_descendants(root):
        seen.setdefault(p.pid, p)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    alive = _wait_gone(list(seen.values()), 30)
    assert not alive, f"Ray processes outlived the driver: {[(p.pid, _name(p)) for p in alive]}"


_HOLD_CLUSTER = """
import sys, ray
from pipeline.ray_local import start_local, stop_local
start_local(1)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
stop_local()
"""


@pytest.mark.slow
def test_joining_with_a_wrong_or_missing_token_is_one_quick_line(tmp_path: Path) -> None:
    from pipeline.synth import generate

    generate("scenes", tmp_path / "data", train=2, val=1, size=(96, 64))
    clean = {k: v for k, v in _env().items() if not k.startswith("RAY_AUTH")}
    clean[LOOPBACK_SWITCH] = "0"  # else Ray reads 127.0.0.1 as this machine's network address
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_CLUSTER], cwd=REPO, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**clean, "HOME": str(tmp_path / "head")},
    )  # fmt: skip
    try:
        address = holder.stdout.readline().strip()
        assert address, "the private cluster did not start"
        token = (tmp_path / "head" / ".ray" / "auth_token").read_text().strip()
        pack = [sys.executable, "-m", "pipeline.pack", "cityscapes", "--src",
                str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--ray-address", address]  # fmt: skip
        for extra, why in (
            (
                {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
                "refused the token given (wrong token)",
            ),
            ({}, "needs a token"),
        ):
            t0 = time.monotonic()
            proc = subprocess.run(
                pack, cwd=REPO, capture_output=True, text=True, timeout=120,
                env={**clean, "HOME": str(tmp_path / "client"), **extra},
            )  # fmt: skip
            assert proc.returncode == 1, proc.stderr[-3000:]
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
            assert f"the Ray cluster at {address} {why}" in errors[0]
            assert "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token>" in errors[0]
            assert time.monotonic() - t0 < 20  # Ray itself retries for ~20 s before failing
        t0 = time.monotonic()
        nobody = subprocess.run(
            [*pack[:-1], f"127.0.0.1:{_free_port()}"], cwd=REPO, capture_output=True, text=True,
            timeout=120, env={**clean, "HOME": str(tmp_path / "client")},
        )  # fmt: skip
        assert nobody.returncode == 1 and "Traceback" not in nobody.stderr, nobody.stderr[-3000:]
        assert "error: no Ray cluster answers at 127.0.0.1:" in nobody.stderr
        assert time.monotonic() - t0 < 40
        ok = subprocess.run(
            [sys.executable, "-c",
             f"from pipeline.ray_local import check_cluster_access; check_cluster_access({address!r})"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
            env={**clean, "HOME": str(tmp_path / "client"), "RAY_AUTH_MODE": "token",
                 "RAY_AUTH_TOKEN": token},
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr[-3000:]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
