"""The lease's two files in DIR: lease.json, every result so far, and lease.log, everything the
stages printed. lease.json is rewritten whole after each step (write, then rename), so a kill at
any point leaves what was measured until then; each stage owns `stages.<name>`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json_atomic

RESULTS = "lease.json"
LOG = "lease.log"


def load_results(out: Path) -> dict[str, Any]:
    """DIR/lease.json, or an empty record before the first write."""
    path = out / RESULTS
    if not path.is_file():
        return {"lease": {}, "stages": {}}
    with open(path) as f:
        return json.load(f)


def record(out: Path, stage: str, payload: dict[str, Any]) -> None:
    """Merge payload into stages[stage] of DIR/lease.json (atomic rewrite: a kill keeps it)."""
    results = load_results(out)
    results["stages"].setdefault(stage, {}).update(payload)
    write_json_atomic(out / RESULTS, results)


def record_lease(out: Path, payload: dict[str, Any]) -> None:
    """Merge payload into the `lease` section: the command, the mode, the wheels, the time."""
    results = load_results(out)
    results["lease"].update(payload)
    write_json_atomic(out / RESULTS, results)
