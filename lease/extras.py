"""Stage extras (time permitting): the training step of the train_step stage at the other
presets (VOC, and COCO-Stuff with 171 classes), CDGCNet against its baseline; then
benchmarks/inference.py, whole image and sliding window, when time is left."""

from __future__ import annotations

import json
from typing import Any

from benchmarks import inference
from lease.context import Ctx
from lease.measure import device, matmul_peak_tflops
from lease.results import record
from lease.train_step import measure_train_step


def stage_extras(ctx: Ctx) -> None:
    peak = matmul_peak_tflops(device(), ctx.sizes.matmul_n)
    record(ctx.out, "extras", {"matmul_peak": peak})
    done: list[dict[str, Any]] = []

    def write(rows: list[dict[str, Any]]) -> None:
        record(ctx.out, "extras", {"presets": done + rows})

    for preset in ctx.sizes.extra_presets:
        done += measure_train_step(ctx, preset, ("cdgc", "baseline"), peak, write)
    if ctx.left() < (10 if ctx.dry_run else 30):
        record(ctx.out, "extras", {"inference": {"status": "skipped: stage time used up"}})
        return
    path = ctx.work / "inference.json"
    inference.main([*ctx.sizes.inference_args, "--json", str(path)])
    data = json.loads(path.read_text())
    record(ctx.out, "extras", {"inference": {"status": "ok", "records": data["records"]}})
