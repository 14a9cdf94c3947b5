"""Train CDGCNet with DeepSpeed ZeRO.

    deepspeed launch/train.py --nodes 1 --config cityscapes
    deepspeed --hostfile launch/hostfile launch/train.py --nodes 4 --config cityscapes optim.lr=0.02
    torchrun --nproc-per-node 2 launch/train.py --nodes 1 --config scenes
    python launch/train.py --config scenes                 # one process, world size 1

In-process (the sweeps): `launch.train.run(cfg, on_eval=..., resume="auto") -> dict`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script: make the repository importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.config import PRESETS, ConfigError, TrainConfig, load_config
from launch.distributed import (
    NodeCountError,
    check_nodes,
    init_distributed,
    prepare_accelerator,
    world_from_env,
)

if TYPE_CHECKING:
    from launch.hooks import Hook

EPILOG = f"""
config: a preset ({", ".join(PRESETS)}) or a .yaml/.json file (which may say `preset: NAME`
and change some fields). Overrides use dotted names, values are YAML:
  optim.lr=0.02  model.depth=50  data.batch_size=4  eval.scales=[0.75,1.0,1.25]
  runtime.zero_stage=3  runtime.precision=bf16  checkpoint.every=1000  logging.tags={{table: t1}}

nodes: the launched world must span exactly this many nodes, else the program stops before any
work and says how to give a hostfile (see launch/README.md).

resume: auto (newest complete checkpoint of --run-dir, else start fresh), none, or a checkpoint
directory. Resuming on another world size converts the checkpoint to DeepSpeed's universal form.
"""


def run(
    cfg: TrainConfig,
    *,
    on_eval: Callable[[int, dict], None] | None = None,
    resume: str = "auto",
    nodes: int | None = None,
    hooks: Sequence[Hook] = (),
) -> dict:
    """Train in this process (a launcher may have started several); returns the final metrics
    {"miou", "pixel_accuracy", "iou", "iteration", "run_id"}. on_eval(iteration, metrics) is
    called on rank 0 after each evaluation; hooks (launch.hooks.Hook) run after the trainer's
    own around every step."""
    world = world_from_env()
    check_nodes(nodes, world)
    prepare_accelerator()
    init_distributed(world, cpu_shm_comm=cfg.runtime.cpu_shm_comm)
    from launch.trainer import Trainer

    return Trainer(cfg, world, on_eval=on_eval, hooks=hooks).fit(resume=resume)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train CDGCNet with DeepSpeed ZeRO (one process per GPU, or CPU processes).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="preset name or .yaml/.json config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="number of nodes the launched job must span (checked before any work)",
    )
    p.add_argument("--run-dir", default=None, help="run directory (default runtime.run_dir)")
    p.add_argument("--resume", default="auto", help="auto | none | PATH (default auto)")
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # passed by the deepspeed launcher; env has it too
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    world = world_from_env()
    try:
        check_nodes(args.nodes, world)  # before any work, even config loading
    except NodeCountError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        if args.run_dir is not None:
            cfg.runtime.run_dir = args.run_dir
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    result = run(cfg, resume=args.resume, nodes=args.nodes)
    if world.is_main:
        print(f"val mIoU: {result['miou']:.4f} (iteration {result['iteration']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
