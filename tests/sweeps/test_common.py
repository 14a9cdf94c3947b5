"""Fast checks of the sweep pieces: tables, search spaces, hashes, tables of results, MLflow URIs."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from launch.config import load_config
from sweeps.common import config_hash, csv_text, markdown_table
from sweeps.mlflow_server import resolve_tracking_uri, sqlite_path, tracking_server
from sweeps.runner import SweepSpec, expected_trials
from sweeps.tables import TABLES
from sweeps.trial import trial_overrides


@pytest.mark.parametrize("number", sorted(TABLES))
def test_every_table_row_is_a_valid_config(number: int) -> None:
    table = TABLES[number]
    overrides = [table.train] if table.evaluation_only else [r.overrides for r in table.rows]
    for row_overrides in overrides:
        cfg = load_config("cityscapes", list(row_overrides))
        assert cfg.model.depth == 101  # the paper's backbone stays the preset's


def test_table_rows_state_the_papers_settings() -> None:
    def model(number: int, variant: str):
        row = next(r for r in TABLES[number].rows if r.variant == variant)
        return load_config("cityscapes", list(row.overrides)).model, row.paper_miou

    m, paper = model(1, "baseline")
    assert (m.aspp, m.context, paper) == (False, "none", 76.3)
    m, paper = model(1, "plain-gcn")
    assert (m.aspp, m.context, paper) == (False, "plain_gcn", 78.2)
    m, paper = model(2, "aspp-cdgc-concat")
    assert (m.aspp, m.context, m.graph, m.fusion, paper) == (True, "cdgc", "sim", "concat", 80.0)
    m, paper = model(2, "cdgc-sum")
    assert (m.aspp, m.graph, m.fusion, paper) == (False, "sim", "sum", 79.2)
    assert [r.paper_miou for r in TABLES[3].rows] == [78.4, 80.0, 79.8, 80.3, 80.8, 80.9, 81.1]
    m, _ = model(3, "ds-0.6")
    assert (m.graph, m.ratio, m.aspp, m.fusion) == ("ds", 0.6, True, "concat")
    parts = [load_config("cityscapes", list(r.overrides)).model.parts for r in TABLES[5].rows]
    assert parts == [("easy",), ("easy", "hard_pos"), ("easy", "hard_neg"),
                     ("easy", "hard_pos", "hard_neg")]  # fmt: skip
    assert all(
        load_config("cityscapes", list(r.overrides)).model.ratio == 1.0 for r in TABLES[5].rows
    )
    t4 = TABLES[4]
    assert [(r.ms, r.flip, r.paper_miou) for r in t4.rows] == [
        (False, False, 81.1), (True, False, 81.6), (False, True, 81.4), (True, True, 81.9)
    ]  # fmt: skip


def test_config_hash_ignores_paths_and_tracking_but_not_the_model() -> None:
    base = ["model.ratio=0.4", "loss.alpha=0.6"]
    h = config_hash(base, "cityscapes")
    assert h == config_hash([*reversed(base), "data.root=/x", "runtime.run_dir=/y"], "cityscapes")
    assert h == config_hash([*base, "logging.tracking_uri=http://127.0.0.1:1"], "cityscapes")
    assert h != config_hash(["model.ratio=0.6", "loss.alpha=0.6"], "cityscapes")
    assert h != config_hash(base, "voc")


def test_trial_overrides_stack_base_variant_and_searched_values() -> None:
    config = {
        "overrides": ["data.batch_size=2"],
        "variants": {"v": ["model.aspp=false"]},
        "variant": "v",
        "ratio": 0.8,
        "fusion": "sum",
        "alpha": 0.4,
    }
    assert trial_overrides(config) == [
        "data.batch_size=2", "model.aspp=false", "model.ratio=0.8", "model.fusion=sum",
        "loss.alpha=0.4",
    ]  # fmt: skip


def test_search_space_sizes() -> None:
    from sweeps.ratio_sweep import search_space

    def n(space: dict, samples: int = 1) -> int:
        spec = SweepSpec("s", "c", [], space, Path("/tmp/s"), "e", "u", num_samples=samples)
        return expected_trials(spec)

    grid = search_space("grid", smoke=False)
    assert grid["ratio"] == {"grid_search": [0.2, 0.4, 0.6, 0.8, 1.0]}
    assert grid["fusion"] == {"grid_search": ["concat", "sum"]}
    assert n(grid) == 10 and n(grid, 3) == 30
    assert n(search_space("grid", smoke=True)) == 2
    assert n(search_space("grid", smoke=False, ratios=[1.0], fusions=["sum"])) == 1
    assert n(search_space("random", smoke=False), 7) == 7
    with pytest.raises(ValueError, match=r"--ratios: each ratio must be a number in \[0, 1\]"):
        search_space("grid", smoke=False, ratios=[1.5])


def test_markdown_and_csv_tables() -> None:
    header, rows = ["rank", "miou", "note"], [[1, 0.51234, "a"], [2, None, "b"]]
    assert markdown_table(header, rows) == (
        "| rank | miou | note |\n|---|---|---|\n| 1 | 0.5123 | a |\n| 2 |  | b |\n"
    )
    assert csv_text(header, rows) == "rank,miou,note\n1,0.5123,a\n2,,b\n"


def test_tracking_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///sub/m.db") == f"sqlite:///{tmp_path}/sub/m.db"
    assert sqlite_path("sqlite:////abs/m.db") == Path("/abs/m.db")
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"
    with pytest.raises(ValueError, match="file store"):
        resolve_tracking_uri("mlruns")
    with tracking_server("http://127.0.0.1:9") as uri:  # a server URI is used as given
        assert uri == "http://127.0.0.1:9"


@pytest.mark.slow
def test_tracking_server_serves_a_sqlite_store_and_stops(tmp_path: Path) -> None:
    with tracking_server(f"sqlite:///{tmp_path}/m.db") as uri:
        assert uri.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
            assert response.status == 200
    assert (tmp_path / "m.db").is_file()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{uri}/health", timeout=2)


@pytest.mark.parametrize(
    ("iterations", "every", "smoke", "rungs"),
    [
        (30_000, 5000, False, [5000, 15000]),  # rf 3; never the final evaluation
        (4, 2, True, [2]),
        (4, 0, True, None),  # evaluation only at the end: nothing to stop on
        (10, 4, True, [4]),
    ],
)
def test_asha_rungs_lie_before_the_final_evaluation(iterations, every, smoke, rungs) -> None:
    from sweeps.ratio_sweep import asha

    cfg = load_config("scenes", [f"schedule.iterations={iterations}", "schedule.warmup_iters=0",
                                 f"eval.every={every}"])  # fmt: skip
    scheduler = asha(cfg, smoke)
    if rungs is None:
        assert scheduler is None
        return
    got = sorted(m for m, _ in scheduler._brackets[0]._rungs)
    assert got == rungs
    assert max(got) <= iterations - (every or iterations)


def _fake_run_dir(root: Path) -> Path:
    """A run dir as training leaves it: two complete checkpoints, one half-written, the export."""
    import json

    run_dir = root / "trial"
    for it, complete in ((2, True), (4, True), (6, False)):
        tag = run_dir / "checkpoints" / f"iter_{it:08d}"
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"w" * it)
        if complete:
            (tag / "COMPLETE").write_text(json.dumps({"iteration": it, "world_size": 1}))
    (run_dir / "checkpoints" / "zero_to_fp32.py").write_text("#")
    for name in ("config.json", "metrics.jsonl", "failed_once_at_3", "model.pt"):
        (run_dir / name).write_text(name)
    return run_dir


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_reported_checkpoint_is_a_reference_to_the_run_dir_not_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from ray import tune

    from sweeps.trial import REFERENCE_FILE, report_with_checkpoint

    run_dir = _fake_run_dir(tmp_path)
    before = _files(run_dir)
    reported = {}

    def fake_report(metrics, *, checkpoint=None):
        with checkpoint.as_directory() as d:
            reported.update(
                metrics=metrics,
                files=_files(Path(d)),
                reference=json.loads((Path(d) / REFERENCE_FILE).read_text()),
            )

    monkeypatch.setattr(tune, "report", fake_report)
    report_with_checkpoint({"miou": 0.5, "iteration": 4}, run_dir)

    assert reported["metrics"] == {"miou": 0.5, "iteration": 4}
    assert reported["files"] == {REFERENCE_FILE}  # no weights travel to Tune's storage
    assert reported["reference"] == {
        "run_dir": str(run_dir),
        "checkpoint": str(run_dir / "checkpoints" / "iter_00000004"),  # newest complete
        "checkpoint_iteration": 4,
    }
    assert not (tmp_path / "trial.report").exists()  # the staging folder is gone
    assert _files(run_dir) == before  # the run dir itself is untouched


def test_retried_trial_needs_its_run_dir_with_the_reported_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import shutil

    from ray import tune

    from sweeps.trial import REFERENCE_FILE, check_run_dir

    run_dir = _fake_run_dir(tmp_path / "node1")
    saved = tmp_path / "tune-checkpoint"
    saved.mkdir()
    (saved / REFERENCE_FILE).write_text(json.dumps({"checkpoint_iteration": 4}))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(saved)))
    check_run_dir(run_dir)  # same machine: iteration 4 is there
    shutil.rmtree(run_dir / "checkpoints" / "iter_00000004")
    with pytest.raises(FileNotFoundError, match=r"iteration 4.*only iteration 2"):
        check_run_dir(run_dir)  # a newer checkpoint was lost: no silent restart from older
    with pytest.raises(FileNotFoundError, match=r"node2/trial.*holds none"):
        check_run_dir(tmp_path / "node2" / "trial")  # another machine without a shared folder
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    check_run_dir(tmp_path / "fresh")  # first attempt: nothing reported yet


def test_finished_run_keeps_its_export_only_unless_asked(tmp_path: Path) -> None:
    from sweeps.trial import count_attempt, prune_finished

    kept = _fake_run_dir(tmp_path / "a")
    prune_finished(kept, keep_checkpoints=True)
    assert (kept / "checkpoints").is_dir()
    pruned = _fake_run_dir(tmp_path / "b")
    prune_finished(pruned, keep_checkpoints=False)
    assert not (pruned / "checkpoints").exists() and (pruned / "model.pt").is_file()
    assert [count_attempt(pruned) for _ in range(3)] == [1, 2, 3]


def test_trials_are_named_for_what_they_are() -> None:
    from sweeps.trial import trial_run_name

    assert trial_run_name({"variant": "easy+hard_pos", "tags": {"table": "5"}}) == (
        "table5/easy+hard_pos"
    )
    searched = {"ratio": 0.6, "fusion": "concat", "alpha": 0.6, "beta": 0.7, "gamma": 0.4}
    assert trial_run_name(searched) == "ratio=0.6 fusion=concat alpha=0.6 beta=0.7 gamma=0.4"
