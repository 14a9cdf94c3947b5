"""Nothing listens beyond this machine: the listening sockets of the whole process tree of a
training run (the rendezvous store, gloo), a Ray pack and a smoke sweep are all on loopback."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.launch.train_utils import REPO, TRAIN, args, env, free_port, scenes_shards


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _listeners(roots: list[int]) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of the trees under roots."""
    found = set()
    for root in roots:
        try:
            tree = [psutil.Process(root)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            try:
                name = proc.name()
                for c in proc.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        found.add((name, c.laddr.ip, c.laddr.port))
            except psutil.Error:
                continue
    return found


def watch(cmds: list, timeout: float):
    """Run the commands (each a list, or a (list, environment) pair) together, sampling their
    process trees' listening sockets until all end; returns (return codes, outputs, listeners
    seen)."""
    procs = []
    for c in cmds:
        cmd, environment = c if isinstance(c, tuple) else (c, env())
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    seen: set = set()
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        seen |= _listeners([p.pid for p in procs])
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outs = [p.communicate()[0] for p in procs]
    return [p.returncode for p in procs], outs, seen


def _rank_env(rank: int, port: int) -> dict[str, str]:
    return env(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip


def test_a_world_of_one_keeps_its_store_on_loopback() -> None:
    code = (
        "import json, psutil, torch\n"
        "from launch.distributed import init_distributed, world_from_env\n"
        "init_distributed(world_from_env())\n"
        "torch.distributed.barrier()\n"
        "print(json.dumps([c.laddr.ip for c in psutil.Process().net_connections('inet') "
        "if c.status == psutil.CONN_LISTEN]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    listening = json.loads(proc.stdout.strip().splitlines()[-1])
    assert listening, "the store should listen somewhere"
    assert all(is_loopback(ip) for ip in listening), listening


@pytest.mark.slow
def test_two_rank_training_listens_on_loopback_only(tmp_path: Path) -> None:
    shards = scenes_shards(tmp_path)
    port = free_port()
    a = args(shards, tmp_path / "run", "schedule.iterations=2", "checkpoint.every=0",
             "eval.num_pictures=0")  # fmt: skip
    cmd = [sys.executable, TRAIN, *a]
    codes, outs, seen = watch([(cmd, _rank_env(0, port)), (cmd, _rank_env(1, port))], 300)
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert any(port == p for _, _, p in seen), f"the store on MASTER_PORT {port} was not seen"
    outside = {s for s in seen if not is_loopback(s[1])}
    assert not outside, f"listening beyond loopback: {sorted(outside)}"


@pytest.mark.slow
def test_ray_pack_listens_on_loopback_only(tmp_path: Path) -> None:
    from launch.demo import pack_command
    from pipeline.synth import generate

    data = tmp_path / "data"
    generate("scenes", data, train=8, val=2, size=(96, 64))
    cmd = [*pack_command(data, tmp_path / "shards"), "--no-progress", "--workers", "2", "--ray",
           "--max-count", "2"]  # fmt: skip
    codes, outs, seen = watch([cmd], 300)
    assert codes == [0], outs[0][-3000:]
    names = {n for n, _, _ in seen}
    assert "gcs_server" in names and "raylet" in names, seen  # Ray did start
    outside = {s for s in seen if not is_loopback(s[1])}
    assert not outside, f"listening beyond loopback: {sorted(outside)}"


@pytest.mark.slow
def test_smoke_sweep_listens_on_loopback_only(tmp_path: Path) -> None:
    shards = scenes_shards(tmp_path)
    cmd = [
        sys.executable, str(REPO / "sweeps" / "ratio_sweep.py"), "--smoke", "--no-early-stop",
        "--ratios", "1.0", "--fusions", "concat", "--storage", str(tmp_path / "sweeps"),
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--num-cpus", "2",
        f"data.root={shards}", "schedule.iterations=2", "eval.every=0",
    ]  # fmt: skip
    codes, outs, seen = watch([cmd], 500)
    assert codes == [0], outs[0][-4000:]
    names = {n for n, _, _ in seen}
    assert "gcs_server" in names, seen
    outside = {s for s in seen if not is_loopback(s[1])}
    assert not outside, f"listening beyond loopback: {sorted(outside)}"


def test_loopback_helpers(monkeypatch) -> None:
    from launch.distributed import WorldInfo, single_machine
    from launch.distributed import is_loopback as host_is_loopback

    one_node = WorldInfo(0, 0, 2, 2, 1, launched=True)
    two_nodes = WorldInfo(0, 0, 4, 2, 2, launched=True)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert single_machine(one_node) and not single_machine(two_nodes)
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.1")
    assert not single_machine(one_node)

    assert host_is_loopback("127.0.0.1") and host_is_loopback("localhost")
    assert not host_is_loopback("192.0.2.1") and not host_is_loopback("no-such-host.invalid")
    assert is_loopback("::ffff:127.0.0.1") and not is_loopback("::")
