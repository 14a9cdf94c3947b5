"""Measure the two readings of section 3.3 (CDGC ``queries``) at demo scale, one command.

    OMP_NUM_THREADS=1 python sweeps/readings.py                 # train what is missing, diagnose, table
    python sweeps/readings.py --only scenes/all --seeds 0 1     # a subset
    python sweeps/readings.py --table                           # only the table of what is there

Each run is `python launch/train.py --config {scenes,context} ...` (single process, 200
iterations, the preset's settings; the `context` preset is `scenes` on the generated context set),
two at a time, into runs/readings/<dataset>/<variant>/s<seed>; a run whose model.pt exists is not
trained again. Every exported model then goes through launch/diagnose.py (normal inference, the
graph built as in training, the coarse head alone) and the results are collected into one JSON
(default benchmarks/results/cdgc_readings_runs.json) and printed as markdown tables (mean and
spread over seeds). Runs are listed in priority order: with little time the first ones finish.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RUNS = ROOT / "runs" / "readings"
RESULTS = ROOT / "benchmarks" / "results" / "cdgc_readings_runs.json"

# variant -> model overrides. "baseline" and "plain" do not depend on the reading.
VARIANTS: dict[str, list[str]] = {
    "baseline": ["model.context=none"],
    "plain": ["model.context=plain_gcn"],
    "members/sim": ["model.graph=sim", "model.queries=members"],
    "members/ds1": ["model.graph=ds", "model.ratio=1.0", "model.queries=members"],
    "members/ds0.6": ["model.graph=ds", "model.ratio=0.6", "model.queries=members"],
    "all/sim": ["model.graph=sim", "model.queries=all"],
    "all/ds1": ["model.graph=ds", "model.ratio=1.0", "model.queries=all"],
    "all/ds0.6": ["model.graph=ds", "model.ratio=0.6", "model.queries=all"],
}
COMMON = ["logging.enabled=false", "runtime.progress=false"]

# (dataset, variant, seed) in the order they are run: the most telling first, so that a sweep
# cut short still answers the main questions (does "all" stop the leak? the orderings on context).
PLAN: list[tuple[str, str, int]] = [
    ("scenes", "all/ds1", 0),
    ("scenes", "all/sim", 0),
    ("context", "baseline", 0),
    ("context", "all/ds1", 0),
    ("context", "all/sim", 0),
    ("context", "plain", 0),
    ("scenes", "all/ds1", 1),
    ("context", "members/ds1", 0),
    ("context", "members/sim", 0),
    ("scenes", "all/sim", 1),
    ("scenes", "all/ds0.6", 0),
    ("context", "all/ds1", 1),
    ("context", "all/sim", 1),
    ("context", "baseline", 1),
    ("context", "members/ds1", 1),
    ("context", "all/ds0.6", 0),
    ("scenes", "members/ds0.6", 0),
    ("scenes", "all/ds1", 2),
    ("scenes", "all/sim", 2),
    ("scenes", "all/ds0.6", 1),
    ("context", "plain", 1),
    ("context", "members/sim", 1),
    ("context", "members/ds0.6", 0),
    ("context", "all/ds0.6", 1),
    ("scenes", "all/ds0.6", 2),
    ("scenes", "baseline", 0),
    ("scenes", "members/ds1", 0),
    ("scenes", "members/sim", 0),
    ("scenes", "baseline", 1),
    ("scenes", "members/ds1", 1),
    ("scenes", "members/sim", 1),
    ("scenes", "members/ds0.6", 1),
    ("scenes", "baseline", 2),
    ("scenes", "members/ds1", 2),
    ("scenes", "members/sim", 2),
    ("scenes", "members/ds0.6", 2),
    ("context", "members/ds0.6", 1),
]


def run_dir(dataset: str, variant: str, seed: int) -> Path:
    return RUNS / dataset / variant.replace("/", "-") / f"s{seed}"


def train_command(dataset: str, variant: str, seed: int) -> list[str]:
    return [
        sys.executable, str(ROOT / "launch" / "train.py"), "--config", dataset,
        *VARIANTS[variant], f"runtime.seed={seed}", *COMMON,
        "--run-dir", str(run_dir(dataset, variant, seed)),
    ]  # fmt: skip


def _selected(only: Sequence[str], seeds: Sequence[int] | None) -> list[tuple[str, str, int]]:
    def keep(d: str, v: str, s: int) -> bool:
        name = f"{d}/{v}"
        return (not only or any(name.startswith(o) for o in only)) and (seeds is None or s in seeds)

    return [(d, v, s) for d, v, s in PLAN if keep(d, v, s)]


def train_all(plan: list[tuple[str, str, int]], parallel: int) -> None:
    """Train the runs without a model.pt, `parallel` at a time; logs in <run_dir>/train.log."""
    todo = [p for p in plan if not (run_dir(*p) / "model.pt").is_file()]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = str(ROOT)
    running: list[tuple[tuple[str, str, int], subprocess.Popen, float]] = []
    while todo or running:
        todo = [p for p in todo if not (run_dir(*p) / "model.pt").is_file()]
        while todo and len(running) < parallel:
            p = todo.pop(0)
            d = run_dir(*p)
            d.mkdir(parents=True, exist_ok=True)
            if (d / "model.pt").is_file() or not _claim(d):
                continue  # trained meanwhile, or being trained by another sweeps/readings.py
            log = open(d / "train.log", "w")  # noqa: SIM115 (closed with the process)
            proc = subprocess.Popen(
                train_command(*p), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            (d / "claim.pid").write_text(str(proc.pid))  # held while the training process lives
            running.append((p, proc, time.time()))
            print(f"start {'/'.join(map(str, p))}", flush=True)
        time.sleep(5)
        for item in list(running):
            p, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                state = "done" if proc.returncode == 0 else f"FAILED rc={proc.returncode}"
                print(f"{state} {'/'.join(map(str, p))} in {time.time() - t0:.0f} s", flush=True)


def _claim(d: Path) -> bool:
    """Mark d as being trained; False when a live (training) process already holds it."""
    claim = d / "claim.pid"
    if claim.is_file():
        try:
            os.kill(int(claim.read_text()), 0)
            return False
        except (ProcessLookupError, ValueError):
            pass  # a finished or crashed sweep left it
    tmp = d / f".claim.{os.getpid()}"
    tmp.write_text(str(os.getpid()))
    tmp.replace(claim)
    return True


def diagnose_all(plan: list[tuple[str, str, int]]) -> list[dict]:
    """launch/diagnose.py on every trained run (cached in <run_dir>/diagnose.json)."""
    from launch.diagnose import diagnose_run

    rows = []
    for dataset, variant, seed in plan:
        d = run_dir(dataset, variant, seed)
        if not (d / "model.pt").is_file():
            continue
        cache = d / "diagnose.json"
        if cache.is_file() and cache.stat().st_mtime >= (d / "model.pt").stat().st_mtime:
            result = json.loads(cache.read_text())
        else:
            result = diagnose_run(d / "model.pt", progress=False)
            cache.write_text(json.dumps(result, indent=1) + "\n")
        rows.append({"dataset": dataset, "variant": variant, "seed": seed, **result})
    return rows


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f} (1 seed)"
    return f"{statistics.mean(values):.4f} +- {(max(values) - min(values)) / 2:.4f} ({len(values)} seeds)"


def tables(rows: list[dict]) -> str:
    """Markdown: per dataset and variant, mean +- half-range over seeds of each measure."""
    out = []
    for dataset in ("scenes", "context"):
        out += [
            f"\n{dataset} val mIoU (mean +- half the range over seeds; per-seed values in the JSON)\n",
            "| variant | (a) normal | (b) training graph | lift (b)-(a) | (c) coarse head | (a)-(c) | seeds |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant in VARIANTS:
            rs = sorted(
                (r for r in rows if r["dataset"] == dataset and r["variant"] == variant),
                key=lambda r: r["seed"],
            )
            if not rs:
                continue

            def col(key: str, rs=rs) -> str:
                vals = [r[key] for r in rs if r.get(key) is not None]
                return (
                    _mean_spread(vals).replace(f" ({len(vals)} seeds)", "").replace(" (1 seed)", "")
                )

            seeds = ", ".join(f"{r['seed']}: {r['normal']:.4f}" for r in rs)
            out.append(
                f"| {variant} | {col('normal')} | {col('training_graph')} | {col('lift')} | "
                f"{col('coarse')} | {col('refined_vs_coarse')} | {seeds} |"
            )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sweeps/readings.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only", nargs="*", default=[], help="dataset/variant prefixes, e.g. scenes/all"
    )
    p.add_argument("--seeds", nargs="*", type=int, default=None)
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--table", action="store_true", help="no training: diagnose and tabulate")
    p.add_argument("--no-diagnose", action="store_true", help="train only")
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    plan = _selected(args.only, args.seeds)
    if not args.table:
        train_all(plan, args.parallel)
    if args.no_diagnose:
        return 0
    rows = diagnose_all(plan)
    from benchmarks.common import write_json

    write_json(
        args.json,
        {
            "runs": rows,
            "commands": {f"{d}/{v}/s{s}": " ".join(train_command(d, v, s)[1:]) for d, v, s in plan},
        },
    )
    print(tables(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
