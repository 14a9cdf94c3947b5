"""Overhead of DeepSpeed ZeRO stages 1/2/3 on one CPU training step, against plain PyTorch.

    python benchmarks/deepspeed_stages.py [--worlds 1,2] [--iters N] [--json PATH] [--smoke]

Model: the cpu_small preset (ResNet-18, 64 channels, ASPP + CDGC, 19 classes), crop 129,
batch 2 per rank, fp32, CDGCLoss, SGD (momentum 0.9). One step = forward, loss, backward,
optimizer step. Variants, all in the same processes and taking turns step by step:
- plain: the model + torch.optim.SGD (world size 1), or DistributedDataParallel + SGD (> 1)
- zero1, zero2, zero3: deepspeed.initialize with that stage and the same client SGD
Each world size is one launch of `torchrun --standalone --nproc_per_node W` with
DS_ACCELERATOR=cpu and the gloo backend (DeepSpeed's shared-memory comm op is disabled, as in
launch/distributed.py); each rank uses --threads (default cores // W). A step is timed on rank 0 between
barriers. overhead_pct = (median step of the stage / median step of plain - 1) * 100.
--smoke: crop 65, one timed step (script check).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from benchmarks import common
from pipeline.atomic import write_json_atomic

VARIANTS = ("plain", "zero1", "zero2", "zero3")


def ds_config(stage: int, batch: int, world: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": False}
    return {
        "train_batch_size": batch * world,
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; plain PyTorch does not clip
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: builds every variant, times their steps in turn."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(args.threads or 1)
    import deepspeed
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()

    from cdgcnet.config import model_preset
    from cdgcnet.losses import CDGCLoss
    from cdgcnet.model import build_model

    cfg = model_preset("cpu_small")
    g = torch.Generator().manual_seed(100 + rank)
    images = torch.randn(args.batch, 3, args.crop, args.crop, generator=g)
    labels = common.blob_labels(args.batch, args.crop, args.crop, cfg.num_classes, 3, 200 + rank)
    labels[:, : args.crop // 16] = 255
    loss_fn = CDGCLoss()

    def sgd(params):
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4)

    steps = {}
    for name in args.variants:
        torch.manual_seed(0)
        model = build_model(cfg).train()
        if name == "plain":
            net = model
            if world > 1:
                net = torch.nn.parallel.DistributedDataParallel(model)
            opt = sgd(net.parameters())

            def step(net=net, opt=opt) -> None:
                opt.zero_grad(set_to_none=True)
                loss, _ = loss_fn(net(images, labels), labels)
                loss.backward()
                opt.step()
        else:
            stage = int(name[-1])
            engine, _, _, _ = deepspeed.initialize(
                model=model,
                optimizer=sgd(model.parameters()),
                config=ds_config(stage, args.batch, world),
            )

            def step(engine=engine) -> None:
                loss, _ = loss_fn(engine(images, labels), labels)
                engine.backward(loss)
                engine.step()

        steps[name] = step

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return (time.perf_counter() - t0) * 1e3

    for fn in steps.values():
        for _ in range(args.warmup):
            timed(fn)
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(args.iters):
        for name, fn in steps.items():
            times[name].append(timed(fn))
    if rank == 0:
        write_json_atomic(args.out, {"world": world, "threads": args.threads, "times": times})
    dist.barrier()
    dist.destroy_process_group()


def launch(world: int, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """One torchrun launch of `world` ranks; returns rank 0's times or an error."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            str(Path(__file__).resolve()),
            "--worker",
            f"--out={out}",
            f"--threads={threads}",
            f"--crop={args.crop}",
            f"--batch={args.batch}",
            f"--iters={args.iters}",
            f"--warmup={args.warmup}",
            f"--variants={','.join(args.variants)}",
        ]
        env = dict(
            os.environ,
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS=str(threads),
            PYTHONPATH=str(common.ROOT),
        )
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.timeout, env=env
            )
        except subprocess.TimeoutExpired:
            return {"error": f"world {world}: torchrun timed out after {args.timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            return {"error": f"world {world}: torchrun exited with {proc.returncode}: {tail}"}
        result = json.loads(out.read_text())
        result["launch_wall_s"] = round(wall, 1)
        return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worlds", default="1,2", help="comma-separated world sizes")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--crop", type=int, default=129)
    ap.add_argument("--batch", type=int, default=2, help="images per rank")
    ap.add_argument("--iters", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200.0, help="per launch, seconds")
    ap.add_argument("--smoke", action="store_true", help="crop 65, 1 timed step (script check)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help="per rank (cores // world)")
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or "plain" not in args.variants:
        raise SystemExit(
            f"benchmarks/deepspeed_stages.py: --variants must include plain and come from "
            f"{VARIANTS}, got {args.variants}"
        )
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.crop, args.iters, args.warmup = 65, 1, 1
    worlds = [int(w) for w in args.worlds.split(",") if w]
    cores = os.cpu_count() or 1
    import torch

    hw = common.hardware(torch.device("cpu"))
    print(f"hardware: {hw}")
    rows: list[dict[str, Any]] = []
    for world in worlds:
        threads = args.threads or max(cores // world, 1)
        res = launch(world, args, threads)
        if "error" in res:
            print(res["error"], file=sys.stderr)
            rows.append(dict(world=world, variant="all", status=res["error"]))
            continue
        plain = common.summary(res["times"]["plain"])["median_ms"]
        for name in args.variants:
            t = common.summary(res["times"][name])
            rows.append(
                dict(
                    world=world,
                    variant=name,
                    threads_per_rank=threads,
                    model="cpu_small",
                    crop=args.crop,
                    batch_per_rank=args.batch,
                    dtype="fp32",
                    step_ms=t["median_ms"],
                    step_ms_min=t["min_ms"],
                    step_ms_max=t["max_ms"],
                    iters=t["n"],
                    overhead_pct=round((t["median_ms"] / plain - 1) * 100, 1),
                    launch_wall_s=res["launch_wall_s"],
                    status="ok",
                )
            )
    cols = ["world", "variant", "threads_per_rank", "step_ms", "step_ms_min", "step_ms_max"]
    common.print_table(rows, [*cols, "overhead_pct", "status"], title="ZeRO stages on CPU")
    if args.json:
        common.write_results(args.json, "deepspeed_stages", argv, hw, rows)
    failed = [r for r in rows if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
