"""Tracker: params, metrics, tags and artifacts in a temporary SQLite MLflow store, read back."""

from __future__ import annotations

import csv
import io
import math
import re
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from cdgcnet.labels import CITYSCAPES
from cdgcnet.metrics import ConfusionMatrix
from cdgcnet.model import build_model
from launch.config import flatten, load_config, to_dict
from launch.evaluation import picture_inputs
from launch.tracking import (
    BOOKKEEPING_PARAMS,
    MAX_PARAM_LEN,
    Tracker,
    pretrained_params,
    resolve_tracking_uri,
)
from launch.visualize import pictures_for_sample


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the module (creating one runs MLflow's migrations, a few seconds)."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


def _cfg(store: Path, *overrides: str):
    return load_config(
        "scenes",
        [
            f"logging.tracking_uri=sqlite:///{store}",
            "model.channels=16",
            "model.aux=false",
            *overrides,
        ],
    )


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def _cm() -> ConfusionMatrix:
    cm = ConfusionMatrix(19)
    target = torch.tensor([0, 0, 0, 1, 1, 2, 255, 2])
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 0, 0])
    cm.update(pred, target)
    return cm


def test_full_run_is_readable_back(store, tmp_path):
    cfg = _cfg(store, "logging.experiment=full", "logging.tags={table: t2, note: x}")
    ds_config = {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.0}
    tracker = Tracker(cfg, enabled=True)
    run_id = tracker.start(run_name="trial", ds_config=ds_config)
    assert run_id is not None
    tracker.log_metrics({"loss/total": 1.5, "loss/coarse": torch.tensor(0.25), "lr": 0.01}, step=3)
    tracker.log_metrics({"loss/total": 1.0, "skipped": None}, step=4)
    cm = _cm()
    tracker.log_evaluation(cm, CITYSCAPES.class_names, step=4)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    h, w = 32, 48
    sample = {
        "key": "aachen_000000_000019",
        "image": torch.randn(1, 3, h, w),
        "label": torch.randint(0, 3, (1, h, w)),
        "image_uint8": np.zeros((h, w, 3), np.uint8),
    }
    pictures = pictures_for_sample(picture_inputs(model, sample), CITYSCAPES)
    tracker.log_pictures([(sample["key"], pictures)], step=4)
    tracker.end()

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "trial"
    assert client.get_experiment(run.info.experiment_id).name == "full"
    # The experiment keeps its artifacts beside the database, not in the working directory.
    assert run.info.artifact_uri.startswith((store.parent / "mlartifacts" / "full").as_uri())
    # The whole config but what MLflow holds in fields of its own (name, tags, parent, run dir)
    params = {k: v for k, v in flatten(cfg).items() if k not in BOOKKEEPING_PARAMS}
    assert run.data.params == {**params, **pretrained_params(cfg)}
    assert not any(k.startswith(("logging.tags", "logging.run_name")) for k in run.data.params)
    # val/miou comes first (NaN at step 0: not evaluated yet), so the compare page plots it
    assert next(iter(run.data.metrics)) == "val/miou"
    history = client.get_metric_history(run_id, "val/miou")
    assert [h.step for h in history] == [0, 4] and math.isnan(history[0].value)
    assert run.data.params["pretrained.sha256"] == "none"  # the scenes demo: random init
    tags = run.data.tags
    assert tags["variant"] == "aspp+cdgc-ds" and tags["graph"] == "ds" and tags["ratio"] == "1.0"
    assert tags["fusion"] == "concat" and tags["table"] == "t2" and tags["note"] == "x"
    assert tags["kind"] == "training" and tags["dataset"] == cfg.dataset == "scenes"
    m = run.data.metrics
    assert m["loss/total"] == 1.0 and m["loss/coarse"] == 0.25 and m["lr"] == 0.01
    assert "skipped" not in m
    hist = client.get_metric_history(run_id, "loss/total")
    assert sorted((x.step, x.value) for x in hist) == [(3, 1.5), (4, 1.0)]
    iou = cm.iou()
    assert m["val/miou"] == pytest.approx(cm.miou())
    assert m["val/pixel_accuracy"] == pytest.approx(5 / 7)
    assert m["val/iou/road"] == pytest.approx(iou[0]) and m["val/iou/road"] == pytest.approx(0.5)
    assert m["val/iou/sidewalk"] == pytest.approx(2 / 3)
    assert "val/iou/car" not in m  # absent class: NaN IoU is not logged

    arts = _artifacts(client, run_id)
    for a in (
        "config.yaml",
        "deepspeed_config.json",
        "val/step_0000004/iou.md",
        "val/step_0000004/iou.csv",
        "val/step_0000004/confusion.csv",
        "val/step_0000004/confusion.png",
        "pictures/step_0000004/00_aachen_000000_000019_prediction.png",
        "pictures/step_0000004/00_aachen_000000_000019_sampling.png",
        "pictures/step_0000004/00_aachen_000000_000019_features.png",
    ):
        assert a in arts, (a, sorted(arts))
    local = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    assert yaml.safe_load((local / "config.yaml").read_text()) == to_dict(cfg)
    rows = list(csv.DictReader(io.StringIO((local / "val/step_0000004/iou.csv").read_text())))
    assert len(rows) == 19 and rows[0]["class"] == "road"
    assert float(rows[2]["iou"]) == pytest.approx(iou[2]) and rows[5]["iou"] == ""
    assert "| 0 | road | 0.5000 | 3 |" in (local / "val/step_0000004/iou.md").read_text()
    pic = cv2.imread(str(local / "pictures/step_0000004/00_aachen_000000_000019_prediction.png"))
    assert pic.shape == (h, 4 * w, 3)
    assert cv2.imread(str(local / "val/step_0000004/confusion.png")) is not None


def test_long_params_are_cut_and_changed_params_do_not_fail_a_resume(store):
    cfg = _cfg(store, "logging.experiment=resume", "data.root=/" + "y" * 7000)
    tracker = Tracker(cfg, enabled=True)
    run_id = tracker.start()
    tracker.end("KILLED")
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    long_value = client.get_run(run_id).data.params["data.root"]
    assert len(long_value) == MAX_PARAM_LEN and long_value.endswith("full value in config.yaml]")

    resumed_cfg = _cfg(store, "logging.experiment=resume", "optim.lr=0.5")
    again = Tracker(resumed_cfg, enabled=True)
    assert again.start(resume_run_id=run_id) == run_id
    again.log_metrics({"x": 2.0}, step=1)
    again.end()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)  # params are immutable
    assert run.data.tags["changed_param.optim.lr"] == "0.5"
    assert run.data.metrics["x"] == 2.0


def test_nested_under_parent_and_interleaved_trackers(store):
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    exp = client.create_experiment("sweep")
    parent = client.create_run(exp, run_name="parent").info.run_id
    cfg_a = _cfg(
        store, "logging.experiment=sweep", f"logging.parent_run_id={parent}", "model.ratio=0.5"
    )
    cfg_b = _cfg(
        store, "logging.experiment=sweep", f"logging.parent_run_id={parent}", "model.ratio=0.25"
    )
    a, b = Tracker(cfg_a, enabled=True), Tracker(cfg_b, enabled=True)
    id_a, id_b = a.start(), b.start()
    a.log_metrics({"val/miou": 0.1}, step=1)
    b.log_metrics({"val/miou": 0.2}, step=1)
    b.end()
    a.end()
    for run_id, ratio, miou in ((id_a, "0.5", 0.1), (id_b, "0.25", 0.2)):
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["ratio"] == ratio and run.data.metrics["val/miou"] == miou
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert {r.info.run_id for r in children} == {id_a, id_b}


def test_disabled_tracker_is_a_no_op(tmp_path):
    db = tmp_path / "never.db"
    cfg = _cfg(db)
    tracker = Tracker(cfg, enabled=False)
    assert tracker.start(ds_config={"a": 1}) is None
    tracker.log_metrics({"a": 1.0}, step=0)
    tracker.log_evaluation(_cm(), CITYSCAPES.class_names, step=0)
    tracker.log_text("x", "x.txt")
    tracker.log_dict({"a": 1}, "a.json")
    tracker.log_pictures([("k", {"prediction": np.zeros((2, 2, 3), np.uint8)})], step=0)
    tracker.end()
    assert tracker.run_id is None and not db.exists()
    # logging.enabled=false switches it off on rank 0 too.
    assert Tracker(_cfg(db, "logging.enabled=false"), enabled=True).start() is None
    assert not db.exists()


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    cfg = load_config("scenes")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(cfg) == "http://127.0.0.1:5000"
    cfg.logging.tracking_uri = "sqlite:////data/x.db"
    assert resolve_tracking_uri(cfg) == "sqlite:////data/x.db"


def test_resume_of_an_unknown_run_starts_a_new_one(store, capsys):
    cfg = _cfg(store, "logging.experiment=resume-unknown")
    tracker = Tracker(cfg, enabled=True)
    run_id = tracker.start(resume_run_id="0123456789abcdef0123456789abcdef")
    tracker.end()
    assert run_id != "0123456789abcdef0123456789abcdef"
    run = MlflowClient(tracking_uri=f"sqlite:///{store}").get_run(run_id)
    assert run.data.tags["resumed_from_run"] == "0123456789abcdef0123456789abcdef"
    assert "not found" in capsys.readouterr().out


def test_experiments_open_on_the_runs_table_and_runs_are_named(store):
    from launch.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, default_run_name

    client = MlflowClient(f"sqlite:///{store}")
    # An experiment made before the kind was set gets it on the next run.
    client.create_experiment("kindless")
    cfg = _cfg(store, "logging.experiment=kindless", "schedule.iterations=30000")
    tracker = Tracker(cfg, enabled=True)
    run_id = tracker.start()
    tracker.end()
    exp = client.get_experiment_by_name("kindless")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    name = client.get_run(run_id).info.run_name
    assert re.fullmatch(r"scenes aspp\+cdgc-ds r18 30k \d\d-\d\d \d\d:\d\d", name), name
    fresh = Tracker(_cfg(store, "logging.experiment=fresh", "schedule.iterations=12"), enabled=True)
    fresh.start()
    fresh.end()
    assert client.get_experiment_by_name("fresh").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_run(fresh.run_id).info.run_name.startswith("scenes aspp+cdgc-ds r18 12it ")
    paper = load_config("cityscapes", ["model.pretrained=none", "model.graph=sim"])
    when = time.mktime((2026, 12, 4, 16, 3, 0, 0, 0, -1))
    assert default_run_name(paper, when) == "cityscapes aspp+cdgc-sim r101 30k 12-04 16:03"
    # where the run's files are, for every training run
    assert client.get_run(run_id).data.tags["run_dir"] == str(Path(cfg.runtime.run_dir).resolve())
