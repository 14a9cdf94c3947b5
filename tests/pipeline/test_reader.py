"""Shard reader: manifest checks, evaluation exactly-once, training epochs and exact resumption,
corrupt shards. Shards are written here with webdataset.TarWriter in the on-disk format that
pipeline.pack produces."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.manifest import ManifestError
from pipeline.reader import EvalStream, ShardError, TrainStream, read_manifest
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD

NUM_CLASSES = 5


def write_split(
    folder: Path, shard_sizes: list[int], *, h: int = 24, w: int = 32, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write shards + manifest.json (contract schema); return key -> (image RGB, label)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shards = []
    for i, n in enumerate(shard_sizes):
        name = f"toy-train-{i:06d}.tar"
        keys = []
        with wds.TarWriter(str(folder / name), encoder=False) as sink:
            for j in range(n):
                key = f"s{i:02d}_{j:03d}"
                image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                label = rng.integers(0, NUM_CLASSES, (h, w), dtype=np.uint8)
                label[0, :3] = 255
                ok1, img_png = cv2.imencode(".png", image[..., ::-1])  # BGR on disk
                ok2, lbl_png = cv2.imencode(".png", label)
                assert ok1 and ok2
                meta = {
                    "key": key,
                    "image_path": f"{key}.png",
                    "label_path": f"{key}_l.png",
                    "height": h,
                    "width": w,
                    "dataset": "toy",
                    "split": "train",
                }
                sink.write(
                    {
                        "__key__": key,
                        "png": img_png.tobytes(),
                        "label.png": lbl_png.tobytes(),
                        "json": json.dumps(meta).encode(),
                    }
                )
                truth[key] = (image, label)
                keys.append(key)
        data = (folder / name).read_bytes()
        shards.append(
            {
                "name": name,
                "num_samples": n,
                "keys": keys,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    manifest = {
        "dataset": "toy",
        "split": "train",
        "packer_version": "test",
        "num_classes": NUM_CLASSES,
        "ignore_index": 255,
        "class_names": [f"c{i}" for i in range(NUM_CLASSES)],
        "palette": [[i, i, i] for i in range(NUM_CLASSES)],
        "label_map": {"0": 0},
        "num_samples": sum(shard_sizes),
        "shards": shards,
        "class_histogram": [0] * NUM_CLASSES,
        "ignore_pixels": 0,
        "skipped": [],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return truth


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("shards") / "train"
    truth = write_split(folder, [5, 3, 1, 4])  # unequal shard sizes, 13 samples
    return folder, truth


# --------------------------------------------------------------------------- manifest


def test_read_manifest_ok(split):
    folder, truth = split
    m = read_manifest(folder)
    assert m["num_samples"] == 13 and sum(len(s["keys"]) for s in m["shards"]) == len(truth)


def test_read_manifest_errors_name_the_file(tmp_path, split):
    folder, _ = split
    with pytest.raises(ManifestError, match=r"empty/manifest\.json.*no manifest"):
        read_manifest(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"bad/manifest\.json.*not valid JSON"):
        read_manifest(bad)
    m = json.loads((folder / "manifest.json").read_text())
    m["num_samples"] = 14
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"num_samples is 14 but the shards hold 13"):
        read_manifest(bad)
    m["num_samples"] = 13
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"bad/toy-train-000000\.tar.*does not exist"):
        read_manifest(bad)


def test_round_trip_through_the_packer(tmp_path):
    """synth -> pipeline.pack -> reader: the reader returns the source pixels and train ids."""
    from cdgcnet.labels import CITYSCAPES
    from pipeline import synth
    from pipeline.datasets import DATASETS
    from pipeline.pack import pack_split

    src = synth.generate("cityscapes", tmp_path / "src", train=2, val=5, size=(64, 32))
    m = pack_split(DATASETS["cityscapes"], src, tmp_path / "shards", "val", max_count=2,
                   progress=False)  # fmt: skip
    split_dir = tmp_path / "shards" / "val"
    keys = [k for s in m["shards"] for k in s["keys"]]
    assert len(m["shards"]) == 3 and len(keys) == 5
    got = []
    for rank in range(2):
        for sample in EvalStream(split_dir, rank=rank, world_size=2, num_workers=0):
            key = sample["key"]
            got.append(key)
            [image_path] = (src / "leftImg8bit" / "val").glob(f"*/{key}_leftImg8bit.png")
            [label_path] = (src / "gtFine" / "val").glob(f"*/{key}_gtFine_labelIds.png")
            bgr = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
            np.testing.assert_array_equal(sample["image_uint8"], bgr[..., ::-1])
            ids = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(sample["label"][0].numpy(), CITYSCAPES.lut()[ids])
    assert got == keys
    stream = TrainStream(split_dir, batch_size=2, crop_size=24, batches_per_epoch=2,
                         num_workers=0, shuffle_buffer=3)  # fmt: skip
    batches = list(stream)
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 24, 24)
    assert set(torch.cat([b[1].unique() for b in batches]).tolist()) <= {*range(19), 255}


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_every_sample_exactly_once(split, world_size, num_workers):
    folder, truth = split
    manifest_keys = [k for s in read_manifest(folder)["shards"] for k in s["keys"]]
    seen = []
    for rank in range(world_size):
        stream = EvalStream(folder, rank=rank, world_size=world_size, num_workers=num_workers)
        got = [s["key"] for s in stream]
        assert len(got) == len(stream)
        seen.extend(got)
    assert seen == manifest_keys  # each once, in manifest order, ranks contiguous
    assert set(seen) == set(truth)
    counts = [len(EvalStream(folder, rank=r, world_size=world_size)) for r in range(world_size)]
    assert max(counts) - min(counts) <= 1 and sum(counts) == 13


def test_eval_sample_contents(split):
    folder, truth = split
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for sample in EvalStream(folder, world_size=1, num_workers=0):
        image, label = truth[sample["key"]]
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == (1, 3, 24, 32)
        assert sample["label"].dtype == torch.int64 and sample["label"].shape == (1, 24, 32)
        assert isinstance(sample["image_uint8"], np.ndarray)
        np.testing.assert_array_equal(sample["image_uint8"], image)  # RGB, not BGR
        np.testing.assert_array_equal(sample["label"][0].numpy(), label)
        want = (torch.from_numpy(image).permute(2, 0, 1)[None].float() - mean) / std
        torch.testing.assert_close(sample["image"], want)


# --------------------------------------------------------------------------- training


def _batches(stream: TrainStream, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    while len(out) < n:
        out.extend(islice(iter(stream), n - len(out)))
    return out


def test_train_same_batch_count_on_every_rank(split):
    folder, _ = split
    for rank in range(3):
        stream = TrainStream(
            folder,
            batch_size=2,
            crop_size=16,
            rank=rank,
            world_size=3,
            num_workers=0,
            shuffle_buffer=4,
        )
        assert len(stream) == 13 // (2 * 3)  # default: one pass over the split per epoch
        for _ in range(2):  # two epochs
            batches = list(stream)
            assert len(batches) == 2
            for images, labels in batches:
                assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
                assert labels.shape == (2, 16, 16) and labels.dtype == torch.int64
                assert set(labels.unique().tolist()) <= {*range(NUM_CLASSES), 255}
        assert stream.epoch == 2 and stream.step == 0
    ranks = [
        list(
            TrainStream(
                folder,
                batch_size=2,
                crop_size=16,
                rank=r,
                world_size=3,
                batches_per_epoch=3,
                num_workers=2,
                shuffle_buffer=4,
            )
        )
        for r in range(3)
    ]
    assert [len(b) for b in ranks] == [3, 3, 3]
    assert not torch.equal(ranks[0][0][0], ranks[1][0][0])  # ranks draw different data


def test_train_seeded_and_epochs_differ(split):
    folder, _ = split
    kw = dict(batch_size=2, crop_size=16, batches_per_epoch=2, num_workers=0, shuffle_buffer=4)
    a = _batches(TrainStream(folder, seed=1, **kw), 4)
    b = _batches(TrainStream(folder, seed=1, **kw), 4)
    c = _batches(TrainStream(folder, seed=2, **kw), 4)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], a[2][0])  # epoch 1 is not a replay of epoch 0


@pytest.mark.parametrize(("num_workers", "stop"), [(0, 3), (2, 3), (2, 1), (2, 5)])
def test_train_resume_is_exact(split, num_workers, stop):
    """Stop after ``stop`` batches of epoch 0 (5 = at its end), save, restore, continue."""
    folder, _ = split
    kw = dict(
        batch_size=2,
        crop_size=(12, 20),
        batches_per_epoch=5,
        num_workers=num_workers,
        shuffle_buffer=6,
        seed=7,
        jitter=True,
    )
    reference = _batches(TrainStream(folder, **kw), 8)  # epochs 0 and 1 (partly)
    first = TrainStream(folder, **kw)
    head = list(islice(iter(first), stop))
    state = first.state_dict()
    assert (state["epoch"], state["step"]) == ((0, stop) if stop < 5 else (1, 0))
    resumed = TrainStream(folder, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives JSON
    tail = _batches(resumed, 8 - stop)  # rest of epoch 0, then into epoch 1
    for x, y in zip(reference, head + tail, strict=True):
        assert x[0].numpy().tobytes() == y[0].numpy().tobytes()
        assert x[1].numpy().tobytes() == y[1].numpy().tobytes()
    assert resumed.epoch == 1 and resumed.step == 3


def test_streams_leave_the_global_rngs_alone(split):
    folder, _ = split
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    list(TrainStream(folder, batch_size=2, crop_size=16, batches_per_epoch=2, num_workers=2))
    list(EvalStream(folder, num_workers=0))
    assert torch.equal(torch.get_rng_state(), torch_state)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)


def test_train_resume_refuses_other_settings(split):
    folder, _ = split
    kw = dict(batch_size=2, crop_size=16, num_workers=0)
    state = TrainStream(folder, seed=0, **kw).state_dict()
    other = TrainStream(folder, seed=1, **kw)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    state["epoch"], state["step"] = 4, 1
    other.load_state_dict(state, strict=False)
    assert (other.epoch, other.step) == (4, 1)


def test_train_bad_arguments(split):
    folder, _ = split
    with pytest.raises(ValueError, match="rank 3 is outside"):
        TrainStream(folder, batch_size=2, crop_size=16, rank=3, world_size=3)
    with pytest.raises(ValueError, match="on_corrupt"):
        TrainStream(folder, batch_size=2, crop_size=16, on_corrupt="ignore")
    with pytest.raises(ValueError, match="crop size"):
        TrainStream(folder, batch_size=2, crop_size=0)


# --------------------------------------------------------------------------- corrupt shards


def _copy_split(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member


def _break_image(path: Path, key: str) -> None:
    """Rewrite a shard with ``key``'s image replaced by bytes that are not an image."""
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == f"{key}.png":
                data = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_eval_corrupt_shard_named_or_skipped(split, tmp_path):
    folder = _copy_split(split[0], tmp_path / "c")
    _truncate(folder / "toy-train-000000.tar")  # 5 samples; the first few survive
    with pytest.raises(ShardError, match=r"toy-train-000000\.tar"):
        list(EvalStream(folder))
    stream = EvalStream(folder, on_corrupt="skip", num_workers=2)
    keys = [s["key"] for s in stream]
    assert stream.skipped == 13 - len(keys) and stream.skipped >= 1
    assert all(not k.startswith("s00") for k in keys[-8:])  # the 8 other samples all arrive
    assert "toy-train-000000.tar" in stream.skip_log[0]


def test_undecodable_image_named_or_skipped(split, tmp_path):
    folder = _copy_split(split[0], tmp_path / "u")
    _break_image(folder / "toy-train-000001.tar", "s01_001")
    with pytest.raises(ShardError, match=r"toy-train-000001\.tar: sample s01_001: image"):
        list(EvalStream(folder))
    stream = EvalStream(folder, on_corrupt="skip")
    keys = [s["key"] for s in stream]
    assert stream.skipped == 1 and "s01_001" not in keys and len(keys) == 12


def test_train_undecodable_image_named_or_skipped(tmp_path):
    folder = tmp_path / "one"
    write_split(folder, [3])  # one shard: every shard draw meets the broken sample
    _break_image(folder / "toy-train-000000.tar", "s00_001")
    kw = dict(batch_size=2, crop_size=16, batches_per_epoch=3, shuffle_buffer=2)
    with pytest.raises(ShardError, match=r"toy-train-000000\.tar: sample s00_001: image"):
        list(TrainStream(folder, num_workers=0, **kw))
    train = TrainStream(folder, num_workers=2, on_corrupt="skip", **kw)
    assert len(list(train)) == 3
    # 6 good samples delivered from a stream where every third sample is broken
    assert train.skipped >= 2 and "s00_001" in train.skip_log[0]


def test_train_truncated_shard_raises_from_worker(split, tmp_path):
    folder = _copy_split(split[0], tmp_path / "t")
    for i in range(4):
        _truncate(folder / f"toy-train-{i:06d}.tar")
    with pytest.raises(ShardError, match=r"toy-train-00000\d\.tar"):
        list(TrainStream(folder, batch_size=2, crop_size=16, num_workers=2, shuffle_buffer=4))


@pytest.mark.parametrize("member", ["s02_000.png", "s02_000.label.png"])
def test_flipped_byte_names_the_shard(split, tmp_path, member):
    """One flipped bit inside a PNG member (its CRC catches it) fails naming shard and key."""
    folder = _copy_split(split[0], tmp_path / "f")
    _flip_byte(folder / "toy-train-000002.tar", member)
    with pytest.raises(ShardError, match=r"toy-train-000002\.tar: sample s02_000"):
        list(EvalStream(folder, num_workers=2))


def test_shard_missing_samples_is_detected(split, tmp_path):
    """A tar that ends early at a member boundary parses cleanly; the manifest catches it."""
    folder = _copy_split(split[0], tmp_path / "m")
    path = folder / "toy-train-000003.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members[:-3]:  # drop the last sample's three members
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"toy-train-000003\.tar: \d+ bytes, the manifest says"):
        list(EvalStream(folder))
    _rehash(folder)  # a manifest that agrees with the tar's bytes still lists the lost keys
    with pytest.raises(ShardError, match=r"toy-train-000003\.tar: truncated.*s03_003"):
        list(EvalStream(folder))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_label_check_runs_in_the_workers_and_names_the_sample(split, num_workers):
    from functools import partial

    from cdgcnet.losses import validate_labels

    folder, _ = split
    kw = dict(batch_size=2, crop_size=16, batches_per_epoch=2, num_workers=num_workers)
    # The trainer's check (launch.trainer.build_streams) with every class the set has: passes.
    ok = partial(validate_labels, num_classes=NUM_CLASSES, ignore_index=255)
    assert len(list(TrainStream(folder, label_check=ok, **kw))) == 2
    # One class fewer than the labels hold: refused in the worker, naming shard and key.
    few = partial(validate_labels, num_classes=1, ignore_index=255)
    with pytest.raises(ValueError, match=r"toy-train-00000\d\.tar: sample s\d\d_\d\d\d: target"):
        list(TrainStream(folder, label_check=few, **kw))


def _rehash(folder: Path) -> None:
    """Make the manifest's bytes and sha256 those of the shards as they are now."""
    m = json.loads((folder / "manifest.json").read_text())
    for s in m["shards"]:
        data = (folder / s["name"]).read_bytes()
        s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))


def _flip_byte(path: Path, member: str) -> None:
    """Flip one bit in the middle of a member's data (the tar's size stays the same)."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = bytearray(path.read_bytes())
    data[info.offset_data + info.size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_changed_shard_is_refused_by_its_hash_at_its_end(split, tmp_path):
    """A shard whose bytes no longer hash to the manifest's sha256 (same size, the member
    still decodes: a JSON byte) trains and evaluates only until its end, then ShardError; with
    on_corrupt="skip" the warning says its samples were used."""
    folder = _copy_split(split[0], tmp_path / "h")
    path = folder / "toy-train-000001.tar"
    _flip_byte(path, "s01_000.json")
    with pytest.raises(ShardError, match=r"toy-train-000001\.tar: sha256 \w+\.\.\. differs"):
        list(EvalStream(folder))
    stream = EvalStream(folder, on_corrupt="skip")
    assert len(list(stream)) == 13 and stream.skipped == 0
    assert "sha256" in stream.skip_log[0] and "3 of its samples were used" in stream.skip_log[0]
    kw = dict(batch_size=2, crop_size=16, batches_per_epoch=20, shuffle_buffer=2)
    with pytest.raises(ShardError, match=r"toy-train-000001\.tar: sha256"):
        list(TrainStream(folder, num_workers=0, **kw))


def test_unknown_members_are_refused_by_name_unread(split, tmp_path):
    folder = _copy_split(split[0], tmp_path / "x")
    path = folder / "toy-train-000002.tar"
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo("s02_000.extra")
        info.size = 1 << 20
        tar.addfile(info, io.BytesIO(b"\0" * info.size))
    _rehash(folder)
    with pytest.raises(
        ShardError, match=r"toy-train-000002\.tar: sample s02_000: member 's02_000\.extra' is not"
    ):
        list(EvalStream(folder))


def test_training_labels_outside_the_classes_name_shard_and_key(tmp_path):
    folder = tmp_path / "lab"
    write_split(folder, [2])
    path = folder / "toy-train-000000.tar"
    label = np.full((24, 32), 7, np.uint8)  # class 7 of 5
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name == "s00_001.label.png":
                data = cv2.imencode(".png", label)[1].tobytes()
                m.size = len(data)
            members.append((m, data))
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    _rehash(folder)
    kw = dict(batch_size=1, crop_size=16, batches_per_epoch=4, shuffle_buffer=1)
    with pytest.raises(
        ShardError, match=r"toy-train-000000\.tar: sample s00_001: label\.png holds ids \[7\]"
    ):
        list(TrainStream(folder, num_workers=0, **kw))
    train = TrainStream(folder, num_workers=0, on_corrupt="skip", **kw)
    assert len(list(train)) == 4 and train.skipped >= 1 and "s00_001" in train.skip_log[0]
