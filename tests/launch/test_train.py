"""A 2-process DeepSpeed ZeRO-2 run (the deepspeed launcher, CPU, gloo) logging to a temporary
MLflow store: params, metrics, artifacts, checkpoints (keep-last-k) and the fp32 export."""

from __future__ import annotations

import json

import pytest

from tests.launch.train_utils import BIN, TRAIN, args, free_port, losses, run, scenes_shards


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_logs_to_mlflow(tmp_path, tmp_path_factory) -> None:
    shards = scenes_shards(tmp_path_factory.getbasetemp())
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    a = args(
        shards,
        run_dir,
        "schedule.iterations=4",
        "checkpoint.every=1",
        "checkpoint.keep=2",
        "eval.every=2",
        "logging.every=1",
        "runtime.zero_stage=2",
        f"logging.tracking_uri={uri}",
        "logging.experiment=launch-test",
        mlflow=True,
    )
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        TRAIN,
        "--nodes",
        "1",
        *a,
    ]
    ext = tmp_path / "torch_extensions"
    proc = run(cmd, tmp_path, TORCH_EXTENSIONS_DIR=str(ext))
    # The shared-memory comm op (a ~2.5 min JIT build) is not needed on CPU: nothing compiled.
    assert not list(ext.rglob("*.so"))
    assert "val mIoU: " in proc.stdout
    # The config goes to the run dir (and MLflow), one line says where; the launcher's chatter
    # and DeepSpeed's untested-optimizer warning stay off.
    assert f"run dir {run_dir}: resolved config in config.json" in proc.stdout
    assert "untested optimizer" not in proc.stdout + proc.stderr

    # Run directory: resolved configs, per-iteration losses, keep-last-2 checkpoints, export.
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["data"]["crop_size"] == 64 and cfg["runtime"]["zero_stage"] == 2
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 4
    assert ds["gradient_clipping"] == 0.0
    rec = losses(run_dir)
    assert sorted(rec) == [1, 2, 3, 4] and all(r["finite"] for r in rec.values())
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
    assert tags == ["iter_00000003", "iter_00000004"]
    assert all((run_dir / "checkpoints" / t / "COMPLETE").is_file() for t in tags)
    meta = json.loads((run_dir / "checkpoints" / "iter_00000004" / "COMPLETE").read_text())
    assert meta["world_size"] == 2 and meta["iteration"] == 4

    from launch.export import load_exported

    model, cfg_dict = load_exported(run_dir / "model.pt")
    assert cfg_dict["model"]["channels"] == 16 and not model.training

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("launch-test")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED"
    assert r.data.params["optim.lr"] == "0.02" and r.data.params["data.crop_size"] == "64"
    assert r.data.params["runtime.zero_stage"] == "2"
    for key in (
        "train/loss/total",
        "train/loss/coarse",
        "train/loss/refined",
        "train/loss/aux",
        "train/lr",
        "train/grad_norm",
        "train/images_per_s",
        "train/memory_gb",
        "val/miou",
        "val/pixel_accuracy",
    ):
        assert key in r.data.metrics, key
    assert any(k.startswith("val/iou/") for k in r.data.metrics)
    history = client.get_metric_history(r.info.run_id, "train/loss/total")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    by_step = {m.step: m.value for m in history}
    assert by_step[4] == pytest.approx(rec[4]["loss"]["total"])
    # The ZeRO config computes no norm (no clipping): the trainer asks for it on logged steps.
    assert ds["zero_optimization"]["compute_grad_norm"] is False
    norms = client.get_metric_history(r.info.run_id, "train/grad_norm")
    assert sorted(m.step for m in norms) == [1, 2, 3, 4] and all(m.value > 0 for m in norms)
    miou = client.get_metric_history(r.info.run_id, "val/miou")
    assert sorted(m.step for m in miou) == [0, 2, 4]  # 0: NaN, first (launch/tracking.py)
    final = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert r.data.metrics["val/miou"] == pytest.approx(final["miou"])
    assert f"val mIoU: {final['miou']:.4f}" in proc.stdout
    for tag in ("variant", "graph", "ratio", "fusion"):
        assert tag in r.data.tags

    def files(path=None):
        for f in client.list_artifacts(r.info.run_id, path):
            yield from files(f.path) if f.is_dir else [f.path]

    names = set(files())
    assert {"config.yaml", "deepspeed_config.json"} <= names
    for kind in ("iou.md", "iou.csv", "confusion.png"):
        assert f"val/step_0000004/{kind}" in names
    pictures = [n for n in names if n.startswith("pictures/step_0000004/")]
    assert any(n.endswith("_prediction.png") for n in pictures)
    assert any(n.endswith("_sampling.png") for n in pictures)  # Fig. 4 style
    assert any(n.endswith("_features.png") for n in pictures)  # Fig. 6 style
