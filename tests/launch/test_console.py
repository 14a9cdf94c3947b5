"""What training leaves off the console: library chatter, and all but one line per failure."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from launch.console import peer_failed, quiet_libraries, report_failure
from tests.launch.train_utils import free_port


def test_deepspeed_untested_optimizer_warning_is_left_off(caplog) -> None:
    quiet_libraries()
    quiet_libraries()  # idempotent: one filter
    ds = logging.getLogger("DeepSpeed")
    assert sum(type(f).__name__ == "_DropMessages" for f in ds.filters) == 1
    with caplog.at_level(logging.WARNING, logger="DeepSpeed"):
        ds.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
        ds.warning("something that matters")
    assert [r.getMessage() for r in caplog.records] == ["something that matters"]


def test_a_failure_is_one_line_and_its_traceback_goes_to_the_run_dir(tmp_path, capsys) -> None:
    try:
        raise ValueError("shard train-000003.tar: bad label 77\nsecond line")
    except ValueError as e:
        report_failure(e, tmp_path / "run", rank=0, world_size=1)
    log = tmp_path / "run" / "error-rank0.log"
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: ValueError: shard train-000003.tar: bad label 77 (traceback in {log})"]
    assert "Traceback (most recent call last)" in log.read_text()
    assert not peer_failed()  # no process group: nobody to ask


def _rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    sys.stderr = open(Path(out) / f"stderr{rank}", "w")  # noqa: SIM115 (closed at exit)
    if rank == 1:
        dist.barrier()  # rank 0 fails first
    try:
        raise RuntimeError("the same failure on every rank")
    except RuntimeError as e:
        report_failure(e, Path(out) / "run", rank, 2)
    if rank == 0:
        dist.barrier()
    dist.barrier()
    assert peer_failed()
    sys.stderr.flush()
    dist.destroy_process_group()


def test_the_same_failure_on_two_ranks_is_one_line(tmp_path) -> None:
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    lines = [
        ln
        for rank in (0, 1)
        for ln in (tmp_path / f"stderr{rank}").read_text().splitlines()
        if ln.startswith("error:")
    ]
    assert lines == [
        "error: rank 0: RuntimeError: the same failure on every rank "
        f"(traceback in {tmp_path / 'run' / 'error-rank0.log'})"
    ]
    assert (tmp_path / "run" / "error-rank1.log").is_file()  # said nothing, kept its traceback


def test_progress_off_a_terminal_is_a_line_per_tenth_of_the_run(capsys) -> None:
    from launch.hooks import StepResult
    from launch.train_log import ProgressLines

    lines = ProgressLines(total=200, start=100)  # resumed half-way
    for it in range(101, 201):
        lines.step(StepResult(it, 0.01, {"total": 1.0}, True, 0.5, 0.0), images_per_s=8.0)
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in out] == [f"iteration {i}/200" for i in range(120, 201, 20)]
    assert out[0].startswith("iteration 120/200: loss 1.0000, lr 1.00e-02, 8.0 img/s, ")
    assert out[-1].endswith("0.0 min left")
