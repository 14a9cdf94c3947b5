"""`python -m sweeps.compare`: which runs a table or a sweep compares, the compare page's URL, the
UI it starts or finds, and (marked `browser`) the page itself in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from mlflow import MlflowClient

from launch.config import load_config
from launch.tracking import Tracker
from sweeps.compare import CompareError, compare_url, sweep_runs, table_runs
from sweeps.tables import TABLES
from sweeps.trial import row_name

ROOT = Path(__file__).resolve().parents[2]


def _training_run(store: str, name: str, tags: dict, overrides=(), miou=0.5, status="FINISHED"):
    """A training run as launch.tracking logs one: params, train metrics, then val/miou."""
    cfg = load_config("scenes", [*overrides, f"logging.tracking_uri={store}",
                                 "logging.experiment=smoke"])  # fmt: skip
    cfg.logging.tags, cfg.logging.run_name = dict(tags), name
    tracker = Tracker(cfg, enabled=True)
    tracker.start()
    tracker.log_metrics({"train/loss/total": 2.0, "checkpoint/iteration": 2}, 2)
    tracker.log_metrics({"val/miou": miou}, 4)
    tracker.end(status)
    return tracker.run_id


@pytest.fixture(scope="module")
def table5_store(tmp_path_factory) -> Path:
    """Table 5's rows, one of them trained twice (the newer counts), plus a failed attempt."""
    db = tmp_path_factory.mktemp("compare") / "mlflow.db"
    store = f"sqlite:///{db}"
    for i, row in enumerate(TABLES[5].rows):
        tags = {"table": "5", "table5": row.variant, "variant": row.variant}
        _training_run(store, row_name(5, row.variant), tags, row.overrides, miou=0.1 + 0.03 * i)
    easy = TABLES[5].rows[0]
    tags = {"table": "5", "table5": "easy", "variant": "easy"}
    _training_run(store, "table5/easy", tags, easy.overrides, miou=0.99, status="FAILED")
    _training_run(store, "table5/easy", tags, easy.overrides, miou=0.2)  # retrained: newest
    return db


def test_a_table_compares_its_rows_in_order_newest_finished_run_each(table5_store) -> None:
    client = MlflowClient(f"sqlite:///{table5_store}")
    runs = table_runs(client, 5)
    assert [r.info.run_name for r in runs] == [row_name(5, r.variant) for r in TABLES[5].rows]
    assert runs[0].data.metrics["val/miou"] == pytest.approx(0.2)  # the newest FINISHED one
    with pytest.raises(CompareError, match="no finished run of Table 3"):
        table_runs(client, 3)


def test_the_url_selects_exactly_the_runs_on_the_compare_page(table5_store) -> None:
    runs = table_runs(MlflowClient(f"sqlite:///{table5_store}"), 5)
    url = compare_url("http://127.0.0.1:5123/", runs)
    base, query = url.split("/#/compare-runs?")
    assert base == "http://127.0.0.1:5123"
    parsed = urllib.parse.parse_qs(query)
    assert json.loads(parsed["runs"][0]) == [r.info.run_id for r in runs]
    assert json.loads(parsed["experiments"][0]) == [runs[0].info.experiment_id]
    assert parsed["workflowType"] == ["machine_learning"]  # the sidebar on "Model training"
    # The page plots the first metric every compared run has: val/miou here.
    assert all(next(iter(r.data.metrics)) == "val/miou" for r in runs)


def test_a_sweep_compares_its_trials_best_first(tmp_path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    exp = client.create_experiment("sweeps")
    parent = client.create_run(exp, run_name="ratio-sweep-x", tags={"role": "sweep"})
    pid = parent.info.run_id
    for ratio, miou in ((0.4, 0.3), (1.0, 0.6)):
        _training_run(store, f"ratio={ratio}", {"sweep_run": pid}, [f"model.ratio={ratio}"], miou)
    client.set_terminated(pid)
    assert [r.info.run_name for r in sweep_runs(client, "ratio-sweep-x")] == [
        "ratio=1.0",
        "ratio=0.4",
    ]
    with pytest.raises(CompareError, match="no sweep named 'nope'"):
        sweep_runs(client, "nope")


def _compare(db: Path, *argv: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "sweeps.compare", *argv, "--tracking-uri", f"sqlite:///{db}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


def open_compare_page(url: str, names: list[str], shot: Path, timeout_s: float = 90) -> dict:
    """Load `url` in a fresh headless Chromium, no clicks; wait for the runs' names and the plot;
    screenshot to `shot`. Returns the page text and the parallel-coordinates axis titles."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1500,900"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    axes = ".pcp-plot .parcoords .y-axis .axis-heading .axis-title"
    try:
        driver.get(url)

        def ready(d) -> bool:
            body = d.find_element("tag name", "body").text
            titles = [e.text for e in d.find_elements("css selector", axes)]
            return all(n in body for n in names) and "val/miou" in titles

        WebDriverWait(driver, timeout_s, 0.5).until(ready, f"the page never showed {names}")
        driver.save_screenshot(str(shot))
        return {
            "text": driver.find_element("tag name", "body").text,
            "axes": [e.text for e in driver.find_elements("css selector", axes)],
        }
    finally:
        driver.quit()


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium / chromedriver missing")
def test_the_printed_url_opens_on_the_comparison_without_a_click(table5_store, tmp_path) -> None:
    pytest.importorskip("selenium")
    try:
        out = _compare(table5_store, "--table", "5")
        assert out[0].startswith("Table 5: 4 runs (table5/easy, ")
        url = next(ln for ln in out if ln.startswith("http://127.0.0.1:"))
        again = _compare(table5_store, "--table", "5")
        assert url in again and "already running" in again[-1]  # found, not a second UI
        names = [row_name(5, r.variant) for r in TABLES[5].rows]
        page = open_compare_page(url, names, tmp_path / "compare.png")
        print(f"screenshot: {tmp_path / 'compare.png'}")
        assert "Comparing 4 Runs" in page["text"]
        assert page["axes"] == ["model.parts", "val/miou"]  # what differs, and the metric
        client = MlflowClient(f"sqlite:///{table5_store}")
        best = max(r.data.metrics["val/miou"] for r in table_runs(client, 5))
        assert f"{best:.5f}" in page["text"]  # the val/miou axis tops at the best row
    finally:
        stopped = _compare(table5_store, "--stop")
        assert stopped == ["stopped the MLflow UI"]
    time.sleep(0.5)
