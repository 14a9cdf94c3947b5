"""Evaluate a trained CDGCNet on a packed split: per-class IoU table and mIoU, logged to MLflow.

    python launch/evaluate.py --config cityscapes --checkpoint runs/cityscapes/model.pt
    python launch/evaluate.py --config cityscapes --checkpoint runs/cityscapes --ms --flip --sliding
    torchrun --nproc-per-node 4 launch/evaluate.py --checkpoint runs/cityscapes/model.pt

--checkpoint: an exported model.pt, a run directory, its checkpoints/ folder or one DeepSpeed tag
folder (ZeRO partitions are consolidated to fp32). The model is always built from the
checkpoint's own config; --config (a preset or file, default: the checkpoint's config) and the
key=value overrides give the data split, evaluation settings and MLflow location.
--ms uses the scales (0.75, 1.0, 1.25, 1.5, 1.75, 2.0), --flip adds horizontal flips, --sliding
uses sliding-window inference with eval.crop / eval.stride.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from launch.config import ConfigError, apply_overrides, from_dict, load_config, to_dict
from launch.export import CheckpointError, load_checkpoint


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/evaluate.py",
        description="Evaluate a CDGCNet checkpoint: per-class IoU and mIoU (stdout and MLflow).",
    )
    add_model_args(p)
    p.add_argument("--split", help="split to evaluate (default data.val_split)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint, config and inference-mode arguments of evaluate.py and predict.py."""
    p.add_argument("--checkpoint", required=True, help="model.pt, run dir or DeepSpeed checkpoint")
    p.add_argument("--config", help="preset or .yaml/.json (default: the checkpoint's config)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--ms", action="store_true", help="multi-scale: 0.75 .. 2.0")
    p.add_argument("--flip", action="store_true", help="add horizontally flipped passes")
    p.add_argument("--sliding", action="store_true", help="sliding window (eval.crop/stride)")


def resolve_config(args: argparse.Namespace, ckpt_cfg: dict):
    """The run config: --config (or the checkpoint's) + overrides, with the checkpoint's model."""
    try:
        ckpt = from_dict(ckpt_cfg)
    except ConfigError as e:
        raise CheckpointError(f"{args.checkpoint}: its config is not valid: {e}") from e
    cfg = load_config(args.config, args.overrides) if args.config else ckpt
    if not args.config and args.overrides:
        cfg = apply_overrides(cfg, args.overrides)
    if to_dict(cfg.model) != to_dict(ckpt.model):
        print("note: the model is built from the checkpoint's config, not --config", flush=True)
    cfg.model = ckpt.model
    from cdgcnet.labels import LABEL_SPECS

    spec = LABEL_SPECS[cfg.dataset]
    if spec.num_classes != cfg.model.num_classes:
        raise ConfigError(
            f"dataset {cfg.dataset!r} has {spec.num_classes} classes but the checkpoint "
            f"{args.checkpoint} predicts {cfg.model.num_classes}"
        )
    if args.ms:
        from cdgcnet.inference import MS_SCALES

        cfg.eval.scales = tuple(MS_SCALES)
    cfg.eval.flip = cfg.eval.flip or args.flip
    if args.sliding:
        cfg.eval.mode = "slide"
    if args.split:
        cfg.data.val_split = args.split
    from launch.resources import check_eval_scales

    check_eval_scales(cfg)
    return cfg, spec


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from launch.distributed import world_from_env
    from launch.refusal import exit_code

    world = world_from_env()
    try:
        model, ckpt_cfg, iteration = load_checkpoint(args.checkpoint)
        cfg, spec = resolve_config(args, ckpt_cfg)
    except (CheckpointError, ConfigError) as e:
        return exit_code(e, world)  # one line, from rank 0
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if world.world_size > 1 and not dist.is_initialized():
        from launch.distributed import init_process_group

        init_process_group(world, "nccl" if device.type == "cuda" else "gloo")
    try:
        return _evaluate(args, cfg, spec, model.to(device), iteration, world, device)
    except BaseException as e:  # a refusal (a damaged shard, a full disk): one line, one rank
        code = exit_code(e, world)
        if code is None:
            raise
        return code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _evaluate(args, cfg, spec, model, iteration, world, device) -> int:
    from launch.evaluation import evaluate_run
    from launch.tracking import Tracker, iou_table_markdown
    from pipeline.reader import EvalStream

    split_dir = Path(cfg.data.root) / cfg.data.val_split
    try:
        stream = EvalStream(
            split_dir,
            rank=world.rank,
            world_size=world.world_size,
            num_workers=cfg.data.num_workers,
            on_corrupt=cfg.data.on_corrupt,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{split_dir}: cannot read the evaluation split: {e}") from None
    cm = evaluate_run(model, stream, cfg, spec.num_classes, device, not args.no_progress)
    if not world.is_main:
        return 0
    step = iteration or 0
    print(iou_table_markdown(cm, spec.class_names), end="", flush=True)  # ends with the mIoU
    metrics = {
        "miou": cm.miou(),
        "pixel_accuracy": cm.pixel_accuracy(),
        "iou": [float(v) for v in cm.iou()],
        "iteration": iteration,
        "checkpoint": str(args.checkpoint),
        "split": str(split_dir),
        "mode": cfg.eval.mode,
        "scales": list(cfg.eval.scales),
        "flip": cfg.eval.flip,
    }
    tracker = Tracker(cfg, enabled=not args.no_mlflow, kind="evaluation")
    with tracker:
        tracker.start(
            run_name=f"eval-{cfg.name}-{Path(args.checkpoint).name}",
            tags={"checkpoint": str(args.checkpoint), "checkpoint_iteration": str(step)},
        )
        tracker.log_evaluation(cm, spec.class_names, step=step)
        tracker.log_dict(metrics, "evaluation.json")
    if tracker.run_id:
        print(f"MLflow run {tracker.run_id} ({tracker.tracking_uri})", flush=True)
    if args.json:
        from pipeline.atomic import write_atomic

        write_atomic(args.json, (json.dumps(metrics, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
