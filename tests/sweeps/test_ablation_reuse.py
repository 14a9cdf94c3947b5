"""Ablation tables share configurations: each is trained once, whichever table asks first.

No training here: the rows' runs are MLflow runs made the way training leaves them (FINISHED,
tags config_hash, variant, table, and a val/miou metric), so the tables reuse them all.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeps.ablations import MIOU_METRIC, Settings, run_table
from sweeps.common import base_config, config_hash
from sweeps.runner import experiment_id, mlflow_client
from sweeps.tables import TABLES
from sweeps.trial import row_name, table_tag


def _settings(tmp_path: Path) -> Settings:
    config, overrides, cfg = base_config("scenes", [f"data.root={tmp_path}"], smoke=False,
                                         smoke_data=tmp_path)  # fmt: skip
    return Settings(
        config=config, overrides=overrides, cfg=cfg, experiment="reuse",
        uri=f"sqlite:///{tmp_path / 'mlflow.db'}", storage=tmp_path / "runs",
        cpus_per_trial=1.0, gpus_per_trial=0.0, workers_per_trial=None, max_failures=0,
        address=None, num_cpus=1,
    )  # fmt: skip


def _digest(s: Settings, overrides: tuple[str, ...]) -> str:
    return config_hash([*s.overrides, *overrides], s.config)


def _trained(s: Settings, table: int, variant: str, overrides: tuple[str, ...], miou: float):
    """A finished training run as a table's trial leaves it."""
    client = mlflow_client(s.uri)
    tags = {"config_hash": _digest(s, overrides), "variant": variant, "table": str(table),
            table_tag(table): variant, "kind": "training"}  # fmt: skip
    run = client.create_run(experiment_id(client, s.experiment), run_name=row_name(table, variant),
                            tags=tags)  # fmt: skip
    client.log_metric(run.info.run_id, MIOU_METRIC, miou, step=4)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_the_tables_hold_21_rows_of_15_configurations(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    rows = [r.overrides for t in TABLES.values() for r in t.rows if not t.evaluation_only]
    rows += [t.train for t in TABLES.values() if t.evaluation_only]
    assert len(rows) == 21
    assert len({_digest(s, o) for o in rows}) == 15


def test_a_configuration_shared_by_tables_is_one_run(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    t1, t2 = TABLES[1], TABLES[2]
    first = {r.variant: _trained(s, 1, r.variant, r.overrides, 0.1 + i / 10)
             for i, r in enumerate(t1.rows)}  # fmt: skip
    text1, lines1 = run_table(s, t1)  # every row has its run: nothing is trained
    assert [x.run_id for x in lines1] == [first[r.variant] for r in t1.rows]
    assert all(x.reused for x in lines1)

    shared = {r.variant for r in t2.rows if _digest(s, r.overrides) in
              {_digest(s, r1.overrides) for r1 in t1.rows}}  # fmt: skip
    assert shared == {"baseline", "cdgc-concat"}  # Table 1's baseline and class-GCN rows
    for r in t2.rows:
        if r.variant not in shared:
            _trained(s, 2, r.variant, r.overrides, 0.5)
    _, lines2 = run_table(s, t2)
    by_variant = {x.row.variant: x for x in lines2}
    assert by_variant["baseline"].run_id == first["baseline"]
    assert by_variant["cdgc-concat"].run_id == first["class-gcn"]
    assert by_variant["cdgc-concat"].miou == pytest.approx(0.3)

    client = mlflow_client(s.uri)
    run = client.get_run(first["class-gcn"])
    assert run.info.run_name == "table1/class-gcn, table2/cdgc-concat"
    assert run.data.tags["table1"] == "class-gcn" and run.data.tags["table2"] == "cdgc-concat"
    assert run.data.tags["table"] == "1 2"
    exp = experiment_id(client, s.experiment)
    rows2 = client.search_runs([exp], "tags.table2 IS NOT NULL")
    assert len(rows2) == 6  # Table 2's six rows, two of them trained for Table 1

    # One table run per table, reused by a rerun, with the table as md, csv and a chart.
    text1, _ = run_table(s, t1)
    holders = client.search_runs([exp], "tags.role = 'table'")
    assert sorted(h.info.run_name for h in holders) == ["table1", "table2"]
    holder = next(h for h in holders if h.info.run_name == "table1")
    files = {f.path for f in client.list_artifacts(holder.info.run_id)}
    assert files == {"table1.md", "table1.csv", "table1.png"}
    md = Path(client.download_artifacts(holder.info.run_id, "table1.md", str(tmp_path)))
    assert md.read_text() == text1
    assert "### Table 1. Class-wise GCN vs plain GCN (scenes val)" in text1
    assert (
        "| ResNet-101 + class-GCN | 0.794 | 0.3000 | table1/class-gcn, table2/cdgc-concat |"
        in text1
    )
