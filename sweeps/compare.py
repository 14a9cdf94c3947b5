"""Open an ablation table's or a sweep's runs side by side in MLflow's UI: one command, no clicks.

    python -m sweeps.compare --table 5 [--tracking-uri URI] [--experiment NAME]
    python -m sweeps.compare --sweep ratio-sweep-20261204-160322
    python -m sweeps.compare --stop          # stop the UI this command started for the store

Prints the URL of MLflow's compare page with exactly those runs selected: a table's rows (per
row, the newest FINISHED run tagged `tableN` = row, as the table itself reads them) or a sweep's
trials (every run tagged `sweep_run` = the sweep's run), best val/miou first. That page plots
the first metric the compared runs share, which for this project's training runs is `val/miou`
(launch.tracking logs it first), against the params that differ between them (where a run lives
and what it is called are not params). It opens straight on the comparison: no GenAI landing
page, no runs table to filter and tick.

The UI: for a SQLite store, the `mlflow ui` this command started before for the same store if it
still answers (its address is kept in `mlflow-ui.json` beside the database), else a new one on a
free 127.0.0.1 port, left running in the background (`--stop` ends it; its log is
`mlflow-ui.log` beside the database). For an http(s) store, that server's own UI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sweeps.mlflow_server import (
    SQLITE_PREFIX,
    _healthy,
    free_port,
    resolve_tracking_uri,
    sqlite_path,
)

STATE_FILE = "mlflow-ui.json"  # beside the database: the UI this command started
LOG_FILE = "mlflow-ui.log"
MIOU = "val/miou"


class CompareError(RuntimeError):
    """Nothing to compare, or no UI to compare it in; the message says which."""


# ---------------------------------------------------------------- which runs


def _experiment_ids(client: Any, experiment: str | None) -> list[str]:
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments()]
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise CompareError(f"no MLflow experiment named {experiment!r} in {client.tracking_uri}")
    return [exp.experiment_id]


def table_runs(client: Any, table: int, experiment: str | None = None) -> list[Any]:
    """Table `table`'s rows in the table's order: per row the newest FINISHED run tagged with it."""
    from sweeps.tables import TABLES
    from sweeps.trial import table_tag

    tag = table_tag(table)
    found = client.search_runs(
        _experiment_ids(client, experiment),
        filter_string=f"tags.{tag} IS NOT NULL and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    newest: dict[str, Any] = {}
    for run in found:
        newest.setdefault(run.data.tags[tag], run)
    order = [row.variant for row in TABLES[table].rows] if table in TABLES else []
    rank = {v: i for i, v in enumerate(order)}
    runs = sorted(newest.values(), key=lambda r: rank.get(r.data.tags[tag], len(rank)))
    if not runs:
        raise CompareError(
            f"no finished run of Table {table} in {client.tracking_uri}: run "
            f"`python sweeps/ablations.py --table {table}` first (or give --tracking-uri)"
        )
    return runs


def sweep_runs(client: Any, name: str, experiment: str | None = None) -> list[Any]:
    """The trial runs of the sweep named `name` (its newest run of that name), best first."""
    from sweeps.runner import GROUP_TAG

    ids = _experiment_ids(client, experiment)
    parents = client.search_runs(
        ids,
        filter_string=f"tags.role = 'sweep' and attributes.run_name = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise CompareError(f"no sweep named {name!r} in {client.tracking_uri}")
    parent = parents[0].info.run_id
    runs = client.search_runs(ids, filter_string=f"tags.{GROUP_TAG} = '{parent}'", max_results=5000)
    runs = [
        r for r in runs if MIOU in r.data.metrics and r.data.metrics[MIOU] == r.data.metrics[MIOU]
    ]
    if not runs:
        raise CompareError(f"sweep {name!r} has no trial with a {MIOU} yet")
    return sorted(runs, key=lambda r: -r.data.metrics[MIOU])


# ---------------------------------------------------------------- the page


def compare_url(base: str, runs: Sequence[Any]) -> str:
    """MLflow's compare page for `runs` (the UI reads `runs` and `experiments` as JSON lists;
    `workflowType=machine_learning` is the sidebar's "Model training" switch, not GenAI)."""
    run_ids = [r.info.run_id for r in runs]
    experiments = sorted({r.info.experiment_id for r in runs})
    query = "runs={}&experiments={}&workflowType=machine_learning".format(
        urllib.parse.quote(json.dumps(run_ids, separators=(",", ":"))),
        urllib.parse.quote(json.dumps(experiments, separators=(",", ":"))),
    )
    return f"{base.rstrip('/')}/#/compare-runs?{query}"


def ensure_runs_table_kind(client: Any, runs: Sequence[Any]) -> None:
    """Experiments made before launch.tracking tagged their kind open on MLflow's GenAI overview
    from the compare page's links: give them the model-training kind."""
    from launch.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    for exp_id in {r.info.experiment_id for r in runs}:
        if client.get_experiment(exp_id).tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


# ---------------------------------------------------------------- the UI


def _state(db: Path) -> dict | None:
    try:
        state = json.loads((db.parent / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if state.get("store") == f"{SQLITE_PREFIX}{db}" else None


def find_ui(db: Path) -> str | None:
    """The URL of the UI this command started for the database, if it still answers."""
    state = _state(db)
    if state is None:
        return None
    url = f"http://127.0.0.1:{int(state['port'])}"
    return url if _healthy(url) else None


def start_ui(db: Path, timeout_s: float = 180.0) -> str:
    """`mlflow ui` for the database on a free loopback port, in the background; its URL."""
    port = free_port()
    store = f"{SQLITE_PREFIX}{db}"
    command = [
        sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store,
        "--artifacts-destination", str(db.parent / "mlartifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = db.parent / LOG_FILE
    with open(log, "wb") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=db.parent, start_new_session=True,  # outlives this command, stopped by --stop
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        if server.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            tail = log.read_text(errors="replace")[-1500:]
            raise CompareError(f"mlflow ui did not start (log {log}):\n{tail}")
        time.sleep(0.5)
    state = {"store": store, "port": port, "pid": server.pid, "log": str(log)}
    (db.parent / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    return url


def stop_ui(db: Path) -> bool:
    """Stop the UI this command started for the database; False when none was running."""
    state = _state(db)
    (db.parent / STATE_FILE).unlink(missing_ok=True)
    if state is None:
        return False
    try:
        os.killpg(int(state["pid"]), signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def ui_for(store: str) -> tuple[str, bool]:
    """(UI base URL, whether this call started it) for a store URI."""
    db = sqlite_path(store)
    if db is None:  # an http(s) tracking server serves its own UI
        return store, False
    found = find_ui(db)
    return (found, False) if found else (start_ui(db), True)


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sweeps.compare",
        description="Open an ablation table's or a sweep's runs in MLflow's compare page "
        "(val/miou plotted against the params that differ).",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--table", type=int, choices=[1, 2, 3, 4, 5], help="an ablation table")
    what.add_argument("--sweep", help="a sweep's name (ratio-sweep-<date>-<time> or --name)")
    what.add_argument("--stop", action="store_true", help="stop the UI started for the store")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    p.add_argument("--experiment", default=None, help="search this experiment only")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        store = resolve_tracking_uri(args.tracking_uri)
        db = sqlite_path(store)
        if args.stop:
            stopped = db is not None and stop_ui(db)
            print("stopped the MLflow UI" if stopped else f"no MLflow UI was running for {store}")
            return 0
        if db is not None and not db.is_file():
            raise CompareError(f"{db}: no MLflow store here (give --tracking-uri)")
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=store)
        if args.table is not None:
            runs, what = table_runs(client, args.table, args.experiment), f"Table {args.table}"
        else:
            runs, what = sweep_runs(client, args.sweep, args.experiment), f"sweep {args.sweep}"
        ensure_runs_table_kind(client, runs)
        base, started = ui_for(store)
    except (CompareError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = ", ".join(r.info.run_name for r in runs[:6]) + (", ..." if len(runs) > 6 else "")
    print(f"{what}: {len(runs)} runs ({names}), {MIOU} against the params that differ:")
    print(compare_url(base, runs))
    if db is not None:
        how = "started" if started else "already running"
        port = urllib.parse.urlparse(base).port
        print(
            f"(MLflow UI {how} on {base}; `python -m sweeps.compare --stop` ends it; from another "
            f"machine: ssh -L {port}:127.0.0.1:{port} HOST)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
