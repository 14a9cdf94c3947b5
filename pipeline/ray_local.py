"""Private Ray clusters on this machine that listen on loopback only and die with their driver;
joining an existing cluster with one clear line when it refuses us.

`pipeline.pack` and the sweeps start their own Ray when no cluster address is given:

    with local_ray(num_cpus=4): ...          # or start_local(4) ... stop_local()

Loopback. Ray 2.60 replaces a node address of 127.0.0.1 by the machine's network address
(`resolve_ip_for_localhost`) and then binds GCS, raylet, object manager and workers to every
interface, and the runtime-env agent to that address. Ray keeps a node on loopback only when
clusters are "disabled" (its Windows/macOS default), which `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`
selects; it is set while the cluster starts, so that this process and the Ray processes it
spawns all see it. Token authentication stays on (Ray's default for a new local cluster).

Fate. Ray's processes outlive a driver killed with SIGKILL (they are re-parented to init). Each
private cluster gets a reaper: a small process in its own session that waits for the driver's
end (the pipe it reads from closes, however the driver dies) and then kills every process that
carries this cluster's owner mark in its environment, and every process it saw descend from
one. The mark is in the environment only while Ray starts, so it reaches GCS, raylet and,
through the raylet, the workers, but no process the driver starts later; the raylet starts its
agents with an environment of their own, so the reaper remembers the marked processes'
children while it waits (every REAPER_POLL_S).

    python -m pipeline.ray_local --reap MARK      # the reaper (started by start_local)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

LOOPBACK = "127.0.0.1"
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch: "0" keeps a new node on the loopback address."""
OWNER_MARK = "CDGCNET_RAY_OWNER"
"""Environment variable that marks the processes of one private cluster."""
REAPER_POLL_S = 2.0

TOKEN_HELP = (
    "Ray clusters enforce token authentication: give this process the cluster's token with "
    "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> (or RAY_AUTH_TOKEN_PATH=<file>, default "
    "~/.ray/auth_token); `ray get-auth-token` on the head node prints it"
)

_reaper: subprocess.Popen | None = None


class RayJoinError(ValueError):
    """An existing Ray cluster cannot be joined; the message is one line saying why."""


# ---------------------------------------------------------------- private clusters


def start_local(num_cpus: int, **init_kwargs) -> None:
    """ray.init a new private cluster of `num_cpus` CPUs on loopback, with a reaper.

    No dashboard; other ray.init arguments (runtime_env, logging_level, ...) pass through.
    """
    global _reaper
    import ray
    from ray._private import ray_constants

    mark = new_mark()
    saved = {k: os.environ.get(k) for k in (LOOPBACK_SWITCH, OWNER_MARK)}
    saved_switch = ray_constants.ENABLE_RAY_CLUSTER
    _reaper = start_reaper(mark)
    os.environ.update({LOOPBACK_SWITCH: "0", OWNER_MARK: mark})
    ray_constants.ENABLE_RAY_CLUSTER = False  # Ray read the switch at import: set its copy too
    try:
        # address="local": never attach to a cluster named by a leftover
        # /tmp/ray/ray_current_cluster from an earlier `ray start`.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            **init_kwargs,
        )
    except BaseException:
        _stop_reaper()
        raise
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_switch
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stop_local() -> None:
    """Shut Ray down and let the reaper remove anything that survived."""
    import ray

    ray.shutdown()
    _stop_reaper()


def _stop_reaper() -> None:
    global _reaper
    if _reaper is not None:
        stop_reaper(_reaper)
    _reaper = None


@contextlib.contextmanager
def local_ray(num_cpus: int, **init_kwargs) -> Iterator[None]:
    """A private loopback cluster for the duration of the block."""
    start_local(num_cpus, **init_kwargs)
    try:
        yield
    finally:
        stop_local()


# ---------------------------------------------------------------- the reaper


def new_mark() -> str:
    """A fresh owner mark for the processes of one service (a Ray cluster, an MLflow server)."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


def start_reaper(mark: str) -> subprocess.Popen:
    """A reaper for the processes started with OWNER_MARK=mark in their environment: they end
    when this process ends, however it ends (even SIGKILL), or at `stop_reaper`."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.ray_local", "--reap", mark],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the driver's process group spares it
        env={k: v for k, v in os.environ.items() if k != OWNER_MARK},
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def stop_reaper(reaper: subprocess.Popen) -> None:
    """Close the reaper's pipe: it ends what is left of its processes, then itself."""
    with contextlib.suppress(OSError):
        reaper.stdin.close()
    try:
        reaper.wait(timeout=30)
    except subprocess.TimeoutExpired:
        reaper.kill()


def marked_processes(mark: str) -> list:
    """psutil.Process objects of this user whose environment carries OWNER_MARK=mark."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(OWNER_MARK) == mark:
                found.append(proc)
        except (psutil.Error, OSError):
            continue  # gone, or another user's
    return found


def remember_descendants(mark: str, known: dict[int, float]) -> None:
    """Add the marked processes and all their descendants to known (pid -> start time)."""
    import psutil

    for proc in marked_processes(mark):
        try:
            for p in [proc, *proc.children(recursive=True)]:
                known.setdefault(p.pid, p.create_time())
        except psutil.Error:
            continue


def _still_running(known: dict[int, float]) -> list:
    """The remembered processes that still run (the same process: pid and start time match)."""
    import psutil

    alive = []
    for pid, started in known.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and pid != os.getpid():
                alive.append(p)
        except psutil.Error:
            continue
    return alive


def reap(mark: str, known: dict[int, float] | None = None, grace_s: float = 3.0) -> int:
    """SIGTERM the marked processes and the remembered ones, SIGKILL what is left after
    grace_s; returns how many were signalled."""
    import psutil

    by_pid = {p.pid: p for p in _still_running(known or {})}
    by_pid.update({p.pid: p for p in marked_processes(mark)})
    procs = list(by_pid.values())
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    # Workers started while we were killing carry the mark too.
    late = marked_processes(mark)
    for p in late:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return len(procs) + len(late)


def _reaper_main(mark: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, not us
    known: dict[int, float] = {}
    fd = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], REAPER_POLL_S)
        if ready and not os.read(fd, 4096):
            break  # EOF: the driver closed the pipe or died
        remember_descendants(mark, known)
    time.sleep(0.5)  # a clean ray.shutdown() is already done; give stragglers a moment
    reap(mark, known)
    return 0


# ---------------------------------------------------------------- joining a cluster


def _gcs_address(address: str) -> str | None:
    """HOST:PORT of the cluster's GCS for `auto` or `HOST:PORT`; None for ray:// (Ray Client)."""
    if address.startswith("ray://"):
        return None
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)


_PROBE_CLUSTER_ID = "c0" * 28
"""Any cluster id but the real one: GCS checks the token first, then the id, so the reply to a
request made with it says at once whether the token passed."""


def check_cluster_access(address: str, timeout_s: float = 10.0) -> None:
    """Ask the cluster's GCS one question with this process's token.

    ray.init answers a wrong or missing token with "Failed to connect" after ~20 s of retries,
    and an address where nothing answers with minutes of them; this answers in one request
    (at most timeout_s), with RayJoinError saying which setting is missing or that nothing
    answers. An address of 127.0.0.1 means this machine's network address to Ray, unless
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (how the private clusters here run).
    """
    from ray._raylet import AuthenticationTokenLoader, GcsClient
    from ray.exceptions import AuthenticationError

    try:
        gcs = _gcs_address(address)
    except Exception as e:  # Ray raises several kinds for a bad address
        raise RayJoinError(f"no Ray cluster at {address!r}: {_first_line(e)}") from None
    if gcs is None:
        return
    try:
        GcsClient(address=gcs, cluster_id=_PROBE_CLUSTER_ID).internal_kv_get(
            b"probe", None, timeout=timeout_s
        )
    except AuthenticationError as e:
        if "InvalidAuthToken" not in str(e):
            return  # e.g. WrongClusterID: the token was accepted
        has_token = AuthenticationTokenLoader.instance().has_token()
        why = "refused the token given (wrong token)" if has_token else "needs a token"
        raise RayJoinError(f"the Ray cluster at {gcs} {why}. {TOKEN_HELP}") from None
    except Exception as e:  # unreachable or timed out: ray.init would retry for minutes
        raise RayJoinError(f"no Ray cluster answers at {gcs}: {_first_line(e)}") from None


def join_cluster(address: str, **init_kwargs) -> None:
    """ray.init(address=...) after check_cluster_access; RayJoinError in one line on failure."""
    import ray
    from ray.exceptions import AuthenticationError

    check_cluster_access(address)
    try:
        ray.init(address=address, **init_kwargs)
    except AuthenticationError as e:
        raise RayJoinError(f"cannot join the Ray cluster at {address}: {_first_line(e)}") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayJoinError(
            f"cannot join the Ray cluster at {address}: {_first_line(e)} ({TOKEN_HELP})"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--reap":
        sys.exit("usage: python -m pipeline.ray_local --reap MARK")
    sys.exit(_reaper_main(sys.argv[2]))
