"""The embedded default (`make demo`): no GPU, no dataset needed.

1. generate the synthetic `scenes` set (Cityscapes layout) into data/scenes;
2. pack it into shards/scenes (skipped when verified shards are already there);
3. train CDGCNet (ResNet-18, the `scenes` preset) on CPU with 2 DeepSpeed processes, ZeRO-2;
4. evaluate, log to the local MLflow store, print `val mIoU: <value>` and how to open the UI.

    python -m launch.demo [--workdir DIR] [key=value ...]     # overrides go to the scenes preset
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def ensure_data(workdir: Path) -> Path:
    """data/scenes from pipeline.synth, unless a complete generated copy is there."""
    from pipeline.synth import INFO_FILE, generate

    data = workdir / "data" / "scenes"
    if (data / INFO_FILE).is_file():
        print(f"{data}: already generated, kept")
        return data
    t0 = time.perf_counter()
    generate("scenes", data, overwrite=data.exists(), workers=2, progress=True)
    print(f"{data}: generated in {time.perf_counter() - t0:.1f} s")
    return data


def ensure_shards(workdir: Path, data: Path) -> Path:
    """shards/scenes from pipeline.pack, unless both splits verify against their manifests."""
    from pipeline.verify import verify_split

    shards = workdir / "shards" / "scenes"
    try:
        reports = [verify_split(shards / split) for split in ("train", "val")]
        if all(not r.problems for r in reports):
            print(f"{shards}: verified shards present, kept")
            return shards
        print(
            f"{shards}: verification failed ({reports[0].problems + reports[1].problems}), "
            "packing again"
        )
    except Exception as e:  # missing or unreadable manifest: pack
        print(f"{shards}: {e}; packing")
    subprocess.run(pack_command(data, shards), check=True, cwd=workdir)
    return shards


def pack_command(data: Path, shards: Path) -> list[str]:
    """pipeline.pack for scenes (Cityscapes layout) in-process: a few hundred small images."""
    src, out = str(data), str(shards)
    return [sys.executable, "-m", "pipeline.pack", "cityscapes", "--src", src, "--out", out,
            "--name", "scenes", "--workers", "1"]  # fmt: skip


def train(workdir: Path, shards: Path, overrides: Sequence[str]) -> tuple[dict, float]:
    """Two DeepSpeed CPU processes (the deepspeed launcher) on the scenes preset."""
    run_dir = workdir / "runs" / "scenes"
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")  # one core per rank
    env["PYTHONUNBUFFERED"] = "1"
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [
        deepspeed,
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        str(REPO / "launch" / "train.py"),
        "--nodes",
        "1",
        "--config",
        "scenes",
        "--run-dir",
        str(run_dir),
        "--resume",
        "none",
        f"data.root={shards}",
        "runtime.zero_stage=2",
        "logging.experiment=scenes",  # keep demo runs apart from real Cityscapes runs
        *overrides,
    ]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=workdir, env=env)
    seconds = time.perf_counter() - t0
    lines = (run_dir / "eval.jsonl").read_text().splitlines()
    return json.loads(lines[-1]), seconds


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=".", help="where data/, shards/, runs/, mlflow.db go")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="scenes preset overrides")
    a = p.parse_args(argv)
    workdir = Path(a.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _step("1/3 synthetic dataset `scenes` (Cityscapes layout)")
    data = ensure_data(workdir)
    _step("2/3 WebDataset shards")
    shards = ensure_shards(workdir, data)
    _step("3/3 training: CDGCNet ResNet-18, 2 DeepSpeed CPU processes, ZeRO-2")
    metrics, seconds = train(workdir, shards, a.overrides)
    db = workdir / "mlflow.db"
    print(f"\ntraining + evaluation took {seconds / 60:.1f} min (launch included)")
    print(f"val mIoU: {metrics['miou']:.4f}")
    print(
        "MLflow UI: mlflow ui --backend-store-uri "
        f"sqlite:///{db if workdir != Path.cwd() else 'mlflow.db'} --host 127.0.0.1"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
