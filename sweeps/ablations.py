"""Run the paper's ablation Tables 1-5 and write them in the paper's layout, ours beside the paper's.

    python sweeps/ablations.py --table {1,2,3,4,5,all} --config cityscapes [--smoke]
        [--tracking-uri URI] [--address auto|ray://HOST:PORT] [key=value ...]

Every configuration is an MLflow run tagged table=N, variant=..., config_hash=...; a rerun reuses
a FINISHED run with the same three tags instead of training again. Training runs go through Ray
Tune (sweeps/runner.py, the same trials as the ratio sweep, without early stopping); Table 4
evaluates one trained model with and without multi-scale / flip (launch.evaluation). Each table
is printed and logged as `tableN.md` on a run tagged table=N, role=table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdgcnet.inference import MS_SCALES
from sweeps.common import (
    absolute,
    add_common_args,
    base_config,
    check_tracking_reach,
    config_hash,
    default_experiment,
    init_ray,
    markdown_table,
)
from sweeps.mlflow_server import tracking_server
from sweeps.runner import SweepSpec, cpu_count, experiment_id, fit, mlflow_client
from sweeps.tables import TABLES, Row, Table

MIOU_METRIC = "val/miou"  # logged by launch.tracking.Tracker.log_evaluation


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--table", required=True, choices=["1", "2", "3", "4", "5", "all"])
    add_common_args(
        p,
        storage="runs/ablations",
        smoke_help="CPU smoke run: scenes dataset, tiny model, a few iterations",
    )
    return p.parse_args(argv)  # fmt: skip


@dataclass
class Settings:
    """What every table of one invocation shares."""

    config: str
    overrides: list[str]  # base overrides, absolute data root
    cfg: Any  # the base TrainConfig (for the report line and Table 4's evaluation)
    experiment: str
    uri: str
    storage: Path
    cpus_per_trial: float
    gpus_per_trial: float
    workers_per_trial: int | None
    max_failures: int
    address: str | None  # Ray, started on first use: reruns that reuse every row need none
    num_cpus: int


@dataclass
class Line:
    """One row of a finished table."""

    row: Row
    miou: float | None  # fraction, None when the run did not finish
    run_id: str | None
    reused: bool


def find_finished(client: Any, exp_id: str, table: int, variant: str, digest: str) -> Any | None:
    """The newest FINISHED run of this table row with this config hash, if any."""
    runs = client.search_runs(
        [exp_id],
        filter_string=(
            f"tags.table = '{table}' and tags.variant = '{variant}' and "
            f"tags.config_hash = '{digest}' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def train_rows(
    s: Settings, table: int, rows: dict[str, tuple[str, ...]], parent_run_id: str
) -> dict[str, tuple[Any, bool]]:
    """variant -> (finished MLflow run or None, reused); trains the rows without a finished run."""
    from ray import tune

    client = mlflow_client(s.uri)
    exp_id = experiment_id(client, s.experiment)
    digests = {v: config_hash([*s.overrides, *o], s.config) for v, o in rows.items()}
    found = {v: find_finished(client, exp_id, table, v, d) for v, d in digests.items()}
    pending = [v for v, run in found.items() if run is None]
    if pending:
        print(f"Table {table}: training {len(pending)} configuration(s): {', '.join(pending)}")
        init_ray(s.address, s.num_cpus)
        spec = SweepSpec(
            name=f"table{table}-{time.strftime('%Y%m%d-%H%M%S')}",
            config=s.config,
            overrides=s.overrides,
            param_space={"variant": tune.grid_search(pending)},
            storage=s.storage,
            experiment=s.experiment,
            tracking_uri=s.uri,
            variants={v: list(rows[v]) for v in pending},
            tags={"table": str(table)},
            cpus_per_trial=s.cpus_per_trial,
            gpus_per_trial=s.gpus_per_trial,
            workers_per_trial=s.workers_per_trial,
            max_failures=s.max_failures,
            parent_run_id=parent_run_id,
        )
        fit(spec)
    out = {}
    for v, d in digests.items():
        run = found[v] or find_finished(client, exp_id, table, v, d)
        out[v] = (run, found[v] is not None)
    return out


def table_parent(s: Settings, table: Table) -> str:
    """A run per table and invocation: parent of newly trained rows, holder of tableN.md."""
    client = mlflow_client(s.uri)
    run = client.create_run(
        experiment_id(client, s.experiment),
        run_name=f"table {table.number}",
        tags={"table": str(table.number), "role": "table"},
    )
    client.log_param(run.info.run_id, "config", s.config)
    client.log_param(run.info.run_id, "overrides", " ".join(s.overrides)[:6000])
    return run.info.run_id


def run_training_table(s: Settings, table: Table, parent_run_id: str) -> list[Line]:
    runs = train_rows(s, table.number, {r.variant: r.overrides for r in table.rows}, parent_run_id)
    return [_line(row, *runs[row.variant]) for row in table.rows]


def _line(row: Row, run: Any, reused: bool) -> Line:
    if run is None:
        return Line(row, None, None, reused)
    return Line(row, run.data.metrics.get(MIOU_METRIC), run.info.run_id, reused)


def eval_overrides(row: Row) -> list[str]:
    scales = list(MS_SCALES) if row.ms else [1.0]
    return [f"eval.scales={scales}", f"eval.flip={str(row.flip).lower()}"]


def run_evaluation_table(s: Settings, table: Table, parent_run_id: str) -> list[Line]:
    """Table 4: train (or reuse) the model once, then evaluate it per row (or reuse)."""
    trained, _ = train_rows(s, table.number, {"train": table.train}, parent_run_id)["train"]
    if trained is None:
        raise RuntimeError(f"Table {table.number}: training the evaluated model did not finish")
    model_path = Path(trained.data.tags.get("run_dir", "")) / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(
            f"{model_path}: the exported model of run {trained.info.run_id} is missing "
            "(run dirs must stay where training wrote them)"
        )
    client = mlflow_client(s.uri)
    exp_id = experiment_id(client, s.experiment)
    lines = []
    for row in table.rows:
        overrides = [*s.overrides, *table.train, *eval_overrides(row)]
        # The evaluated model is part of what decides the result: a retrained model is new.
        digest = config_hash([*overrides, f"model_run={trained.info.run_id}"], s.config)
        run = find_finished(client, exp_id, table.number, row.variant, digest)
        reused = run is not None
        if run is None:
            run_id = evaluate_row(
                s, table, row, overrides, digest, model_path, trained, parent_run_id
            )
            run = client.get_run(run_id)
        lines.append(_line(row, run, reused))
    return lines


def evaluate_row(
    s: Settings, table: Table, row: Row, overrides: list[str], digest: str, model_path: Path,
    trained: Any, parent_run_id: str,
) -> str:  # fmt: skip
    """Evaluate the exported model with the row's scales / flip as an MLflow run; its id."""
    from cdgcnet.labels import LABEL_SPECS
    from launch.config import load_config
    from launch.evaluation import evaluate
    from launch.export import load_exported
    from launch.tracking import Tracker
    from pipeline.reader import EvalStream

    cfg = load_config(s.config, overrides)
    cfg.logging.tracking_uri = s.uri
    cfg.logging.experiment = s.experiment
    cfg.logging.parent_run_id = parent_run_id
    cfg.logging.tags = {
        **cfg.logging.tags,
        "table": str(table.number),
        "variant": row.variant,
        "config_hash": digest,
        "model_run": trained.info.run_id,
    }
    tracker = Tracker(cfg, enabled=True, kind="evaluation")
    tracker.start(
        run_name=f"table{table.number}-{row.variant}", tags={"checkpoint": str(model_path)}
    )
    try:
        model, _ = load_exported(model_path)
        stream = EvalStream(Path(cfg.data.root) / cfg.data.val_split)
        cm = evaluate(
            model, stream, num_classes=cfg.model.num_classes, mode=cfg.eval.mode,
            crop=cfg.eval.crop, stride=cfg.eval.stride, scales=cfg.eval.scales,
            flip=cfg.eval.flip, progress=False,
        )  # fmt: skip
        tracker.log_evaluation(cm, LABEL_SPECS[cfg.dataset].class_names, step=0)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return tracker.run_id


def table_markdown(table: Table, lines: list[Line], s: Settings) -> str:
    """The table in the paper's layout: its rows and mIoU, ours beside it."""
    cfg = s.cfg
    lead = ["Method", "MS", "Flip"] if table.evaluation_only else ["Method"]
    header = [*lead, "mIoU (%) paper", "mIoU (%) ours", "MLflow run", "reused"]
    rows = []
    for line in lines:
        marks = ["✓" if line.row.ms else "", "✓" if line.row.flip else ""]
        cells = [line.row.label, *(marks if table.evaluation_only else [])]
        ours = "not finished" if line.miou is None else f"{100 * line.miou:.1f}"
        rows.append([*cells, f"{line.row.paper_miou:.1f}", ours, line.run_id or "", line.reused])
    note = (
        f"Ours: preset `{s.config}`, ResNet-{cfg.model.depth}, {cfg.schedule.iterations} "
        f"iterations, dataset `{cfg.data.root}` split `{cfg.data.val_split}`; the paper: "
        "ResNet-101, 30k iterations, Cityscapes val."
    )
    return f"### Table {table.number}. {table.title}\n\n{markdown_table(header, rows)}\n{note}\n"


def run_table(s: Settings, table: Table) -> tuple[str, list[Line]]:
    parent = table_parent(s, table)
    client = mlflow_client(s.uri)
    status = "FAILED"
    try:
        if table.evaluation_only:
            lines = run_evaluation_table(s, table, parent)
        else:
            lines = run_training_table(s, table, parent)
        text = table_markdown(table, lines, s)
        client.log_text(parent, text, f"table{table.number}.md")
        status = "FINISHED"
    finally:
        client.set_terminated(parent, status=status)
    return text, lines


def run_ablations(args: argparse.Namespace) -> dict[int, tuple[str, list[Line]]]:
    import torch

    storage = absolute(args.storage)
    config, overrides, cfg = base_config(
        args.config, args.overrides, smoke=args.smoke, smoke_data=storage / "smoke-data",
        reserved=["model.aspp", "model.context", "model.graph", "model.fusion", "model.ratio",
                  "model.parts", "eval.scales", "eval.flip"],
    )  # fmt: skip
    gpus = args.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if torch.cuda.is_available() else 0.0
    numbers = sorted(TABLES) if args.table == "all" else [int(args.table)]
    out = {}
    check_tracking_reach(args.address, args.tracking_uri)
    with tracking_server(args.tracking_uri) as uri:
        s = Settings(
            config=config,
            overrides=overrides,
            cfg=cfg,
            experiment=args.experiment or default_experiment(cfg, args.smoke),
            uri=uri,
            storage=storage,
            cpus_per_trial=args.cpus_per_trial or (1.0 if args.smoke else 4.0),
            gpus_per_trial=gpus,
            workers_per_trial=args.workers_per_trial,
            max_failures=args.max_failures,
            address=args.address,
            num_cpus=args.num_cpus or cpu_count(),
        )
        for n in numbers:
            text, lines = run_table(s, TABLES[n])
            print(f"\n{text}")
            out[n] = (text, lines)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run_ablations(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # ConfigError included
        print(f"error: {error}", file=sys.stderr)
        return 2
    unfinished = [n for n, (_, lines) in results.items() if any(x.miou is None for x in lines)]
    return 1 if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
