"""MLflow tracking for training and evaluation runs; rank 0 only, a no-op elsewhere.

Everything goes through ``mlflow.MlflowClient`` with an explicit run id: the fluent API keeps
one active-run stack per process, and sweeps run many trials in one process.

- Tracking URI: cfg.logging.tracking_uri, else $MLFLOW_TRACKING_URI, else
  ``sqlite:///<cwd>/mlflow.db``; a sweep's trials write that store through the sweep's server
  (``write_through``). With a SQLite store a new experiment keeps its artifacts beside the
  database (``<db dir>/mlartifacts/<experiment>``, a file root readable without any server), not
  under the working directory (Ray trials each run in their own one).
- Experiment: cfg.logging.experiment, else cfg.dataset; created with the tag
  ``mlflow.experimentKind = custom_model_development`` (set on an existing experiment that lacks
  it), without which MLflow 3's UI opens an experiment on its GenAI overview, not the runs table.
- Run name: cfg.logging.run_name, else what the run is and when it started:
  ``<preset> <variant> r<depth> <length> <start>`` (``cityscapes aspp+cdgc-ds r101 30k 12-04 16:03``).
- Metrics: a training run's first is ``val/miou`` = NaN at step 0 ("not evaluated yet"), so that
  MLflow's compare page, which plots the first metric the compared runs share, plots mIoU.
- Params: launch.config.flatten(cfg) without BOOKKEEPING_PARAMS (run name, tags, parent, run
  dir: MLflow fields and tags of their own), plus pretrained.sha256 and pretrained.source (which
  ImageNet weights the backbone started from; "none (...)" says why there are none). MLflow
  limits a value to 6000 characters (longer ones are
  cut, with a marker; the full value is in the config.yaml artifact) and a logged param cannot
  change: when a run is resumed, equal values are skipped and changed ones are recorded as
  ``changed_param.<key>`` tags instead of failing.
- Tags: variant, graph, ratio, fusion, table (cfg.logging.tags win over the model's values),
  dataset, preset, kind ("training" | "evaluation"), run_dir (training), and
  mlflow.parentRunId when nested.
"""

from __future__ import annotations

import io
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import torch
import yaml

from cdgcnet.metrics import ConfusionMatrix

MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_LEN = 8000
_TRUNCATED = "...[truncated; full value in config.yaml]"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


# store URI -> the tracking server this process writes that store through (sweeps/trial.py)
_WRITE_THROUGH: dict[str, str] = {}


def write_through(store_uri: str, server_uri: str) -> None:
    """Send this process's writes to the store `store_uri` through the tracking server
    `server_uri` (concurrent trials on one SQLite file). The runs still record the store as
    their `logging.tracking_uri`, which outlives the server."""
    if server_uri != store_uri:
        _WRITE_THROUGH[store_uri] = server_uri


def resolve_tracking_uri(cfg: Any) -> str:
    """cfg.logging.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    uri = getattr(cfg.logging, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = "sqlite:///" + str(Path.cwd() / "mlflow.db")
    return uri


# Config fields that say where a run is and what it is called, not what it trains: the run
# name, tags and parent are MLflow's own fields, the run dir the tag run_dir (config.yaml has all).
# As params they would differ between any two runs and crowd the compare page's axes.
BOOKKEEPING_PARAMS = (
    "logging.run_name",
    "logging.tags",
    "logging.parent_run_id",
    "runtime.run_dir",
)
# MLflow's compare page plots the first metric every compared run has (in the order the runs
# logged them): a training run logs this one first, as NaN at step 0 (no evaluation yet).
FIRST_METRIC = "val/miou"

# MLflow 3's UI opens an experiment on its runs table only with this kind (else a GenAI overview).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, created when missing; either way of the runs-table kind."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = _artifact_location(tracking_uri, name)
        try:
            exp_id = client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException:
            # Another process (a parallel sweep trial) created it first.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
        else:
            return exp_id
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def default_run_name(cfg: Any, when: float | None = None) -> str:
    """What a training run is and when it started: preset, variant, depth, length and start
    time, e.g. `cityscapes aspp+cdgc-ds r101 30k 12-04 16:03` (two runs of one config differ)."""
    from launch.run_dir import length_label

    stamp = time.strftime("%m-%d %H:%M", time.localtime(when))
    variant = ablation_tags(cfg)["variant"]
    return (
        f"{cfg.name} {variant} r{cfg.model.depth} {length_label(cfg.schedule.iterations)} {stamp}"
    )


def metric_key(name: str) -> str:
    """A valid MLflow metric/param name: characters outside [/\\w.- ] become '_'."""
    return _BAD_KEY_CHARS.sub("_", name)


def pretrained_params(cfg: Any) -> dict[str, str]:
    """pretrained.sha256 and pretrained.source of cfg.model.pretrained (cdgcnet.weights)."""
    from cdgcnet.weights import provenance

    return {f"pretrained.{k}": v for k, v in provenance(cfg.model.pretrained).items()}


def ablation_tags(cfg: Any) -> dict[str, str]:
    """variant, graph, ratio, fusion, table for grouping ablation runs."""
    m = cfg.model
    variant = m.context if m.context != "cdgc" else f"cdgc-{m.graph}"
    if m.aspp:
        variant = f"aspp+{variant}"
    tags = {
        "variant": variant,
        "graph": str(m.graph),
        "ratio": str(m.ratio),
        "fusion": str(m.fusion),
        "table": "",
    }
    tags.update({str(k): str(v) for k, v in (cfg.logging.tags or {}).items()})
    return {k: v for k, v in tags.items() if v != ""}


class Tracker:
    """Rank-0 MLflow run of one training or evaluation job; every method is a no-op when disabled."""

    def __init__(self, cfg: Any, *, enabled: bool, kind: str = "training") -> None:
        self.cfg = cfg
        self.enabled = bool(enabled) and getattr(cfg.logging, "enabled", True)
        self.kind = kind
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.tracking_uri: str | None = None
        self._client = None

    # ------------------------------------------------------------------ run lifecycle

    def start(
        self,
        run_name: str | None = None,
        *,
        ds_config: Mapping | None = None,
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
    ) -> str | None:
        """Create (or, with resume_run_id, reopen) the run; log params, tags and the config."""
        if not self.enabled:
            return None
        from mlflow import MlflowClient

        from launch.config import flatten, to_dict

        cfg = self.cfg
        self.tracking_uri = resolve_tracking_uri(cfg)
        self._client = MlflowClient(
            tracking_uri=_WRITE_THROUGH.get(self.tracking_uri, self.tracking_uri)
        )
        name = cfg.logging.experiment or cfg.dataset
        self.experiment_id = self._experiment(name)
        all_tags = {"dataset": cfg.dataset, "preset": cfg.name, "kind": self.kind}
        if self.kind == "training":  # where its checkpoints, logs and model.pt are
            all_tags["run_dir"] = str(Path(cfg.runtime.run_dir).resolve())
        all_tags.update(ablation_tags(cfg))
        all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        parent = getattr(cfg.logging, "parent_run_id", None)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        if resume_run_id and self._run_exists(resume_run_id):
            self.run_id = resume_run_id
            self._client.update_run(resume_run_id, status="RUNNING")
        else:
            if resume_run_id:  # e.g. resumed against another tracking store
                print(
                    f"warning: MLflow run {resume_run_id} not found in {self.tracking_uri}; "
                    "logging the resumed training to a new run",
                    flush=True,
                )
                all_tags["resumed_from_run"] = resume_run_id
            run_name = run_name or getattr(cfg.logging, "run_name", None) or default_run_name(cfg)
            run = self._client.create_run(self.experiment_id, tags=all_tags, run_name=run_name)
            self.run_id = run.info.run_id
            if self.kind == "training":
                # Its first metric, so that MLflow's compare page plots it (see above).
                self.log_metrics({FIRST_METRIC: math.nan}, step=0)
        self.set_tags(all_tags)
        params = {k: v for k, v in flatten(cfg).items() if k not in BOOKKEEPING_PARAMS}
        self._log_params({**params, **pretrained_params(cfg)})
        self.log_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
        if ds_config is not None:
            self.log_dict(dict(ds_config), "deepspeed_config.json")
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED | FAILED | KILLED."""
        if not self.enabled or self.run_id is None:
            return
        self._client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")

    def _run_exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def _experiment(self, name: str) -> str:
        return get_or_create_experiment(self._client, name, self.tracking_uri)

    # ------------------------------------------------------------------ params, tags, metrics

    def _log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        existing = self._client.get_run(self.run_id).data.params
        new, changed = [], []
        for key, value in params.items():
            key, value = metric_key(key), str(value)
            if len(value) > MAX_PARAM_LEN:
                value = value[: MAX_PARAM_LEN - len(_TRUNCATED)] + _TRUNCATED
            if key not in existing:
                new.append(Param(key, value))
            elif existing[key] != value:
                changed.append(RunTag(f"changed_param.{key}", value[:MAX_TAG_LEN]))
        for i in range(0, len(new), 100):  # MAX_PARAMS_TAGS_PER_BATCH
            self._client.log_batch(self.run_id, params=new[i : i + 100])
        for i in range(0, len(changed), 100):
            self._client.log_batch(self.run_id, tags=changed[i : i + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import RunTag

        items = [RunTag(metric_key(k), str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, tags=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Numbers (floats or 0-dim tensors) at one step; None values are skipped."""
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.detach().float().item()
            items.append(Metric(metric_key(k), float(v), now, int(step)))
        for i in range(0, len(items), 1000):  # MAX_METRICS_PER_BATCH
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    # ------------------------------------------------------------------ artifacts

    def log_dict(self, d: Mapping, artifact_file: str) -> None:
        if self.enabled and self.run_id is not None:
            self._client.log_dict(self.run_id, _plain(d), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled and self.run_id is not None:
            self._client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.enabled and self.run_id is not None:
            if not Path(path).exists():
                raise FileNotFoundError(f"{path}: artifact to log does not exist")
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_image(self, rgb: np.ndarray, artifact_file: str) -> None:
        """An (H, W, 3) uint8 RGB array as a PNG artifact."""
        if self.enabled and self.run_id is not None:
            self._client.log_image(self.run_id, rgb, artifact_file=artifact_file)

    def log_evaluation(
        self, cm: ConfusionMatrix, class_names: Sequence[str], step: int, prefix: str = "val"
    ) -> None:
        """mIoU, pixel accuracy, per-class IoU metrics, IoU table (md, csv), confusion plot."""
        if not self.enabled or self.run_id is None:
            return
        from launch.visualize import confusion_figure

        iou = cm.iou()
        metrics = {f"{prefix}/miou": cm.miou(), f"{prefix}/pixel_accuracy": cm.pixel_accuracy()}
        for name, v in zip(class_names, iou, strict=True):
            if not math.isnan(v):  # a class absent from this split has no IoU
                metrics[f"{prefix}/iou/{name}"] = float(v)
        self.log_metrics(metrics, step)
        base = f"{prefix}/step_{int(step):07d}"
        self.log_text(iou_table_markdown(cm, class_names), f"{base}/iou.md")
        self.log_text(iou_table_csv(cm, class_names), f"{base}/iou.csv")
        self.log_text(_matrix_csv(cm.mat, class_names), f"{base}/confusion.csv")
        fig = confusion_figure(cm.mat, class_names)
        self._client.log_figure(self.run_id, fig, f"{base}/confusion.png")

    def log_pictures(
        self, pictures: Sequence[tuple[str, Mapping[str, np.ndarray]]], step: int
    ) -> None:
        """PNG artifacts under pictures/step_<step>/: (sample key, {picture name: RGB}) pairs,
        as launch.evaluation makes them (overlays, Fig. 4 sampling, Fig. 6 features)."""
        if not self.enabled or self.run_id is None or not pictures:
            return
        base = f"pictures/step_{int(step):07d}"
        for i, (key, named) in enumerate(pictures):
            for name, rgb in named.items():
                self.log_image(rgb, f"{base}/{i:02d}_{metric_key(key)}_{name}.png")


def iou_table_markdown(cm: ConfusionMatrix, class_names: Sequence[str]) -> str:
    """| class | IoU | pixels (gt) | ... with mIoU and pixel accuracy below."""
    iou, gt = cm.iou(), cm.mat.sum(1)
    lines = ["| id | class | IoU | gt pixels |", "|---:|---|---:|---:|"]
    for i, (name, v) in enumerate(zip(class_names, iou, strict=True)):
        lines.append(f"| {i} | {name} | {_fmt(v)} | {int(gt[i])} |")
    lines += ["", f"mIoU: {_fmt(cm.miou())}", f"pixel accuracy: {_fmt(cm.pixel_accuracy())}"]
    return "\n".join(lines) + "\n"


def iou_table_csv(cm: ConfusionMatrix, class_names: Sequence[str]) -> str:
    iou, gt = cm.iou(), cm.mat.sum(1)
    out = io.StringIO()
    out.write("id,class,iou,gt_pixels\n")
    for i, (name, v) in enumerate(zip(class_names, iou, strict=True)):
        value = "" if math.isnan(v) else f"{v:.6f}"
        out.write(f"{i},{_csv_field(name)},{value},{int(gt[i])}\n")
    return out.getvalue()


def _matrix_csv(mat: np.ndarray, class_names: Sequence[str]) -> str:
    rows = ["gt\\pred," + ",".join(_csv_field(n) for n in class_names)]
    for name, row in zip(class_names, mat, strict=True):
        rows.append(_csv_field(name) + "," + ",".join(str(int(x)) for x in row))
    return "\n".join(rows) + "\n"


def _csv_field(s: str) -> str:
    return f'"{s}"' if ("," in s or '"' in s) else s


def _fmt(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.4f}"


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a SQLite store: <db dir>/mlartifacts/<experiment>; otherwise the server's default."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(unquote(tracking_uri[len("sqlite:///") :])).resolve()
    safe = re.sub(r"[^\w.\-]", "_", experiment)
    return (db.parent / "mlartifacts" / safe).as_uri()


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    return obj
