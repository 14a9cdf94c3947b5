"""`sweeps/ablations.py --table 5 --smoke` as a user runs it, then compared in the MLflow UI.

One real smoke table per module (four training runs, ~5 min on 2 cores), shared by the tests:
the table and its reuse on a rerun, the console output, the disk it leaves, every search filter
that sweeps/README.md documents, and (marked `browser`) the URL `python -m sweeps.compare
--table 5` prints, opened in headless Chromium with no click in between.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sweeps.test_compare import CHROMEDRIVER, CHROMIUM, open_compare_page

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "sweeps" / "README.md"
LABELS = (
    "Easy Positive",
    "Easy Positive + Hard Positive",
    "Easy Positive + Hard Negative",
    "Easy Positive + Hard Positive + Hard Negative",
)
PAPER = ("0.799", "0.805", "0.800", "0.811")  # the paper's percentages as fractions
NAMES = (
    "table5/easy",
    "table5/easy+hard_pos",
    "table5/easy+hard_neg",
    "table5/easy+hard_pos+hard_neg",
)
MAX_LINES = 80  # console lines of a Table 5 smoke
MAX_BYTES = 300 * 2**20  # everything a Table 5 smoke leaves on disk


@dataclass
class Smoke:
    root: Path
    db: Path
    output: str
    seconds: float

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.db}"


def _ablations(root: Path, shards: Path) -> tuple[str, float]:
    """Run the command a user types; its console output (stdout and stderr) and duration."""
    command = [
        sys.executable, str(ROOT / "sweeps" / "ablations.py"), "--table", "5", "--smoke",
        "--storage", str(root / "runs"), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
        f"data.root={shards}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output, time.monotonic() - start


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, smoke_shards: Path) -> Smoke:
    root = tmp_path_factory.mktemp("table5")
    output, seconds = _ablations(root, smoke_shards)
    return Smoke(root, root / "mlflow.db", output, seconds)


def _client(smoke: Smoke):
    from sweeps.runner import mlflow_client

    return mlflow_client(smoke.uri)


def _experiment_id(smoke: Smoke) -> str:
    return _client(smoke).get_experiment_by_name("smoke").experiment_id


def _table_lines(text: str) -> list[list[str]]:
    rows = [ln for ln in text.splitlines() if ln.startswith("| Easy")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_table5_smoke_prints_the_table_and_a_rerun_reuses_every_row(
    smoke: Smoke, smoke_shards: Path
) -> None:
    assert "### Table 5. Samples used by dynamic sampling" in smoke.output
    title = next(ln for ln in smoke.output.splitlines() if ln.startswith("### Table 5."))
    assert title.endswith("(scenes val)")  # the data used, not the paper's Cityscapes val
    cells = _table_lines(smoke.output)
    assert [c[:2] for c in cells] == [list(x) for x in zip(LABELS, PAPER, strict=True)]
    assert [c[3] for c in cells] == list(NAMES)
    assert [c[5] for c in cells] == ["no"] * 4
    ours = [float(c[2]) for c in cells]
    assert all(0.0 < x <= 1.0 for x in ours)  # mIoU as a fraction, as everywhere

    client = _client(smoke)
    exp = _experiment_id(smoke)
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    rows = client.search_runs([exp], "tags.table5 IS NOT NULL")
    by_name = {r.info.run_name: r for r in rows}
    assert set(by_name) == set(NAMES)
    easy = by_name["table5/easy"]
    assert easy.data.tags["variant"] == "easy" and easy.data.tags["table"] == "5"
    assert easy.data.params["model.parts"] == '["easy"]'
    assert easy.data.params["model.ratio"] == "1.0"
    assert all(r.info.status == "FINISHED" and "mlflow.parentRunId" not in r.data.tags
               for r in rows)  # fmt: skip
    assert [by_name[n].data.metrics["val/miou"] for n in NAMES] == pytest.approx(ours, abs=0.00006)
    # The runs record the store, not the sweep's temporary server.
    assert {r.data.params["logging.tracking_uri"] for r in rows} == {smoke.uri}
    holder = client.search_runs([exp], "tags.role = 'table'")
    assert [h.info.run_name for h in holder] == ["table5"]
    # Artifacts are files beside the database: readable with the SQLite URI alone, no server.
    assert client.get_experiment(exp).artifact_location.startswith("file://")
    files = {f.path for f in client.list_artifacts(holder[0].info.run_id)}
    md = client.download_artifacts(holder[0].info.run_id, "table5.md", str(smoke.root))
    assert files == {"table5.md", "table5.csv", "table5.png"}
    assert "config.yaml" in {f.path for f in client.list_artifacts(rows[0].info.run_id)}
    assert Path(md).read_text().strip() in smoke.output

    rerun = smoke.root / "rerun"
    rerun.mkdir()
    shutil.copy2(smoke.db, rerun / "mlflow.db")
    shutil.copytree(smoke.root / "mlartifacts", rerun / "mlartifacts")
    output, _ = _ablations(rerun, smoke_shards)
    assert "reusing 4 finished run(s)" in output and "training" not in output.split("###")[0]
    again = _table_lines(output)
    assert [c[:5] for c in again] == [c[:5] for c in cells]  # same runs, same numbers
    assert [c[5] for c in again] == ["yes"] * 4
    rerun_client = _client(Smoke(rerun, rerun / "mlflow.db", "", 0))
    holders = rerun_client.search_runs([exp], "tags.role = 'table'")
    assert len(holders) == 1  # the table run is reused, not a second one


def test_table5_smoke_output_is_short_and_points_at_the_persistent_store(smoke: Smoke) -> None:
    lines = smoke.output.splitlines()
    print(f"Table 5 smoke: {len(lines)} console lines, {smoke.seconds:.0f} s")
    assert len(lines) < MAX_LINES, smoke.output
    for noise in ("View run", "tensorboard", "Token authentication", "resolved config",
                  "untested optimizer"):  # fmt: skip
        assert noise.lower() not in smoke.output.lower(), noise
    assert f"python -m sweeps.compare --table 5 --tracking-uri sqlite:///{smoke.db}" in (
        smoke.output
    )
    assert "val mIoU 0." in smoke.output  # trial lines in the table's unit (a fraction)
    # What the console no longer shows is in each trial's training log and run dir.
    logs = list((smoke.root / "runs").glob("table5-*/runs/*/train.log"))
    assert len(logs) == 4
    assert all("resolved config in config.json" in log.read_text() for log in logs)
    assert all((log.parent / "config.json").is_file() for log in logs)


def test_table5_smoke_is_lean_on_disk(smoke: Smoke) -> None:
    total = _disk_bytes(smoke.root / "runs") + _disk_bytes(smoke.root / "mlartifacts")
    total += smoke.db.stat().st_size
    print(f"Table 5 smoke: {total / 2**20:.0f} MB on disk")
    assert total <= MAX_BYTES
    run_dirs = sorted((smoke.root / "runs").glob("table5-*/runs/*"))
    assert len(run_dirs) == 4
    for run_dir in run_dirs:
        assert (run_dir / "model.pt").is_file()
        assert not (run_dir / "checkpoints").exists()  # finished: the export is the result
    tune_dir = next((smoke.root / "runs").glob("table5-*"))
    copied = [p for p in tune_dir.rglob("*") if p.suffix == ".pt" and "runs" not in p.parts[-3:]]
    assert copied == []  # Tune keeps references, no weights


# Every search filter sweeps/README.md shows, with the runs it must find in the smoke store.
DOCUMENTED_FILTERS = {
    "tags.table5 IS NOT NULL": set(NAMES),
    'tags.table5 = "easy+hard_pos"': {"table5/easy+hard_pos"},
    'tags.role = "table"': {"table5"},
    "tags.table5 IS NOT NULL and metrics.`val/miou` > 0": set(NAMES),
    'tags.table5 IS NOT NULL and params.`model.parts` LIKE "%hard_neg%"': {
        "table5/easy+hard_neg", "table5/easy+hard_pos+hard_neg",
    },
}  # fmt: skip


def test_every_documented_filter_finds_the_table_rows(smoke: Smoke) -> None:
    readme = README.read_text()
    client = _client(smoke)
    exp = _experiment_id(smoke)
    for search, names in DOCUMENTED_FILTERS.items():
        assert f"`{search}`" in readme or search in readme, f"not documented: {search}"
        found = {r.info.run_name for r in client.search_runs([exp], search)}
        assert found == names, search
    holder = client.search_runs([exp], 'tags.role = "table"')[0].info.run_id
    found = {r.info.run_name for r in client.search_runs([exp], f'tags.sweep_run = "{holder}"')}
    assert found == set(NAMES)
    assert 'tags.sweep_run = "<' in readme


# ------------------------------------------------------------------ the MLflow UI in a browser


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium / chromedriver missing")
def test_the_compare_command_opens_the_table_in_the_browser(
    smoke: Smoke, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The command the README leads with, then its URL in a fresh headless Chromium: the
    table's four rows and val/miou plotted, without a click."""
    pytest.importorskip("selenium")
    shot = tmp_path_factory.mktemp("ui-screenshots") / "compare-table5.png"
    command = [sys.executable, "-m", "sweeps.compare", "--table", "5", "--tracking-uri",
               smoke.uri]  # fmt: skip
    stop = [*command[:3], "--stop", "--tracking-uri", smoke.uri]
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        url = next(ln for ln in done.stdout.splitlines() if ln.startswith("http://127.0.0.1:"))
        page = open_compare_page(url, list(NAMES), shot)
        print(f"screenshot: {shot}")
        assert "Comparing 4 Runs" in page["text"]
        assert page["axes"] == ["model.parts", "val/miou"]
        rows = _client(smoke).search_runs([_experiment_id(smoke)], "tags.table5 IS NOT NULL")
        best = max(r.data.metrics["val/miou"] for r in rows)
        assert f"{best:.5f}" in page["text"]  # the top of the val/miou axis
    finally:
        subprocess.run(stop, cwd=ROOT, capture_output=True, timeout=60)
        print(f"compare command and browser: {time.monotonic() - start:.0f} s")
