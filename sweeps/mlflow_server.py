"""A local MLflow tracking server for sweeps whose store is a SQLite file.

Many trials writing to one SQLite file at once can hit "database is locked"; a single
`mlflow server` process in front of the file serialises the writes. Remote URIs (http://...,
databricks, ...) are used as given.

The server (and its uvicorn, job runner and huey consumer processes) ends with the sweep driver
however the driver ends: they carry an owner mark in their environment and a reaper
(pipeline.ray_local, the one the private Ray clusters use) ends them when the driver's pipe
closes, also after SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipeline.ray_local import OWNER_MARK, new_mark, start_reaper, stop_reaper

SQLITE_PREFIX = "sqlite:///"


def resolve_tracking_uri(uri: str | None) -> str:
    """The URI to use: `uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db.

    A relative SQLite path is made absolute, because trials run in their own working directories.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE_PREFIX}mlflow.db"
    db = sqlite_path(uri)
    if db is not None:
        return f"{SQLITE_PREFIX}{db}"
    if "://" not in uri:
        raise ValueError(
            f"tracking URI {uri!r}: expected sqlite:///PATH, http(s)://HOST:PORT or another "
            "MLflow store URI (a bare directory is a file store, which MLflow 3 refuses)"
        )
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The absolute database path of a sqlite:/// URI, None for any other URI."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    # sqlite:///rel/path.db is relative, sqlite:////abs/path.db absolute (SQLAlchemy rules).
    return Path(uri[len(SQLITE_PREFIX) :]).expanduser().resolve()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def print_ui_hint(uri: str | None, what: str) -> None:
    """Tell the user how to look at the runs in the MLflow UI (the sweep's server is gone):
    `python -m sweeps.compare <what>` opens MLflow's compare page on them."""
    resolved = resolve_tracking_uri(uri)
    compare = f"python -m sweeps.compare {what} --tracking-uri {resolved}"
    print(f"Compare the runs in the MLflow UI (val/miou against what differs):\n  {compare}")


@contextlib.contextmanager
def tracking_server(uri: str | None, *, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Yield a URI that concurrent trials can share.

    For a SQLite store: start `mlflow server` on 127.0.0.1 and a free port (artifacts in
    `mlartifacts/` beside the database, where `mlflow ui` run in that folder finds them), yield its
    http URI and stop the server on exit, also on error. Any other URI is yielded unchanged.
    """
    resolved = resolve_tracking_uri(uri)
    db = sqlite_path(resolved)
    if db is None:
        yield resolved
        return
    # MLflow prints a "View run at <url>" link per finished run: this server is gone after the
    # sweep, so print_ui_hint names the persistent store instead.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    db.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = db.parent / f"mlflow-server-{port}.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", resolved,
        # New experiments get a file root beside the database (readable with the SQLite URI
        # alone, no server); older mlflow-artifacts:/ ones are still served from the same folder.
        "--default-artifact-root", (db.parent / "mlartifacts").as_uri(),
        "--artifacts-destination", str(db.parent / "mlartifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    mark = new_mark()
    reaper = start_reaper(mark)  # ends the server's processes should this driver die
    server = None
    try:
        with open(log_path, "wb") as log:
            # A session of its own, so that stopping it also stops its uvicorn/gunicorn workers.
            server = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=db.parent,
                start_new_session=True, env={**os.environ, OWNER_MARK: mark},
            )  # fmt: skip
        _wait_healthy(server, url, log_path, startup_timeout_s)
        yield url
    finally:
        if server is not None:
            _stop(server)
        stop_reaper(reaper)
        with contextlib.suppress(OSError):
            log_path.unlink()


def _wait_healthy(server: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"mlflow server exited with code {server.returncode} before answering "
                f"{url}/health; its log {log_path}:\n{tail}"
            )
        if _healthy(url):
            return
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server did not answer {url}/health within {timeout_s:.0f} s")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=15)
