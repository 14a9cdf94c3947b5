"""--nodes against the launched world: environment parsing, and two torchrun agents on one
machine (`--nnodes 2`, c10d rendezvous on 127.0.0.1) standing for two nodes."""

from __future__ import annotations

import subprocess

import pytest

from launch.distributed import NodeCountError, check_nodes, world_from_env
from tests.launch.train_utils import BIN, TRAIN, args, env, free_port, losses, scenes_shards

LAUNCH_VARS = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "LOCAL_SIZE",
    "CROSS_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "SLURM_NTASKS",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NNODES",
    "SLURM_NTASKS_PER_NODE",
)


@pytest.fixture
def clean_env(monkeypatch):
    for v in LAUNCH_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def test_plain_python_is_one_node(clean_env) -> None:
    w = world_from_env()
    assert (w.world_size, w.nodes, w.launched) == (1, 1, False)
    check_nodes(1, w)
    check_nodes(None, w)


@pytest.mark.parametrize(
    ("launcher_env", "nodes"),
    [
        ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "4"}, 4),  # torchrun
        ({"WORLD_SIZE": "8", "LOCAL_SIZE": "4", "CROSS_SIZE": "2"}, 2),  # deepspeed launcher
        ({"WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "2"}, 3),
        ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 1),  # openmpi
        ({"SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2"}, 2),
    ],
)
def test_nodes_from_launcher_environment(clean_env, launcher_env, nodes) -> None:
    for k, v in launcher_env.items():
        clean_env.setenv(k, v)
    assert world_from_env().nodes == nodes


def test_mismatch_message(clean_env) -> None:
    for k, v in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "2"}.items():
        clean_env.setenv(k, v)
    with pytest.raises(NodeCountError) as e:
        check_nodes(4, world_from_env())
    msg = str(e.value)
    assert "--nodes 4 was asked for" in msg and "spans 2 node(s)" in msg
    assert "deepspeed --hostfile launch/hostfile" in msg and "hostfile.example" in msg


def _two_agents(cwd, a: list[str]) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                str(BIN / "torchrun"),
                "--nnodes",
                "2",
                "--node-rank",
                str(i),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "nodes-test",
                TRAIN,
                *a,
            ],
            cwd=cwd,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_two_torchrun_agents_are_two_nodes(tmp_path, tmp_path_factory) -> None:
    shards = scenes_shards(tmp_path_factory.getbasetemp())
    refused = _two_agents(tmp_path, ["--nodes", "4", *args(shards, tmp_path / "r4")])
    for p in refused:
        assert p.returncode != 0
        assert "--nodes 4 was asked for, but the launched job spans 2 node(s)" in p.stderr
        assert "deepspeed --hostfile launch/hostfile" in p.stderr
    assert not (tmp_path / "r4").exists()  # refused before any work

    run_dir = tmp_path / "r2"
    ok = _two_agents(tmp_path, ["--nodes", "2", *args(shards, run_dir, "schedule.iterations=2")])
    for p in ok:
        assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(losses(run_dir)) == [1, 2]
    assert "world_size=2 nodes=2" in (run_dir / "launch.txt").read_text()
