"""The sweep's MLflow server ends with its driver, also when the driver is SIGKILLed: the server,
its uvicorn, job runner and huey consumer processes are reaped and the port closes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

DRIVER = """
import sys, time
from sweeps.mlflow_server import tracking_server
with tracking_server(sys.argv[1]) as uri:
    print(uri, flush=True)
    time.sleep(600)
"""


def _gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


@pytest.mark.slow
def test_sigkill_of_the_driver_takes_the_mlflow_server_with_it(tmp_path) -> None:
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, f"sqlite:///{tmp_path}/m.db"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    tree: list[psutil.Process] = []
    try:
        uri = driver.stdout.readline().strip()
        assert uri.startswith("http://127.0.0.1:"), uri
        time.sleep(3)  # let the server start its job runner and consumers
        tree = psutil.Process(driver.pid).children(recursive=True)
        server = [p for p in tree if "mlflow" in " ".join(p.cmdline())]
        assert len(server) >= 2, [p.cmdline() for p in tree]  # the server and its workers
        driver.kill()
        driver.wait()
        assert not _gone(server, 30), "MLflow processes outlived their driver"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{uri}/health", timeout=2)
    finally:
        driver.kill()
        for p in tree:  # what this test started, should the check have failed
            with contextlib.suppress(psutil.Error):
                p.kill()
