"""The embedded default (`make demo`): no GPU, no dataset needed.

1. generate the synthetic `scenes` set (Cityscapes layout) into data/scenes;
2. pack it into shards/scenes (skipped when verified shards are already there);
3. train CDGCNet (ResNet-18, the `scenes` preset) on CPU with 2 DeepSpeed processes, ZeRO-2;
4. evaluate, log to the local MLflow store, print `val mIoU: <value>` and how to open the UI.

    python -m launch.demo [--workdir DIR] [key=value ...]     # overrides go to the scenes preset
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from launch.config import ConfigError

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
    if not any((shards / split / "manifest.json").exists() for split in ("train", "val")):
        print(f"{shards}: packing (first run)")
        subprocess.run(pack_command(data, shards), check=True, cwd=workdir)
        return shards
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


def demo_config(workdir: Path, shards: Path, overrides: Sequence[str]):
    """The demo's TrainConfig: the scenes preset on the generated shards; run dir `runs/scenes`,
    or, with overrides, a directory named after the config (launch.run_dir)."""
    from launch.config import load_config
    from launch.run_dir import default_run_dir

    base = [f"data.root={shards}", "runtime.zero_stage=2", "logging.experiment=scenes"]
    cfg = load_config("scenes", [*base, *overrides])
    run_dir = default_run_dir(cfg) if overrides else "runs/scenes"
    cfg.runtime.run_dir = str(workdir / run_dir)
    return cfg, [*base, *overrides]


def train(workdir: Path, shards: Path, overrides: Sequence[str]) -> tuple[dict, float | None]:
    """Two DeepSpeed CPU processes (the deepspeed launcher) on the scenes preset; a run that is
    already complete is reported, not trained again. (final metrics, minutes or None)."""
    from launch.run_dir import complete_or_refuse, finished_result

    cfg, settings = demo_config(workdir, shards, overrides)
    run_dir = Path(cfg.runtime.run_dir)
    complete = complete_or_refuse(cfg, "auto", named=True)
    if complete is not None:  # said the demo's way: it takes overrides, not --run-dir
        done = complete.split("; nothing to do")[0]
        print(f"{done}; not trained again (overrides train another run: "
              "python -m launch.demo KEY=VALUE ...)")  # fmt: skip
        return finished_result(run_dir), None
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")  # one core per rank
    env["PYTHONUNBUFFERED"] = "1"
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    # The launcher's own INFO lines (its command, world info, each process spawned and
    # exiting) and its single-node hostfile warning say nothing here: errors only.
    cmd = [deepspeed, "--log_level", "error", "--num_gpus", "2", "--master_port",
           str(_free_port()), str(REPO / "launch" / "train.py"), "--nodes", "1",
           "--config", "scenes", "--run-dir", str(run_dir), *settings]  # fmt: skip
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=workdir, env=env)
    seconds = time.perf_counter() - t0
    return finished_result(run_dir) or {}, seconds


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
    try:
        metrics, seconds = train(workdir, shards, a.overrides)
    except ConfigError as e:  # runs/scenes holds a finished run of another config
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:  # training said why, in its own lines
        return e.returncode if e.returncode > 0 else 128 - e.returncode
    except KeyboardInterrupt:  # training said where it stopped
        return 130
    db = workdir / "mlflow.db"
    if seconds is not None:
        print(f"\ntraining + evaluation took {seconds / 60:.1f} min (launch included)")
    print(f"val mIoU: {metrics['miou']:.4f}")
    print(
        "MLflow UI: mlflow ui --backend-store-uri "
        f"sqlite:///{db if workdir != Path.cwd() else 'mlflow.db'} --host 127.0.0.1"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
