"""evaluate(): exact confusion matrices on packed shards, and 2 gloo ranks equal one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cdgcnet.config import ModelConfig
from cdgcnet.labels import CITYSCAPES
from cdgcnet.model import build_model
from launch.evaluation import evaluate
from pipeline.pack import main as pack_main
from pipeline.reader import EvalStream

H, W, N = 16, 24, 5
ROAD, SIDEWALK, UNLABELED = 7, 8, 0  # Cityscapes label ids -> train ids 0, 1, 255


def write_val_set(
    root: Path, n: int = N, seed: int = 0, split: str = "val"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Cityscapes-layout images/labels of one split: {stem: (RGB image, label ids)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        city = ("aachen", "bochum")[i % 2]
        stem = f"{city}_{i:06d}_000019"
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        ids = rng.choice(np.array([ROAD, SIDEWALK, UNLABELED], np.uint8), size=(H, W))
        img_dir = root / "leftImg8bit" / split / city
        gt_dir = root / "gtFine" / split / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(img_dir / f"{stem}_leftImg8bit.png"), rgb[..., ::-1])
        assert cv2.imwrite(str(gt_dir / f"{stem}_gtFine_labelIds.png"), ids)
        out[stem] = (rgb, ids)
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs")
    data = write_val_set(root / "src")
    args = ["cityscapes", "--src", str(root / "src"), "--out", str(root / "shards")]
    args += ["--splits", "val", "--workers", "1", "--max-count", "2", "--no-progress"]
    assert pack_main(args) == 0
    return root / "shards" / "val", data


class RedThreshold(nn.Module):
    """Predicts sidewalk (1) where the normalised red channel is > 0 (R > 123.675), else road."""

    def __init__(self, num_classes: int = 19) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor) -> dict:
        b, _, h, w = images.shape
        logits = torch.full((b, self.num_classes, h, w), -10.0)
        logits[:, 0] = 0.0
        logits[:, 1] = images[:, 0] * 100.0
        return {"coarse": logits}


def expected_matrix(data) -> np.ndarray:
    lut = CITYSCAPES.lut()
    mat = np.zeros((19, 19), np.int64)
    for rgb, ids in data.values():
        target = lut[ids].astype(np.int64)
        pred = (rgb[..., 0].astype(np.float64) > 123.675).astype(np.int64)
        keep = target != 255
        np.add.at(mat, (target[keep], pred[keep]), 1)
    return mat


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"flip": True},
        {"mode": "slide", "crop": 8, "stride": 6},
    ],
)
def test_matrix_equals_hand_computed(packed, kwargs):
    split_dir, data = packed
    model = RedThreshold()
    cm = evaluate(model, EvalStream(split_dir), num_classes=19, progress=False, **kwargs)
    want = expected_matrix(data)
    assert want.sum() > 0 and want[0, 1] > 0 and want[1, 0] > 0  # a non-trivial matrix
    np.testing.assert_array_equal(cm.mat, want)


def test_mode_is_restored_and_bad_arguments_named(packed):
    split_dir, _ = packed
    model = RedThreshold().train()
    evaluate(model, EvalStream(split_dir), num_classes=19, progress=False)
    assert model.training
    with pytest.raises(ValueError, match="mode='slide' needs crop and stride"):
        evaluate(model, EvalStream(split_dir), num_classes=19, mode="slide")
    with pytest.raises(ValueError, match="mode must be 'whole' or 'slide'"):
        evaluate(model, EvalStream(split_dir), num_classes=19, mode="tiles")


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=19, depth=18, channels=16, aspp=False, aux=False)
    return build_model(cfg)


def _rank_worker(rank: int, world: int, init_file: str, split_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stream = EvalStream(split_dir, rank=rank, world_size=world)
        cm = evaluate(_tiny_model(), stream, num_classes=19, progress=False)
        np.save(Path(out_dir) / f"rank{rank}.npy", cm.mat)
        (Path(out_dir) / f"rank{rank}.len").write_text(str(len(stream)))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(packed, tmp_path):
    split_dir, _ = packed
    single = evaluate(_tiny_model(), EvalStream(split_dir), num_classes=19, progress=False)
    args = (2, str(tmp_path / "init"), str(split_dir), str(tmp_path))
    mp.spawn(_rank_worker, args=args, nprocs=2, join=True)
    lens = [int((tmp_path / f"rank{r}.len").read_text()) for r in range(2)]
    assert sorted(lens) == [2, 3]  # each rank evaluated only its share
    for r in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{r}.npy"), single.mat)
    assert single.mat.sum() == sum(
        int((lut_ids != 255).sum()) for lut_ids in _train_labels(packed[1])
    )


def _train_labels(data):
    lut = CITYSCAPES.lut()
    return [lut[ids] for _, ids in data.values()]


REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_evaluate_cli_reproduces_the_in_training_miou(tmp_path):
    """Train 4 iterations (launch/train.py), then evaluate.py on model.pt and on the ZeRO
    checkpoint directory: both give the mIoU the training run measured at the end."""
    src = tmp_path / "src"
    write_val_set(src, n=4, seed=1, split="train")
    write_val_set(src, n=3, seed=2, split="val")
    shards = tmp_path / "shards"
    args = ["cityscapes", "--src", str(src), "--out", str(shards), "--splits", "train", "val"]
    assert pack_main([*args, "--workers", "1", "--no-progress"]) == 0
    db = tmp_path / "mlflow.db"
    run_dir = tmp_path / "run"
    overrides = [
        "dataset=cityscapes", f"data.root={shards}", "data.crop_size=32", "data.batch_size=2",
        "data.num_workers=0",
        "schedule.iterations=4", "schedule.warmup_iters=0", "eval.every=0", "eval.mode=whole",
        "eval.num_pictures=1", "checkpoint.every=2", "model.channels=16", "model.aspp=false",
        "loss.ohem_min_kept=16", f"logging.tracking_uri=sqlite:///{db}", "logging.experiment=e2e",
        f"runtime.run_dir={run_dir}", "runtime.progress=false",
    ]  # fmt: skip
    _run(
        [str(REPO / "launch/train.py"), "--config", "scenes", "--resume", "none", *overrides],
        tmp_path,
    )
    trained = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert trained["iteration"] == 4
    # The script as a user runs it on the export, then in-process on the ZeRO checkpoint dir.
    out0 = tmp_path / "eval0.json"
    proc = _run(
        [str(REPO / "launch/evaluate.py"), "--checkpoint", str(run_dir / "model.pt"),
         "--json", str(out0), "--no-progress", f"logging.tracking_uri=sqlite:///{db}"],
        tmp_path,
    )  # fmt: skip
    assert f"mIoU: {trained['miou']:.4f}" in proc.stdout and "| 0 | road |" in proc.stdout
    from launch.evaluate import main as evaluate_main

    out1 = tmp_path / "eval1.json"
    argv = ["--checkpoint", str(run_dir), "--json", str(out1), "--no-progress"]
    assert evaluate_main([*argv, f"logging.tracking_uri=sqlite:///{db}"]) == 0
    for out in (out0, out1):
        got = json.loads(out.read_text())
        assert got["miou"] == trained["miou"], (out, got["miou"], trained["miou"])
        assert got["pixel_accuracy"] == trained["pixel_accuracy"]
        assert got["iteration"] == 4

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("e2e")
    evals = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'evaluation'")
    assert len(evals) == 2
    for run in evals:
        assert run.data.metrics["val/miou"] == pytest.approx(trained["miou"], abs=0)
        assert run.data.tags["checkpoint_iteration"] == "4"
    # The training run itself carries the evaluation tables and the pictures.
    (train_run,) = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'training'")
    assert train_run.data.metrics["val/miou"] == pytest.approx(trained["miou"], abs=0)
    arts = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert {"config.yaml", "deepspeed_config.json", "val", "pictures"} <= arts
    pics = {a.path for a in client.list_artifacts(train_run.info.run_id, "pictures/step_0000004")}
    for kind in ("prediction", "sampling", "features"):
        assert any(p.endswith(f"_{kind}.png") for p in pics), (kind, pics)


def test_out_of_range_labels_name_the_shard_and_key(packed):
    from launch.evaluation import LabelError

    split_dir, _ = packed
    stream = EvalStream(split_dir)
    first = stream.manifest["shards"][0]
    key = first["keys"][0]
    # Two classes are known to this evaluation: the label "sidewalk" (1) of the set is not.
    with pytest.raises(LabelError) as info:
        evaluate(RedThreshold(), stream, num_classes=1, progress=False)
    message = str(info.value)
    assert message.startswith(f"{Path(split_dir) / first['name']}: sample {key}: ")
    assert "outside [0, 1)" in message and "\n" not in message


def test_long_evaluations_are_announced_once_with_the_plan(packed, capsys):
    split_dir, _ = packed
    kwargs = dict(num_classes=19, mode="slide", crop=8, stride=6, scales=(1.0, 2.0), flip=True)
    evaluate(RedThreshold(), EvalStream(split_dir), progress=False, **kwargs)
    assert "warning" not in capsys.readouterr().err  # a few ms: nothing to say
    evaluate(RedThreshold(), EvalStream(split_dir), progress=False, warn_after_s=0.0, **kwargs)
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning")]
    assert f"on CPU ({N} image(s)" in line
    assert "2 scale(s) x 2 flips, sliding 8 px windows every 6 px" in line
    assert "--ms / --flip / --sliding" in line
