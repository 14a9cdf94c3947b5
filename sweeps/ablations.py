"""Run the paper's ablation Tables 1-5 and write them in the paper's layout, ours beside the paper's.

    python sweeps/ablations.py --table {1,2,3,4,5,all} --config cityscapes [--smoke]
        [--tracking-uri URI] [--address auto|ray://HOST:PORT] [key=value ...]

Every configuration is trained once: a row reuses the newest FINISHED run with its config hash
(preset + overrides), whichever table trained it first, and the table says which rows it reused.
A row's run is named `tableN/<variant>` and carries the tag `tableN` = variant for every table it
is a row of (a configuration shared by Tables 3, 4 and 5 is one run with three such tags).
Training runs go through Ray Tune (sweeps/runner.py, the same trials as the ratio sweep, without
early stopping); Table 4 evaluates one trained model with and without multi-scale / flip
(launch.evaluation). Each table is printed and logged as `tableN.md`, `tableN.csv` and a bar
chart `tableN.png` (ours vs the paper) on one run per table, `tableN` (tags role=table, table=N),
reused by later invocations.
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
    csv_text,
    default_experiment,
    init_ray,
    markdown_table,
)
from sweeps.mlflow_server import print_ui_hint, resolve_tracking_uri, tracking_server
from sweeps.runner import GROUP_TAG, SweepSpec, cpu_count, experiment_id, fit, mlflow_client
from sweeps.tables import TABLES, Row, Table
from sweeps.trial import row_name, table_tag

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
    uri: str  # where to write (the sweep's server for a SQLite store)
    storage: Path
    cpus_per_trial: float
    gpus_per_trial: float
    workers_per_trial: int | None
    max_failures: int
    address: str | None  # Ray, started on first use: reruns that reuse every row need none
    num_cpus: int
    keep_checkpoints: bool = False
    store: str | None = None  # the store itself, what runs record (default: uri)


@dataclass
class Line:
    """One row of a finished table."""

    row: Row
    miou: float | None  # fraction (as everywhere), None when the run did not finish
    run_id: str | None
    reused: bool  # the run existed before this table asked for it
    run_name: str = ""  # every table row the run is, e.g. "table3/ds-1.0, table5/..."


def find_finished(client: Any, exp_id: str, digest: str) -> Any | None:
    """The newest FINISHED run with this config hash, whichever table (or sweep) made it."""
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.config_hash = '{digest}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def record_row(client: Any, run: Any, table: int, variant: str) -> Any:
    """Mark `run` as row `variant` of `table`: tag tableN=variant, `table` lists every table the
    run is a row of, and the run name lists every `tableN/variant`. Returns the updated run."""
    tags = run.data.tags
    run_id = run.info.run_id
    if tags.get(table_tag(table)) == variant:
        return run
    client.set_tag(run_id, table_tag(table), variant)
    tables = sorted({*tags.get("table", "").split(), str(table)}, key=int)
    client.set_tag(run_id, "table", " ".join(tables))
    names = [n for n in (run.info.run_name or "").split(", ") if n.startswith("table")]
    if row_name(table, variant) not in names:
        names.append(row_name(table, variant))
        client.set_tag(run_id, "mlflow.runName", ", ".join(names))
    return client.get_run(run_id)


def train_rows(
    s: Settings, table: int, rows: dict[str, tuple[str, ...]], parent_run_id: str
) -> dict[str, tuple[Any, bool]]:
    """variant -> (finished MLflow run or None, reused); trains the rows without a finished run."""
    from ray import tune

    client = mlflow_client(s.uri)
    exp_id = experiment_id(client, s.experiment)
    digests = {v: config_hash([*s.overrides, *o], s.config) for v, o in rows.items()}
    found = {v: find_finished(client, exp_id, d) for v, d in digests.items()}
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
            store_uri=s.store,
            variants={v: list(rows[v]) for v in pending},
            tags={"table": str(table)},
            cpus_per_trial=s.cpus_per_trial,
            gpus_per_trial=s.gpus_per_trial,
            workers_per_trial=s.workers_per_trial,
            max_failures=s.max_failures,
            parent_run_id=parent_run_id,
            # Not nested: MLflow's runs table folds children under their parent, and a row
            # shared by tables has one parent only. The tags tableN find a table's rows.
            nest=False,
            keep_checkpoints=s.keep_checkpoints,
        )
        fit(spec)
    reused = [v for v, run in found.items() if run is not None]
    if reused:
        print(f"Table {table}: reusing {len(reused)} finished run(s): {', '.join(reused)}")
    out = {}
    for v, d in digests.items():
        run = found[v] or find_finished(client, exp_id, d)
        if run is not None:
            run = record_row(client, run, table, v)
        out[v] = (run, found[v] is not None)
    return out


def table_parent(s: Settings, table: Table) -> str:
    """The run of this table (`tableN`, role=table), reused by every invocation: holder of
    tableN.md / .csv / .png; the rows it trains carry its id as tag sweep_run."""
    client = mlflow_client(s.uri)
    exp_id = experiment_id(client, s.experiment, s.store)
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.role = 'table' and tags.table = '{table.number}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run = client.create_run(
            exp_id,
            run_name=f"table{table.number}",
            tags={"table": str(table.number), "role": "table"},
        )
        run_id = run.info.run_id
    # Tags, not params: params cannot change, and a later invocation may use other overrides.
    client.set_tag(run_id, "config", s.config)
    client.set_tag(run_id, "overrides", " ".join(s.overrides)[:6000])
    client.set_tag(run_id, "dataset", dataset_label(s))
    return run_id


def run_training_table(s: Settings, table: Table, parent_run_id: str) -> list[Line]:
    runs = train_rows(s, table.number, {r.variant: r.overrides for r in table.rows}, parent_run_id)
    return [_line(row, *runs[row.variant]) for row in table.rows]


def _line(row: Row, run: Any, reused: bool) -> Line:
    if run is None:
        return Line(row, None, None, reused)
    miou = run.data.metrics.get(MIOU_METRIC)
    return Line(row, miou, run.info.run_id, reused, run.info.run_name or "")


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
        run = find_finished(client, exp_id, digest)
        reused = run is not None
        if run is None:
            run_id = evaluate_row(
                s, table, row, overrides, digest, model_path, trained, parent_run_id
            )
            run = client.get_run(run_id)
        run = record_row(client, run, table.number, row.variant)
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
    from launch.tracking import Tracker, write_through
    from pipeline.reader import EvalStream

    cfg = load_config(s.config, overrides)
    cfg.logging.tracking_uri = s.store or s.uri  # recorded; written through the server
    write_through(cfg.logging.tracking_uri, s.uri)
    cfg.logging.experiment = s.experiment
    cfg.logging.tags = {
        **cfg.logging.tags,
        "table": str(table.number),
        "variant": row.variant,
        table_tag(table.number): row.variant,
        "config_hash": digest,
        "model_run": trained.info.run_id,
        GROUP_TAG: parent_run_id,
    }
    tracker = Tracker(cfg, enabled=True, kind="evaluation")
    tracker.start(
        run_name=row_name(table.number, row.variant), tags={"checkpoint": str(model_path)}
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


def dataset_label(s: Settings) -> str:
    """The data a table was run on, for its title: preset and validation split."""
    return f"{s.cfg.name} {s.cfg.data.val_split}"


TABLE_COLUMNS = ["mIoU paper", "mIoU ours", "MLflow run", "run id", "reused"]
# mIoU as a fraction everywhere (MLflow's val/miou, the training console, the sweep table); the
# paper's percentages are divided by 100.


def table_rows(table: Table, lines: list[Line]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the table in the paper's layout, ours beside the paper's numbers."""
    lead = ["Method", "MS", "Flip"] if table.evaluation_only else ["Method"]
    rows = []
    for line in lines:
        marks = ["✓" if line.row.ms else "", "✓" if line.row.flip else ""]
        cells = [line.row.label, *(marks if table.evaluation_only else [])]
        ours = "not finished" if line.miou is None else f"{line.miou:.4f}"
        reused = "yes" if line.reused else "no"
        rows.append([*cells, f"{line.row.paper_miou / 100:.3f}", ours, line.run_name,
                     line.run_id or "", reused])  # fmt: skip
    return [*lead, *TABLE_COLUMNS], rows


def table_markdown(table: Table, lines: list[Line], s: Settings) -> str:
    """The table in the paper's layout: its rows and mIoU, ours beside it, and what ours is."""
    cfg = s.cfg
    header, rows = table_rows(table, lines)
    note = (
        f"Ours: preset `{s.config}`, ResNet-{cfg.model.depth}, {cfg.schedule.iterations} "
        f"iterations, dataset `{cfg.data.root}` split `{cfg.data.val_split}`; the final "
        "prediction is trained with OHEM in every row. The paper: ResNet-101, 30k iterations, "
        "Cityscapes val. `reused`: the run was trained before (by this or another table)."
    )
    title = f"### Table {table.number}. {table.title} ({dataset_label(s)})"
    return f"{title}\n\n{markdown_table(header, rows)}\n{note}\n"


def table_figure(table: Table, lines: list[Line], s: Settings):
    """Bar chart per row: the paper's mIoU beside ours (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [line.row.variant for line in lines]
    paper = [line.row.paper_miou / 100 for line in lines]
    ours = [np.nan if line.miou is None else line.miou for line in lines]
    x = np.arange(len(lines))
    fig, ax = plt.subplots(figsize=(1.6 * len(lines) + 4.5, 4.0), layout="constrained")
    ax.bar(x - 0.2, paper, 0.4, label="paper (Cityscapes val)", color="#9e9e9e")
    ax.bar(x + 0.2, ours, 0.4, label=f"ours ({dataset_label(s)})", color="#1f77b4")
    for xi, value in zip(x, ours, strict=True):
        if not np.isnan(value):
            ax.annotate(f"{value:.3f}", (xi + 0.2, value), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("mIoU")
    ax.set_title(f"Table {table.number}. {table.title}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never on them
    return fig


def log_table(client: Any, run_id: str, table: Table, lines: list[Line], s: Settings) -> str:
    """Write tableN.md, tableN.csv and tableN.png on the table's run; return the markdown."""
    import matplotlib.pyplot as plt

    text = table_markdown(table, lines, s)
    header, rows = table_rows(table, lines)
    stem = f"table{table.number}"
    client.log_text(run_id, text, f"{stem}.md")
    client.log_text(run_id, csv_text(header, rows), f"{stem}.csv")
    fig = table_figure(table, lines, s)
    client.log_figure(run_id, fig, f"{stem}.png")
    plt.close(fig)
    return text


def run_table(s: Settings, table: Table) -> tuple[str, list[Line]]:
    parent = table_parent(s, table)
    client = mlflow_client(s.uri)
    status = "FAILED"
    try:
        if table.evaluation_only:
            lines = run_evaluation_table(s, table, parent)
        else:
            lines = run_training_table(s, table, parent)
        text = log_table(client, parent, table, lines, s)
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
            keep_checkpoints=args.keep_checkpoints,
            store=resolve_tracking_uri(args.tracking_uri),
        )
        for n in numbers:
            text, lines = run_table(s, TABLES[n])
            print(f"\n{text}")
            out[n] = (text, lines)
    for n in numbers:
        print_ui_hint(args.tracking_uri, f"--table {n}")
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
