"""evaluate(): exact confusion matrices on packed shards, and 2 gloo ranks equal one process."""

from __future__ import annotations

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
    root: Path, n: int = N, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Cityscapes-layout val images/labels: {stem: (RGB image, label ids)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        city = ("aachen", "bochum")[i % 2]
        stem = f"{city}_{i:06d}_000019"
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        ids = rng.choice(np.array([ROAD, SIDEWALK, UNLABELED], np.uint8), size=(H, W))
        img_dir = root / "leftImg8bit" / "val" / city
        gt_dir = root / "gtFine" / "val" / city
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
