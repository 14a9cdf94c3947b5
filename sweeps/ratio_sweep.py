"""Sweep the easy-positive ratio, the loss weights and the fusion mode with Ray Tune.

    python sweeps/ratio_sweep.py --config cityscapes [--address auto|ray://HOST:PORT]
        [--num-samples N] [--gpus-per-trial G] [--tracking-uri URI] [--smoke] [--resume]
        [key=value ...]

Every trial is a real training run (launch.train.run), an MLflow child run of the sweep's parent
run; ASHA stops weak trials on validation mIoU. At the end a table ranked by mIoU is printed and
logged on the parent run (sweep_results.md / .csv).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdgcnet.cdgc import check_ratio
from cdgcnet.heads import FUSIONS
from sweeps import resume_trust
from sweeps.common import (
    SEARCH_KEYS,
    absolute,
    add_common_args,
    base_config,
    check_tracking_reach,
    csv_text,
    default_experiment,
    init_ray,
    markdown_table,
)
from sweeps.mlflow_server import print_ui_hint, resolve_tracking_uri, tracking_server
from sweeps.runner import (
    SweepSpec,
    cpu_count,
    fit,
    log_table,
    mlflow_client,
    runs_by_trial,
    trial_failures,
    trial_statuses,
)
from sweeps.trial import FINISHED_KEY

RATIOS = (0.2, 0.4, 0.6, 0.8, 1.0)  # the paper's easy-positive sampling ratios (Table 3, 5)
# Loss weights around the paper's alpha 0.6, beta 0.7, gamma 0.4 (eq. 5).
ALPHAS = (0.4, 0.6, 0.8, 1.0)
BETAS = (0.5, 0.7, 1.0)
GAMMAS = (0.2, 0.4, 0.6)


def search_space(
    search: str, smoke: bool, ratios: Sequence[float] | None = None,
    fusions: Sequence[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """grid: ratio x fusion on a grid, loss weights drawn at random (num_samples draws per cell).
    random: every value drawn at random (num_samples trials). smoke: ratios 0.4 and 1.0 on a grid,
    the fusion drawn. `ratios` / `fusions` replace the default values.
    """
    from ray import tune

    ratios = list(ratios or ((0.4, 1.0) if smoke else RATIOS))
    fusions = list(fusions or FUSIONS)
    for r in ratios:
        check_ratio(r, "--ratios: each ratio")
    for f in fusions:
        if f not in FUSIONS:
            raise ValueError(f"--fusions: {f!r} is not one of {FUSIONS}")
    space: dict[str, Any] = {
        "alpha": tune.choice(list(ALPHAS)),
        "beta": tune.choice(list(BETAS)),
        "gamma": tune.choice(list(GAMMAS)),
    }
    if search == "grid":
        space["ratio"] = tune.grid_search(ratios)
        space["fusion"] = tune.choice(fusions) if smoke else tune.grid_search(fusions)
    elif search == "random":
        space["ratio"] = tune.choice(ratios)
        space["fusion"] = tune.choice(fusions)
    else:
        raise ValueError(f"--search must be grid or random, got {search!r}")
    return space


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(
        p,
        storage="runs/sweeps",
        smoke_help="CPU smoke run: scenes dataset, tiny model, a few iterations, 2 trials",
    )
    p.add_argument("--num-samples", type=int, default=1, help="draws per grid cell")
    p.add_argument(
        "--search",
        choices=("grid", "random"),
        default="grid",
        help="grid: every ratio x fusion, the loss weights drawn (--num-samples draws per "
        "cell); random: ratio, fusion and loss weights all drawn (--num-samples trials); "
        "default grid",
    )
    p.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=None,
        help=f"easy-positive ratios to sweep (default {' '.join(map(str, RATIOS))})",
    )
    p.add_argument(
        "--fusions",
        nargs="+",
        default=None,
        choices=FUSIONS,
        help="fusion modes to sweep (default both)",
    )
    p.add_argument(
        "--name",
        default=None,
        help="sweep name: Tune folder and parent run (default ratio-sweep-<time>; "
        "with --resume the newest sweep in --storage)",
    )
    p.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="iterations before ASHA may stop a trial (default eval.every or 1/8)",
    )
    p.add_argument(
        "--no-early-stop", action="store_true", help="no ASHA: every trial trains to the end"
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials running at once (default: as many as the CPUs/GPUs per trial allow)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    args = p.parse_args(argv)  # fmt: skip
    if args.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {args.num_samples}")
    return args


def asha(cfg: Any, smoke: bool, grace_period: int | None = None):
    """ASHA on validation mIoU, in training iterations; None when no evaluation falls before the
    last one (nothing to compare a trial on).

    Every rung lies at or before the last evaluation ahead of the final one: a trial must never be
    cut at its final evaluation, which comes before training returns and closes its MLflow run.
    """
    from ray.tune.schedulers import ASHAScheduler

    from sweeps.common import schedule_of

    iterations, every = schedule_of(cfg)
    last_rung = iterations - every
    grace = grace_period or (every if smoke else max(every, iterations // 8))
    if last_rung < grace:
        return None
    return ASHAScheduler(
        time_attr="iteration",
        max_t=last_rung,
        grace_period=grace,
        reduction_factor=2 if smoke else 3,
        stop_last_trials=False,  # past the last rung a trial trains to the end
    )


@dataclass
class SweepOutcome:
    parent_run_id: str
    rows: list[list[Any]]
    header: list[str]
    markdown: str
    complete: bool


TABLE_HEADER = ["rank", "trial", "ratio", "fusion", "alpha", "beta", "gamma",
                "miou", "iteration", "status", "retries", "mlflow_run"]  # fmt: skip
# retries: restarts of the trial (failure retries and resumes), from the attempt it reports.


def results_rows(
    grid: Any, statuses: dict[str, str], failures: dict[str, int], runs: dict[str, list[Any]]
) -> list[list[Any]]:
    """One row per trial, best mIoU first (trials without an evaluation last)."""
    rows = []
    # The grid's results come in the order of its trials, as do the statuses.
    for trial_id, result in zip(statuses, grid, strict=True):
        config = result.config or {}
        frame = result.metrics_dataframe
        best = float(frame["miou"].max()) if frame is not None and "miou" in frame else None
        last_it = (
            int(frame["iteration"].max()) if frame is not None and "iteration" in frame else None
        )
        done = (
            frame is not None
            and FINISHED_KEY in frame
            and bool(frame[FINISHED_KEY].fillna(False).any())
        )
        status = "done" if done else _status_word(statuses.get(trial_id), result.error)
        run_ids = ",".join(r.info.run_id for r in runs.get(trial_id, []))
        row = [trial_id, *(config.get(k) for k in ("ratio", "fusion", "alpha", "beta", "gamma"))]
        rows.append([*row, best, last_it, status, failures.get(trial_id, 0), run_ids])
    rows.sort(key=lambda r: -1.0 if r[6] is None else r[6], reverse=True)
    return [[i + 1, *row] for i, row in enumerate(rows)]


def _status_word(status: str | None, error: Any) -> str:
    if error is not None or status == "ERROR":
        return "error"
    if status == "TERMINATED":
        return "stopped early"  # ASHA
    return "unfinished"


def sweep_name(name: str | None, storage: Path, resume: bool) -> str:
    """The given name; else a new timestamped one, or with resume the newest sweep in storage."""
    if name:
        return name
    if not resume:
        return f"ratio-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    states = sorted(storage.glob("*.sweep.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        raise FileNotFoundError(f"{storage}: no sweep to resume (no *.sweep.json)")
    return states[-1].name.removesuffix(".sweep.json")


def run_sweep(args: argparse.Namespace, callbacks: Sequence[Any] = ()) -> SweepOutcome:
    """The whole sweep; `callbacks` are extra tune.Callback objects."""
    import torch

    storage = absolute(args.storage)
    config, overrides, cfg = base_config(
        args.config, args.overrides, smoke=args.smoke, smoke_data=storage / "smoke-data",
        reserved=list(SEARCH_KEYS.values()),
    )  # fmt: skip
    gpus = args.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if torch.cuda.is_available() else 0.0
    cpus = args.cpus_per_trial or (1.0 if args.smoke else 4.0)
    name = sweep_name(args.name, storage, args.resume)
    if args.resume:  # before any server starts: Tune would unpickle the folder's files
        resume_trust.check(storage, name)
    print(f"sweep {name!r}: Tune results in {storage / name}")
    check_tracking_reach(args.address, args.tracking_uri)
    with tracking_server(args.tracking_uri) as uri:
        init_ray(args.address, args.num_cpus or cpu_count())
        spec = SweepSpec(
            name=name,
            config=config,
            overrides=overrides,
            param_space=search_space(args.search, args.smoke, args.ratios, args.fusions),
            storage=storage,
            experiment=args.experiment or default_experiment(cfg, args.smoke),
            tracking_uri=uri,
            store_uri=resolve_tracking_uri(args.tracking_uri),
            tags={"sweep": name},
            num_samples=args.num_samples,
            cpus_per_trial=cpus,
            gpus_per_trial=gpus,
            workers_per_trial=args.workers_per_trial,
            max_failures=args.max_failures,
            max_concurrent=args.max_concurrent,
            scheduler=None if args.no_early_stop else asha(cfg, args.smoke, args.grace_period),
            callbacks=list(callbacks),
            keep_checkpoints=args.keep_checkpoints,
        )
        grid, parent_run_id, complete = fit(spec, resume=args.resume)
        statuses = trial_statuses(grid)
        client = mlflow_client(uri)
        failures = trial_failures(grid)
        rows = results_rows(grid, statuses, failures, runs_by_trial(client, parent_run_id))
        markdown = markdown_table(TABLE_HEADER, rows)
        title = f"## {name}: {len(rows)} trials ranked by validation mIoU"
        if not complete:
            title += " (interrupted: continue with --resume)"
        print(f"\n{title}\n\n{markdown}")
        log_table(client, parent_run_id, f"{title}\n\n{markdown}", csv_text(TABLE_HEADER, rows),
                  "sweep_results")  # fmt: skip
    print_ui_hint(args.tracking_uri, f"--sweep {name}")
    return SweepOutcome(parent_run_id, rows, TABLE_HEADER, markdown, complete)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        outcome = run_sweep(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # ConfigError included
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if outcome.complete else 130


if __name__ == "__main__":
    sys.exit(main())
