"""The data of the trainer stage: a generated Cityscapes-layout set (pipeline/synth.py) at the
lease's sizes, packed into WebDataset shards in this process, without Ray (not on the GPU
image), one image per shard so that every loader worker has shards to read."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from lease.context import Ctx
from pipeline.datasets import DATASETS
from pipeline.pack import pack_split
from pipeline.synth import generate


def make_dataset(ctx: Ctx) -> dict[str, Any]:
    """A generated Cityscapes-layout set, packed in this process (no Ray) into shards under
    ctx.work; returns its record for lease.json (`stages.trainer.data`)."""
    s = ctx.sizes
    src, shards = ctx.work / "cityscapes_src", ctx.work / "cityscapes_shards"
    t0 = time.perf_counter()
    workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    generate("cityscapes", src, train=s.synth_train, val=s.synth_val, size=s.synth_size,
             workers=workers)  # fmt: skip
    t1 = time.perf_counter()
    counts = {}
    for split in ("train", "val"):
        # one image per shard: every loader worker gets shards to read
        m = pack_split(DATASETS["cityscapes"], src, shards, split, max_count=1, progress=False,
                       use_ray=False)  # fmt: skip
        counts[split] = m["num_samples"]
    shutil.rmtree(src)
    return {
        "root": str(shards),
        "size": f"{s.synth_size[0]}x{s.synth_size[1]}",
        "samples": counts,
        "generate_s": round(t1 - t0, 1),
        "pack_s": round(time.perf_counter() - t1, 1),
    }
