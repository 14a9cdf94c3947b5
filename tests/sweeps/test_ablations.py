"""`sweeps/ablations.py --table 5 --smoke` as a user runs it, then compared in the MLflow UI.

One real smoke table per module (four training runs, ~5 min on 2 cores), shared by the tests:
the table and its reuse on a rerun, the console output, the disk it leaves, every search filter
that sweeps/README.md documents, and (marked `browser`) the UI itself in headless Chromium.
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

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "sweeps" / "README.md"
LABELS = (
    "Easy Positive",
    "Easy Positive + Hard Positive",
    "Easy Positive + Hard Negative",
    "Easy Positive + Hard Positive + Hard Negative",
)
PAPER = ("79.9", "80.5", "80.0", "81.1")
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
    assert all(0.0 < x <= 100.0 for x in ours)

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
    assert [100 * by_name[n].data.metrics["val/miou"] for n in NAMES] == pytest.approx(
        ours, abs=0.051
    )
    holder = client.search_runs([exp], "tags.role = 'table'")
    assert [h.info.run_name for h in holder] == ["table5"]
    # Artifacts went through the sweep's server (mlflow-artifacts:/ URIs): read them through one.
    from sweeps.mlflow_server import tracking_server
    from sweeps.runner import mlflow_client

    with tracking_server(smoke.uri) as url:
        served = mlflow_client(url)
        files = {f.path for f in served.list_artifacts(holder[0].info.run_id)}
        md = served.download_artifacts(holder[0].info.run_id, "table5.md", str(smoke.root))
    assert files == {"table5.md", "table5.csv", "table5.png"}
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
    assert f"mlflow ui --backend-store-uri sqlite:///{smoke.db}" in smoke.output
    assert "workflowType=machine_learning&searchFilter=tags.table5%20IS%20NOT%20NULL" in (
        smoke.output
    )
    # What the console no longer shows is in each trial's training log.
    logs = list((smoke.root / "runs").glob("table5-*/runs/*/train.log"))
    assert len(logs) == 4
    assert all("resolved config:" in log.read_text() for log in logs)


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

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
UI_TIMEOUT_S = 90  # per page on a busy 2-core machine; a page is usually there in seconds


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1500,900"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _wait_text(driver, *texts: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d) -> bool:
        body = d.find_element("tag name", "body").text
        return all(t in body for t in texts)

    WebDriverWait(driver, UI_TIMEOUT_S, 0.5).until(shown, f"page never showed {texts}")


def _click_text(driver, text: str) -> None:
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    xpath = f"//*[normalize-space(text())='{text}']"
    WebDriverWait(driver, UI_TIMEOUT_S, 0.5).until(ec.element_to_be_clickable(("xpath", xpath)))
    driver.find_element("xpath", xpath).click()


@pytest.fixture(scope="module")
def mlflow_ui(smoke: Smoke):
    """`mlflow ui` on 127.0.0.1 and a free port, as sweeps/README.md tells the user to start it."""
    import urllib.request

    from sweeps.mlflow_server import free_port, ui_command

    port = free_port()
    command = ui_command(smoke.uri).replace("--port 5000", f"--port {port} --workers 1")
    assert command.startswith("mlflow ui ")
    argv = [sys.executable, "-m", "mlflow", *command.split()[1:]]
    log = smoke.root / "mlflow-ui.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "mlflow ui did not start"
                time.sleep(0.5)
        yield url
    finally:
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium / chromedriver missing")
def test_the_readme_walkthrough_works_in_the_browser(
    smoke: Smoke, mlflow_ui: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("selenium")
    from selenium.webdriver.common.keys import Keys

    shots = tmp_path_factory.mktemp("ui-screenshots")
    print(f"screenshots: {shots}")
    exp = _experiment_id(smoke)
    driver = _browser()
    start = time.monotonic()
    try:
        # 1. The experiment, switched to "Model training" in the sidebar: the runs table.
        driver.get(f"{mlflow_ui}/#/experiments/{exp}")
        _click_text(driver, "Model training")
        _wait_text(driver, "Run Name", "table5/easy")
        assert "/runs" in driver.current_url
        driver.save_screenshot(str(shots / "1-runs-table.png"))

        # 2. The documented filter in the search box: the table's four rows, by name.
        box = driver.find_element("css selector", "input[placeholder*='metrics.rmse']")
        box.send_keys("tags.table5 IS NOT NULL", Keys.ENTER)
        _wait_text(driver, *NAMES, "4 matching runs")
        driver.save_screenshot(str(shots / "2-filter-table5.png"))

        # 3. Tick every row (the header checkbox) and press Compare; add val/miou to the
        # parallel-coordinates plot's metrics: an axis with the rows' values.
        tick_all = driver.find_element("css selector", "input[aria-label='Select all runs']")
        tick_all.find_element("xpath", "..").click()  # the visible box around the input
        _click_text(driver, "Compare")
        _wait_text(driver, "Comparing 4 Runs", *NAMES, "Metrics:")
        assert "val/miou" not in driver.find_element("tag name", "body").text  # not by default
        metrics = driver.find_element("xpath", "//*[normalize-space(text())='Metrics:']"
                                               "/following::input[1]")  # fmt: skip
        metrics.find_element("xpath", "ancestor::*[contains(@class,'select')][1]").click()
        metrics.send_keys("val/miou", Keys.ENTER)
        metrics.send_keys(Keys.ESCAPE)
        _wait_text(driver, "val/miou")
        rows = _client(smoke).search_runs([exp], "tags.table5 IS NOT NULL")
        best = max(r.data.metrics["val/miou"] for r in rows)
        assert f"{best:.5f}" in driver.find_element("tag name", "body").text  # the axis' top
        driver.save_screenshot(str(shots / "3-compare.png"))
    finally:
        print(f"browser part: {time.monotonic() - start:.0f} s")
        driver.quit()
