"""The GPU check of the whole project in one command that fits one short GPU lease.

    python3 -m lease --out DIR [--budget-s 560] [--wheels .whl] [--only STAGE ...]
        [--set KEY=VALUE ...] [--variant "KEY=VALUE ..." ...]    # trainer config overrides
    python3 -m lease --dry-run --out DIR       # CPU, tiny sizes, fp32 (a test runs it)
    python3 -m lease --build-wheels [DIR]      # what `make gpu-wheels` runs

From the repository root, with nothing installed (the bare GPU image: `python -m` puts the
checkout on the path).

Writes two files to DIR: lease.json (every result, rewritten after each step, so a kill at any
point leaves what was measured so far) and lease.log (everything the stages printed). The
stages run in this order, most valuable first, each in its own process group with its own
time limit inside the overall budget:

1. env         torch, CUDA, cuDNN, GPU, driver; which carried wheels were installed
2. gpu_tests   pytest -m gpu tests/cdgcnet (per-test timeout where pytest-timeout exists)
3. cdgc        the CDGC module alone, forward + backward under bf16 autocast, at the presets'
               feature grids (97x97 M=19, 65x65 M=21, 65x65 M=171; B=2, C=512) and, at the
               Cityscapes grid, the other precisions and readings: time, model FLOP/s against
               a bf16 matmul peak measured here, peak memory, top kernels, warnings (a Triton or
               grouped-kernel fallback says so); the two block-max kernels timed
4. trainer     launch/train.py through its command line: DeepSpeed ZeRO-2, bf16, CDGC
               checkpointing, ResNet-101 at the Cityscapes preset (769x769, 2 images, 19
               classes) on a generated Cityscapes-layout set packed on the spot, MLflow off;
               per-iteration times, peak memory, losses, a torch.profiler breakdown of 3
               steps, then a resume from the middle checkpoint whose losses are compared with
               the uninterrupted run, and the plain PyTorch step of the same network (the
               goals: trainer step <= 1.1x plain, peak memory <= plain + 1.5 GiB). `--set`
               overrides go to every run; each `--variant` is one configuration (its
               overrides on top of --set) measured this way, one after another on the
               generated data
5. train_step  CDGCNet, the same net without CDGC, and CDGCNet with its graph in float32 at the
               Cityscapes preset; images/s, peak memory, model FLOP/s
6. extras      (time permitting) the VOC and COCO-Stuff presets; inference whole / sliding
               window at 1024x2048

--dry-run runs the same stages on CPU at tiny sizes (ResNet-18, a few iterations, fp32) with
the same files and keys; its figures mean nothing. The bare GPU image lacks DeepSpeed and
WebDataset: they travel as wheels in an ignored folder (--build-wheels), and each wheel whose
package is missing or older here is installed with `pip install --no-index --no-deps
--target` into a temporary folder that goes on the stages' PYTHONPATH. Stages also run with
MLflow and Ray made unimportable, as on that image.

Exit status 1 when a stage failed or timed out (a failing CUDA test is a finding, counted in
gpu_tests, not a stage failure); 2 without a GPU unless --dry-run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lease.context import DRY, GPU, STAGES, Ctx, parse_trainer_overrides
from lease.stage_process import stage_main
from lease.supervisor import run_lease
from lease.trainer_run import trainer_child
from lease.wheels import WHEEL_DIR, build_wheels


def main(argv: Sequence[str] | None = None) -> int:
    """The lease, or the wheel build; hidden, the processes the lease starts: one stage's
    (`--stage NAME --work DIR --deadline T`, lease/stage_process.py) and one trainer run's
    (`--trainer-child RESULT FIRST:STEPS -- ARGV`, lease/trainer_run.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--trainer-child"]:
        sep = argv.index("--")
        return trainer_child(argv[1], argv[2], argv[sep + 1 :])
    ap = argparse.ArgumentParser(
        prog="python3 -m lease", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--out", help="where lease.json and lease.log go (on the GPU machine: $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, fp32")
    ap.add_argument("--budget-s", type=float, default=None, help="whole run (GPU 560, dry 600)")
    ap.add_argument("--only", nargs="+", choices=STAGES, help="run these stages only")
    ap.add_argument("--wheels", default=str(WHEEL_DIR), help="wheel folder (default .whl)")
    ap.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="launch/train.py override for every trainer run (repeatable)",
    )
    ap.add_argument("--variant", action="append", metavar='"KEY=VALUE ..."',
                    help="a trainer configuration: these overrides on top of --set "
                         "(repeatable: one after another on the same data)")  # fmt: skip
    ap.add_argument("--build-wheels", nargs="?", const=str(WHEEL_DIR), metavar="DIR",
                    help="build the wheels for the GPU image into DIR and stop")  # fmt: skip
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_wheels:
        return build_wheels(Path(args.build_wheels))
    if not args.out:
        ap.error("--out is required")
    sets, variants = parse_trainer_overrides(args.set, args.variant, ap.error)
    if args.stage:
        ctx = Ctx(Path(args.out), Path(args.work), DRY if args.dry_run else GPU, args.dry_run,
                  args.deadline, sets, variants)  # fmt: skip
        return stage_main(args.stage, ctx)
    return run_lease(args)


if __name__ == "__main__":
    raise SystemExit(main())
