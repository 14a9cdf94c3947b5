"""Train CDGCNet with DeepSpeed ZeRO.

    deepspeed launch/train.py --nodes 1 --config cityscapes
    deepspeed --hostfile launch/hostfile launch/train.py --nodes 4 --config cityscapes optim.lr=0.02
    torchrun --nproc-per-node 2 launch/train.py --nodes 1 --config scenes
    python launch/train.py --config scenes                 # one process, world size 1

In-process (the sweeps): `launch.train.run(cfg, on_eval=..., resume="auto") -> dict`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.alignment import AlignmentError
from launch.config import PRESETS, ConfigError, TrainConfig, check_pretrained, load_config
from launch.console import peer_failed, quiet_libraries, report_failure
from launch.determinism import set_deterministic
from launch.distributed import (
    NodeCountError,
    check_nodes,
    init_distributed,
    prepare_accelerator,
    world_from_env,
)
from launch.run_dir import complete_or_refuse, default_run_dir, named_by_user

if TYPE_CHECKING:
    from launch.hooks import Hook

EPILOG = f"""
config: a preset ({", ".join(PRESETS)}) or a .yaml/.json file (which may say `preset: NAME`
and change some fields). Overrides use dotted names, values are YAML:
  optim.lr=0.02  model.depth=50  data.batch_size=4  eval.scales=[0.75,1.0,1.25]
  runtime.zero_stage=3  runtime.precision=bf16  checkpoint.every=1000  logging.tags={{table: t1}}

nodes: the launched world must span exactly this many nodes, else the program stops before any
work and says how to give a hostfile (see launch/README.md).

run dir: --run-dir, else runs/<preset>-<length>-<key>, the key a hash of the config: the same
command finds its run again (an interrupted one resumes; a finished one is reported complete,
nothing is written) and another config gets another directory.

resume: auto (newest complete checkpoint of the run dir, else start fresh), none, or a checkpoint
directory. Resuming on another world size converts the checkpoint to DeepSpeed's universal form.

MLflow: runs go to the experiment logging.experiment, by default the preset's name (`scenes`
runs do not land among the `cityscapes` ones).

Ctrl-C (or SIGTERM) stops every rank; the program says at which iteration and which checkpoint
a rerun of the same command resumes from, and exits with status 130.
"""

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _raw_layout(root: Path, dataset: str) -> str | None:
    """The dataset whose original layout `root` holds (a raw, unpacked dataset), else None.

    The config's own dataset is tried first, so `scenes` is named for a raw scenes folder although
    it shares the Cityscapes layout.
    """
    from pipeline.datasets import DATASETS
    from pipeline.sources import SourceError

    for name in sorted(DATASETS, key=lambda n: n != dataset):
        source = DATASETS[name].source
        for split in source.known_splits:
            try:
                if source.list_split(root, split):
                    return name
            except (SourceError, OSError, ValueError):
                continue
    return None


def check_data_root(cfg: TrainConfig) -> None:
    """ConfigError (one line) unless data.root holds packed train and val splits.

    Says whether the folder is missing, holds a raw dataset or is otherwise unpacked, and gives
    the pipeline.pack command to run. Cheap: only manifests are looked at on the normal path.
    """
    from pipeline.datasets import DATASETS
    from pipeline.manifest import MANIFEST_NAME

    root = Path(cfg.data.root)
    splits = (cfg.data.train_split, cfg.data.val_split)
    missing = [s for s in splits if not (root / s / MANIFEST_NAME).is_file()]
    if not missing:
        return
    packer = cfg.dataset
    if not root.exists():
        state = "does not exist"
        src = f"/data/{packer}"
    elif (raw := _raw_layout(root, cfg.dataset)) is not None:
        state = f"holds a raw {raw} dataset, not packed shards"
        packer, src = raw, str(root)
        root = Path("shards") / raw
    else:
        state = f"is not packed (no {'/'.join(missing)}/{MANIFEST_NAME})"
        src = f"/data/{packer}"
    command = shlex.join(
        ["python", "-m", "pipeline.pack", packer, "--src", src, "--out", str(root)]
    )
    verb = "pack it"
    if state == "does not exist" and DATASETS[cfg.dataset].recipe is None:  # generated data
        verb, src = "generate and pack it", f"data/{packer}"
        synth = shlex.join(["python", "-m", "pipeline.synth", packer, "--out", src])
        pack = shlex.join(
            ["python", "-m", "pipeline.pack", packer, "--src", src, "--out", str(root)]
        )
        command = f"{synth} && {pack}"
    raise ConfigError(
        f"data.root={cfg.data.root}: {state}; {verb} with `{command}` and pass data.root={root}"
    )


def check_resume(cfg: TrainConfig, resume: str) -> None:
    """ConfigError (one line) when --resume names a path that is not a checkpoint."""
    if resume in ("auto", "none"):
        return
    from launch.checkpoint import CheckpointError, CheckpointManager

    if not Path(resume).exists():
        raise ConfigError(f"--resume {resume}: no such file or directory")
    try:
        CheckpointManager(cfg.runtime.run_dir, cfg.checkpoint.keep).resolve(resume)
    except CheckpointError as e:
        raise ConfigError(f"--resume {resume}: {e}") from None


def preflight(cfg: TrainConfig, world_size: int, resume: str) -> None:
    """Everything that can be refused before DeepSpeed starts, each as one ConfigError."""
    from launch.ds_config import accumulation_steps, check_zero_stage
    from launch.resources import check_eval_scales

    check_data_root(cfg)
    check_eval_scales(cfg)
    check_resume(cfg, resume)
    accumulation_steps(cfg, world_size)  # the global batch must divide over this world
    check_zero_stage(cfg, world_size)


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
    check_pretrained(cfg)
    world = world_from_env()
    check_nodes(nodes, world)
    preflight(cfg, world.world_size, resume)
    from launch.run_lock import RunDirClaim

    with RunDirClaim(cfg.runtime.run_dir, world) as claim:  # one writer per run dir
        prepare_accelerator()
        set_deterministic(cfg.runtime.deterministic)  # before any cuBLAS handle exists
        quiet_libraries()
        init_distributed(world, cpu_shm_comm=cfg.runtime.cpu_shm_comm)
        claim.confirm()
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
    p.add_argument(
        "--run-dir", default=None, help="run directory (default runs/<preset>-<length>-<key>)"
    )
    p.add_argument("--resume", default="auto", help="auto | none | PATH (default auto)")
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # passed by the deepspeed launcher; env has it too
    return p.parse_intermixed_args(argv)


def cli_config(args: argparse.Namespace) -> TrainConfig:
    """The config of a command line: --config, overrides, --run-dir (else a directory named
    after the config, launch.run_dir); MLflow experiment by default the preset's name (the
    dataset's name would mix `scenes` into `cityscapes`)."""
    cfg = load_config(args.config, args.overrides)
    if args.run_dir is not None:  # through the dataclass, so that the path is checked too
        cfg.runtime = dataclasses.replace(cfg.runtime, run_dir=args.run_dir)
    elif not named_by_user(cfg, args.run_dir, args.overrides):  # a directory of its own
        cfg.runtime = dataclasses.replace(cfg.runtime, run_dir=default_run_dir(cfg))
    if cfg.logging.experiment is None:
        cfg.logging.experiment = cfg.name
    return cfg


class Interruption:
    """A signal handler for SIGINT and SIGTERM: remembers the first, ignores the rest (the
    deepspeed launcher follows Ctrl-C with SIGTERM to every rank) and raises KeyboardInterrupt
    once, so that the trainer ends its MLflow run and engine on the way out."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)

    def __call__(self, signum: int, frame: object) -> None:
        # Later signals return here. (Switching to SIG_IGN instead would make Python raise
        # "Signal 15 ignored due to race condition" for one already pending.)
        if self.signum is not None:
            return
        self.signum = signum
        raise KeyboardInterrupt


def interrupted_message(cfg: TrainConfig) -> str:
    """One line: the last finished iteration, the checkpoint a rerun resumes from."""
    from launch.checkpoint import newest_intact
    from launch.train_log import read_jsonl

    run_dir = Path(cfg.runtime.run_dir)
    iteration = 0
    log = run_dir / "metrics.jsonl"
    with contextlib.suppress(OSError, IndexError):
        iteration = read_jsonl(log)[0][-1]["iteration"]
    try:
        # Read on this rank alone: after an interruption the process group may be gone.
        newest = newest_intact(run_dir / "checkpoints")
    except Exception:  # a damaged checkpoint must not hide the message
        newest = None
    where = (
        f"newest complete checkpoint {newest.tag}"
        if newest is not None
        else "no complete checkpoint yet (a rerun starts from iteration 0)"
    )
    return (
        f"interrupted at iteration {iteration}; {where}; rerun the same command to resume "
        f"(run dir {run_dir})"
    )


def main(argv: Sequence[str] | None = None, hooks: Sequence[Hook] = ()) -> int:
    """The command line; `hooks` (launch.hooks.Hook) join the run as in `run` (the GPU lease
    adds its profiler this way)."""
    args = parse_args(argv)
    world = world_from_env()
    try:
        check_nodes(args.nodes, world)  # before any work, even config loading
    except NodeCountError as e:
        if world.local_rank == 0:  # the same on every rank: once per node's console
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    try:
        cfg = cli_config(args)
        named = cfg.runtime.run_dir != default_run_dir(cfg)
        complete = complete_or_refuse(cfg, args.resume, named)  # touches nothing
        if complete is not None:
            if world.is_main:
                print(complete, flush=True)
            return 0
        check_pretrained(cfg)  # before any process group, data or model
        preflight(cfg, world.world_size, args.resume)
    except ConfigError as e:
        if world.is_main:  # the same refusal on every rank: say it once
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    interruption = Interruption()
    interruption.install()
    try:
        result = run(cfg, resume=args.resume, nodes=args.nodes, hooks=hooks)
    except AlignmentError as e:  # every rank's engine is laid out alike: say it once
        if world.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except BaseException as e:
        # Loader workers are stopped with us (the deepspeed launcher signals the whole process
        # tree): their deaths must not raise again at exit (torch's SIGCHLD handler would).
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        from launch.refusal import exit_code

        code = exit_code(e, world)  # a refusal: one line from one rank, exit 2
        if code is not None:
            return code
        # After Ctrl-C, whatever a rank meets on the way out (a peer's closed socket, a killed
        # loader worker) is part of the interruption, not a new error.
        if interruption.signum is None and not isinstance(e, KeyboardInterrupt):
            report_failure(e, cfg.runtime.run_dir, world.rank, world.world_size)
            return EXIT_FAILED
        if peer_failed():  # stopped by the launcher because another rank failed: it said so
            return EXIT_FAILED
        if world.is_main:
            print(interrupted_message(cfg), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if world.is_main:
        print(f"val mIoU: {result['miou']:.4f} (iteration {result['iteration']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
