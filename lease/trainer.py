"""Stage trainer: launch/train.py through its command line, as a user runs it, at the Cityscapes
preset (DeepSpeed ZeRO-2, CDGC checkpointing, MLflow off, no pretrained weights) on a generated
set, for each configuration (`--set` and each `--variant`): the run, profiled for a few steps;
a resume from its middle checkpoint whose losses must repeat the run's; the plain PyTorch step
of the same network; and the goals row, the run against the plain step (issue 18).

The first configuration writes `stages.trainer.run`, `resume`, `profile`, `plain`; the others
`stages.trainer.variants[i]`; `stages.trainer.goals` has a row for each."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import torch

import cdgcnet.config
from cdgcnet.model import build_model
from launch.config import load_config
from launch.ds_config import resolve_precision
from lease.context import Ctx
from lease.data import make_dataset
from lease.measure import device
from lease.results import LOG, load_results, record
from lease.train_step import measure_case
from lease.trainer_run import checkpoints, loss_summary, run_trainer, step_summary

# No ImageNet file on the machine: random init, said so in the record.
FROM_SCRATCH = f"model.pretrained={cdgcnet.config.FROM_SCRATCH}"

TIME_GOAL = 1.1
"""Issue 18: the trainer's step takes at most this many times the plain step of the network."""
MEMORY_GOAL_MB = 1536.0
"""Issue 18: the trainer's peak device memory exceeds the plain step's by at most this (MiB)."""


def trainer_variants(ctx: Ctx) -> list[tuple[str, ...]]:
    """The overrides of each trainer configuration: --set and each --variant in turn, or --set
    alone without any --variant."""
    return [ctx.sets + v for v in ctx.variants] or [ctx.sets]


def trainer_overrides(ctx: Ctx, root: str) -> list[str]:
    """launch/train.py key=value overrides of every trainer run of the stage."""
    s = ctx.sizes
    half = s.iterations // 2
    return [
        f"data.root={root}",
        "data.global_batch_size=null",  # 2 images per step, no accumulation
        f"schedule.iterations={s.iterations}", "schedule.warmup_iters=0",
        f"checkpoint.every={half}", "checkpoint.keep=2",
        "eval.every=0", "eval.num_pictures=0",
        "model.checkpoint=true", "runtime.zero_stage=2",
        "logging.enabled=false", "runtime.progress=false",
        *s.trainer_overrides,
        FROM_SCRATCH,
    ]  # fmt: skip


def stage_trainer(ctx: Ctx) -> None:
    """Each configuration (`trainer_variants`) in turn on one generated set: `run_variant`."""
    variants = trainer_variants(ctx)
    # A bad --set or --variant stops here, naming the key, before the data is made.
    configs = [
        load_config("cityscapes", [*trainer_overrides(ctx, "generated"), *v]) for v in variants
    ]
    data = make_dataset(ctx)
    record(ctx.out, "trainer", {"data": data})
    base = trainer_overrides(ctx, data["root"])
    goals, failed = [], []
    for i, (overrides, cfg) in enumerate(zip(variants, configs, strict=True)):
        write = _variant_writer(ctx, i)
        write({"set": list(overrides)})
        result = run_variant(ctx, f"v{i}", [*base, *overrides], cfg, write)
        goals.append({"set": list(overrides), **result})
        record(ctx.out, "trainer", {"goals": goals})
        if result["status"] != "ok":
            failed.append(f"{list(overrides)}: {result['status']}")
    if failed:
        raise RuntimeError(f"trainer runs failed: {'; '.join(failed)}; see {LOG}")


def _variant_writer(ctx: Ctx, index: int) -> Callable[[dict[str, Any]], None]:
    """Where one configuration's records go: stages.trainer itself for the first, else
    stages.trainer.variants[index - 1]."""
    if index == 0:
        return lambda part: record(ctx.out, "trainer", part)

    def write(part: dict[str, Any]) -> None:
        variants = load_results(ctx.out)["stages"]["trainer"].get("variants", [])
        variants += [{} for _ in range(index - len(variants))]
        variants[index - 1].update(part)
        record(ctx.out, "trainer", {"variants": variants})

    return write


def run_variant(
    ctx: Ctx, name: str, overrides: list[str], cfg: Any, write: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """One trainer configuration: the run (profiled), its resume from the middle checkpoint, the
    plain step of the same network; returns the goals row (see `versus_plain`)."""
    s = ctx.sizes
    half = s.iterations // 2
    first, steps = s.profile_at
    warmup = 3 if s.iterations > 6 else 1
    # Left out of the step times: the step after the save, the profiled steps and the one after
    # them (it includes the profile's summary).
    skip = {half + 1, *range(first, first + steps + 1)}

    def live(part: str) -> Callable[[list[dict]], None]:
        return lambda rows: write({part: {"status": "running", "iterations": rows}})

    run1 = ctx.work / f"{name}_run"
    shutil.rmtree(run1, ignore_errors=True)
    argv = ["--config", "cityscapes", *overrides, "--run-dir", str(run1), "--resume", "none"]
    write({"command": "launch/train.py " + " ".join(argv)})
    res = run_trainer(ctx, run1, argv, live("run"))
    profile = res.pop("profile", None)
    res["pretrained_override"] = FROM_SCRATCH
    res.update(step_summary(res["iterations"], skip, warmup))
    if res["iterations"]:
        res.update(loss_summary(res["iterations"]))
        res["images_per_s"] = (
            round(2e3 / res["step_ms_median"], 3) if res.get("step_ms_median") else None
        )
    res["checkpoints"] = checkpoints(run1)
    res["exported_model"] = (run1 / "model.pt").is_file()
    res["status"] = "ok" if res["exit_code"] == 0 else f"exit code {res['exit_code']}"
    write({"run": res, "profile": profile})
    if res["exit_code"] != 0:
        return {"status": f"run: {res['status']}"}

    # Resume from the halfway checkpoint in a new run directory; the second half must repeat
    # the first run's losses (exactly on CPU in fp32; to rounding on the GPU).
    run2 = ctx.work / f"{name}_resume"
    ckpt = run1 / "checkpoints" / f"iter_{half:08d}"
    argv = ["--config", "cityscapes", *overrides, "--run-dir", str(run2), "--resume", str(ckpt)]
    res2 = run_trainer(ctx, run2, argv, live("resume"))
    res2.pop("profile", None)  # resumed past the profiled steps
    first_losses = {r["iteration"]: r["loss"]["total"] for r in res["iterations"]}
    diffs = [
        abs(r["loss"]["total"] - first_losses[r["iteration"]])
        / max(abs(first_losses[r["iteration"]]), 1e-12)
        for r in res2["iterations"]
        if r["iteration"] in first_losses
    ]
    res2.update(
        resumed_from=ckpt.name,
        iterations_after_resume=[r["iteration"] for r in res2["iterations"]],
        loss_max_rel_diff_vs_run=max(diffs) if diffs else None,
        status="ok" if res2["exit_code"] == 0 else f"exit code {res2['exit_code']}",
    )
    write({"resume": res2})
    plain = measure_plain(ctx, cfg)
    write({"plain": plain})
    row = versus_plain(res, plain, profile)
    row["resume_loss_max_rel_diff"] = res2["loss_max_rel_diff_vs_run"]
    row["status"] = "ok" if res2["exit_code"] == 0 else f"resume: {res2['status']}"
    return row


def measure_plain(ctx: Ctx, cfg: Any) -> dict[str, Any]:
    """The plain PyTorch step of the trainer's network (its model config, crop, batch, input
    layout and precision) in this process: benchmarks/train_step.py's step, timed and measured
    as the train_step stage does."""
    dev = device()
    cuda = dev.type == "cuda"
    precision = resolve_precision(
        cfg.runtime.precision, dev.type, cuda and torch.cuda.is_bf16_supported()
    )
    p = dict(crop=cfg.data.crop_size, batch=cfg.data.batch_size, classes=cfg.model.num_classes,
             depth=cfg.model.depth)  # fmt: skip

    def build(on: torch.device) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(cfg.model).to(on).train()

    case = "cdgc" if cfg.runtime.channels_last else "cdgc_nchw"  # the input layout only
    row: dict[str, Any] = {"case": case, "precision": precision}
    if precision == "fp16":  # DeepSpeed's loss-scaled fp16 has no plain twin here
        return {**row, "status": "skipped: no plain fp16 step"}
    if ctx.left() < 15:
        return {**row, "status": "skipped: stage time used up"}
    row.update(measure_case(ctx, case, p, build=build, bf16=precision == "bf16"))
    return row


def versus_plain(run: dict[str, Any], plain: dict[str, Any], profile: Any) -> dict[str, Any]:
    """The goals row: the trainer's median step and training peak memory against the plain step
    of the same network (memory only on the GPU, where both are max_memory_allocated)."""
    t, p = run.get("step_ms_median"), plain.get("step_ms")
    mt, mp = run.get("train_peak_allocated_mb"), plain.get("peak_mem_mb")
    ratio = round(t / p, 3) if t and p else None
    cuda = plain.get("device") == "cuda"
    extra = round(mt - mp, 1) if mt is not None and mp is not None and cuda else None
    return {
        "trainer_step_ms": t,
        "plain_step_ms": p,
        "time_ratio": ratio,
        "time_goal": TIME_GOAL,
        "time_ok": None if ratio is None else ratio <= TIME_GOAL,
        "trainer_peak_mb": mt,
        "plain_peak_mb": mp if cuda else None,
        "memory_extra_mb": extra,
        "memory_goal_extra_mb": MEMORY_GOAL_MB,
        "memory_ok": None if extra is None else extra <= MEMORY_GOAL_MB,
        "gpu_busy_fraction": (profile or {}).get("gpu_busy_fraction"),
    }
