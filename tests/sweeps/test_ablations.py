"""`ablations.py --table 5 --smoke`: four real training runs, the paper's layout, reuse on rerun."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

LABELS = (
    "Easy Positive",
    "Easy Positive + Hard Positive",
    "Easy Positive + Hard Negative",
    "Easy Positive + Hard Positive + Hard Negative",
)
PAPER = ("79.9", "80.5", "80.0", "81.1")


def _table5(tmp: Path, uri: str, shards: Path):
    from sweeps.ablations import parse_args, run_ablations

    args = parse_args(["--table", "5", "--smoke", "--storage", str(tmp), "--tracking-uri", uri,
                       f"data.root={shards}"])  # fmt: skip
    return run_ablations(args)[5]


def _table_runs(uri: str) -> list:
    from sweeps.runner import mlflow_client

    client = mlflow_client(uri)
    exp = client.get_experiment_by_name("smoke").experiment_id
    return client.search_runs([exp], filter_string="tags.table = '5'", max_results=1000)


def test_table5_smoke_trains_four_rows_then_reuses_them(
    ray_session, tracking_uri: str, smoke_shards: Path, tmp_path: Path, capsys
) -> None:
    text, lines = _table5(tmp_path, tracking_uri, smoke_shards)

    assert [line.row.label for line in lines] == list(LABELS)
    assert not any(line.reused for line in lines)
    assert all(line.miou is not None and 0.0 < line.miou <= 1.0 for line in lines)
    printed = capsys.readouterr().out
    assert "### Table 5." in printed and text in printed
    table_lines = [ln for ln in text.splitlines() if ln.startswith("| Easy")]
    assert len(table_lines) == 4
    for ln, label, paper, line in zip(table_lines, LABELS, PAPER, lines, strict=True):
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert cells[:3] == [label, paper, f"{100 * line.miou:.1f}"]

    runs = _table_runs(tracking_uri)
    trained = [r for r in runs if r.data.tags.get("role") != "table"]
    assert len(trained) == 4
    by_variant = {r.data.tags["variant"]: r for r in trained}
    assert set(by_variant) == {"easy", "easy-hardpos", "easy-hardneg", "all"}
    assert by_variant["easy"].data.params["model.parts"] == '["easy"]'
    assert by_variant["all"].data.params["model.ratio"] == "1.0"
    assert all(r.info.status == "FINISHED" and r.data.tags["config_hash"] for r in trained)
    holders = [r for r in runs if r.data.tags.get("role") == "table"]
    assert len(holders) == 1
    from sweeps.runner import mlflow_client

    client = mlflow_client(tracking_uri)
    md = client.download_artifacts(holders[0].info.run_id, "table5.md", str(tmp_path))
    assert Path(md).read_text() == text

    _, lines2 = _table5(tmp_path, tracking_uri, smoke_shards)

    assert all(line.reused for line in lines2)
    assert [x.run_id for x in lines2] == [x.run_id for x in lines]
    assert [x.miou for x in lines2] == [x.miou for x in lines]
    runs2 = _table_runs(tracking_uri)
    assert len([r for r in runs2 if r.data.tags.get("role") != "table"]) == 4  # none trained
    assert len([r for r in runs2 if r.data.tags.get("role") == "table"]) == 2
