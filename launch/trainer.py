"""The training loop around a DeepSpeed engine: poly LR, the non-finite policy, evaluation,
checkpoints with exact resume, MLflow metrics and the rank-0 progress bar.

Legend: B images per rank per micro-step, M classes, crop x crop training crops.

Exact resume on CPU rests on three things saved in the checkpoint's client state: the data
stream position (TrainStream.state_dict), the RNG states of every rank (python, numpy, torch,
CUDA), and the iteration (the LR is a pure function of it). Data loading runs inside
`torch.random.fork_rng` so that starting a DataLoader never moves the global torch RNG (which
the model's dynamic sampling and dropout draw from).
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from cdgcnet.losses import CDGCLoss, validate_labels
from cdgcnet.model import build_model, param_groups
from launch.checkpoint import (
    CheckpointInfo,
    CheckpointManager,
    load_engine,
    safe_load,
    to_universal,
)
from launch.config import TrainConfig, to_dict, to_yaml
from launch.distributed import WorldInfo, convert_sync_batchnorm, device_type
from launch.ds_config import accumulation_steps, build_ds_config
from pipeline.manifest import check_dataset

LOSS_TERMS = ("total", "coarse", "refined", "aux")

# DeepSpeed's ZeRO-2 calls a torch collective that torch marks deprecated, once per step.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


def poly_lr_factor(iteration: int, cfg: TrainConfig) -> float:
    """LR multiplier at 0-based `iteration`: linear warmup, then (1 - it/iterations) ** power."""
    s = cfg.schedule
    factor = (1.0 - iteration / s.iterations) ** s.power
    if iteration < s.warmup_iters:
        alpha = iteration / s.warmup_iters
        factor *= s.warmup_factor + (1.0 - s.warmup_factor) * alpha
    return factor


# ---------------------------------------------------------------- RNG states (weights_only-safe)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _all_gather(obj: object) -> list:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class LoaderWatch:
    """The share of each step spent waiting for the next batch, and one warning when the data
    loader holds training up: the median share over `window` steps (after the first `skip`,
    which include the workers' start) above `threshold`."""

    def __init__(
        self, num_workers: int, window: int = 50, threshold: float = 0.10, skip: int = 5
    ) -> None:
        self.num_workers = num_workers
        self.window, self.threshold, self.skip = window, threshold, skip
        self.shares: list[float] = []
        self.seen = 0
        self.warned = False

    def add(self, wait_s: float, step_s: float) -> str | None:
        """Record one step; return the warning the first time the loader is the bottleneck."""
        self.seen += 1
        if self.seen <= self.skip or self.warned:
            return None
        self.shares = [*self.shares[-(self.window - 1) :], wait_s / max(step_s, 1e-9)]
        if len(self.shares) < self.window:
            return None
        median = sorted(self.shares)[len(self.shares) // 2]
        if median <= self.threshold:
            return None
        self.warned = True
        return (
            f"the data loader holds training up: the median step waited {median:.0%} of its "
            f"time for the next batch over the last {self.window} steps; raise "
            f"data.num_workers (now {self.num_workers}) if the machine has idle CPU cores"
        )


class Trainer:
    """One run: build, (resume,) train, evaluate, checkpoint, export."""

    def __init__(
        self, cfg: TrainConfig, world: WorldInfo, on_eval: Callable[[int, dict], None] | None = None
    ):
        self.cfg = cfg
        self.world = world
        self.on_eval = on_eval
        self.device = (
            torch.device("cuda", world.local_rank)
            if device_type() == "cuda"
            else torch.device("cpu")
        )
        self.run_dir = Path(cfg.runtime.run_dir)
        self.ckpts = CheckpointManager(
            self.run_dir, cfg.checkpoint.keep, cfg.runtime.crash_in_save_at
        )
        self.spec = check_dataset(
            cfg.data.root, (cfg.data.train_split, cfg.data.val_split), cfg.dataset,
            cfg.model.num_classes,
        )  # fmt: skip
        self.tracker = None
        self.nonfinite_total = 0
        self.nonfinite_run = 0

    # ------------------------------------------------------------ set-up

    def _log(self, msg: str) -> None:
        if self.world.is_main:
            print(msg, flush=True)

    def _build_engine(self, load_universal: bool):
        import deepspeed

        cfg = self.cfg
        torch.manual_seed(cfg.runtime.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
        if self.world.world_size > 1 and cfg.runtime.sync_bn:
            model = convert_sync_batchnorm(model, self.device.type)
        model.to(self.device)
        groups = param_groups(model, cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.weight_decay)
        optimizer = torch.optim.SGD(
            groups,
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
            nesterov=cfg.optim.nesterov,
        )
        bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.ds_config = build_ds_config(
            cfg,
            self.world.world_size,
            self.device.type,
            bf16_supported=bf16,
            load_universal=load_universal,
        )
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config
        )
        self.accum = accumulation_steps(cfg, self.world.world_size)
        return engine

    def _build_streams(self):
        from pipeline.reader import EvalStream, TrainStream

        cfg, w = self.cfg, self.world
        root = Path(cfg.data.root)
        train = TrainStream(
            root / cfg.data.train_split,
            batch_size=cfg.data.batch_size,
            crop_size=cfg.data.crop_size,
            rank=w.rank,
            world_size=w.world_size,
            num_workers=cfg.data.num_workers,
            seed=cfg.runtime.seed,
            scale_range=cfg.data.scale_range,
            flip=cfg.data.flip,
            jitter=cfg.data.jitter,
            on_corrupt=cfg.data.on_corrupt,
            pin_memory=self.device.type == "cuda",
        )
        val = EvalStream(
            root / cfg.data.val_split,
            rank=w.rank,
            world_size=w.world_size,
            on_corrupt=cfg.data.on_corrupt,
        )
        return train, val

    def _picture_samples(self) -> list[dict]:
        from pipeline.reader import EvalStream

        n = self.cfg.eval.num_pictures
        if n == 0 or not self.world.is_main or self.cfg.runtime.zero_stage == 3:
            return []  # ZeRO-3 forward is collective: no rank-0-only pictures
        out = []
        for sample in EvalStream(Path(self.cfg.data.root) / self.cfg.data.val_split):
            out.append(sample)
            if len(out) == n:
                break
        return out

    # ------------------------------------------------------------ resume

    def _resume(self, engine, ckpt: CheckpointInfo, train_stream) -> tuple[int, dict | None, dict]:
        """Load engine states; returns (iteration, this rank's RNG state or None, client)."""
        same_world = ckpt.world_size == self.world.world_size
        if same_world:
            _, client = load_engine(engine, ckpt.path.parent, ckpt.tag)
        else:
            self._log(
                f"resume: checkpoint {ckpt.path} was saved by {ckpt.world_size} rank(s), "
                f"this world has {self.world.world_size}: converting to universal form"
            )
            uni = to_universal(ckpt)
            _, client = load_engine(engine, uni, ckpt.tag)
            if not client or "stream" not in client:  # the universal form may drop it
                client = safe_load(ckpt.path / "mp_rank_00_model_states.pt")
        if client is None:
            raise RuntimeError(f"{ckpt.path}: DeepSpeed could not load this checkpoint")
        iteration = int(client["iteration"])
        rngs = client["rng"]
        if not self.cfg.runtime.resume_data:
            rng = rngs[self.world.rank] if same_world else None
            self._log("resume: runtime.resume_data=false, the data stream starts from scratch")
        elif same_world:
            train_stream.load_state_dict(client["stream"][self.world.rank])
            rng = rngs[self.world.rank]
        else:
            # Another world size sees other batches anyway: keep the position, not the order.
            train_stream.load_state_dict(client["stream"][0], strict=False)
            rng = None
        self.nonfinite_total = int(client.get("nonfinite_total", 0))
        self._log(f"resumed from {ckpt.path} at iteration {iteration}")
        return iteration, rng, client

    def _client_state(self, iteration: int, train_stream) -> dict:
        return {
            "iteration": iteration,
            "stream": _all_gather(train_stream.state_dict()),
            "rng": _all_gather(rng_state()),
            "config": to_dict(self.cfg),
            "world_size": self.world.world_size,
            "nonfinite_total": self.nonfinite_total,
            "mlflow_run_id": self.tracker.run_id if self.tracker else None,
        }

    def _save(self, engine, iteration: int, train_stream) -> None:
        client = self._client_state(iteration, train_stream)
        run_ids = _all_gather(client["mlflow_run_id"])
        client["mlflow_run_id"] = run_ids[0]
        meta = {"world_size": self.world.world_size, "zero_stage": self.cfg.runtime.zero_stage}
        path = self.ckpts.save(engine, iteration, client, meta)
        if self.world.is_main and self.tracker is not None:
            self.tracker.log_metrics({"checkpoint/iteration": iteration}, iteration)
        del path

    # ------------------------------------------------------------ evaluation

    def _evaluate(self, engine, val_stream, iteration: int, pictures: list[dict]) -> dict:
        from launch.evaluation import evaluate_run

        cm = evaluate_run(
            engine.module,
            val_stream,
            self.cfg,
            self.spec.num_classes,
            self.device,
            self.cfg.runtime.progress,
        )
        metrics = {
            "miou": float(cm.miou()),
            "pixel_accuracy": float(cm.pixel_accuracy()),
            "iou": [float(v) for v in cm.iou()],
            "iteration": iteration,
        }
        if self.world.is_main:
            self.tracker.log_evaluation(cm, self.spec.class_names, step=iteration)
            if pictures:
                self.tracker.log_pictures(engine.module, pictures, self.cfg, step=iteration)
            self._log(
                f"iteration {iteration}: val mIoU {metrics['miou']:.4f}, "
                f"pixel accuracy {metrics['pixel_accuracy']:.4f}"
            )
            with open(self.run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if self.on_eval is not None:
                self.on_eval(iteration, metrics)
        return metrics

    # ------------------------------------------------------------ the loop

    def _set_lr(self, engine, iteration: int) -> float:
        factor = poly_lr_factor(iteration, self.cfg)
        for g in engine.optimizer.param_groups:
            g["lr"] = self.cfg.optim.lr * g.get("lr_mult", 1.0) * factor
        return self.cfg.optim.lr * factor

    def _micro_step(self, engine, criterion, images, labels, iteration: int):
        """Forward, loss, the non-finite check (all ranks agree), backward + step if finite."""
        # On the host copy: the check costs no host-device sync (the loss skips its own).
        try:
            validate_labels(labels, self.spec.num_classes, self.spec.ignore_index)
        except ValueError as exc:
            split = Path(self.cfg.data.root) / self.cfg.data.train_split
            raise ValueError(f"{split}: training batch of iteration {iteration}: {exc}") from None
        images = images.to(self.device, non_blocking=True)  # (B, 3, crop, crop)
        if self.cfg.runtime.channels_last:  # every activation follows the input's layout
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)  # (B, crop, crop)
        outputs = {k: v.float() for k, v in engine(images, labels).items()}  # fp32 losses
        loss, terms = criterion(outputs, labels)
        if iteration in self.cfg.runtime.inject_nonfinite_at:
            loss = loss * float("nan")
            terms["total"] = loss.detach()
        # One all-reduce gives the logged means and the verdict (NaN/inf survive the sum).
        vec = torch.stack(
            [terms.get(k, torch.zeros((), device=self.device)).float() for k in LOSS_TERMS]
        )
        if torch.distributed.is_initialized() and self.world.world_size > 1:
            torch.distributed.all_reduce(vec)
            vec = vec / self.world.world_size
        finite = bool(torch.isfinite(vec).all())
        if finite:
            engine.backward(loss)
            engine.step()
        elif self.accum > 1:
            # Earlier micro-steps already hold gradients; DeepSpeed's overflow check drops the
            # whole accumulated step when this one's gradients are non-finite.
            engine.backward(loss)
            engine.step()
        present = {k for k in LOSS_TERMS if k in terms}
        return finite, {
            k: float(v) for k, v in zip(LOSS_TERMS, vec.tolist(), strict=True) if k in present
        }

    def fit(self, resume: str = "auto") -> dict:
        from launch.tracking import Tracker

        cfg, w = self.cfg, self.world
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self.ckpts.resolve(resume)
        _barrier()
        universal = ckpt is not None and ckpt.world_size != w.world_size
        engine = self._build_engine(load_universal=universal)
        train_stream, val_stream = self._build_streams()
        start, rng, client = 0, None, {}
        if ckpt is not None:
            start, rng, client = self._resume(engine, ckpt, train_stream)
        if rng is None:  # fresh run, or another world size: per-rank dropout/sampling seeds
            seed = cfg.runtime.seed * 1000 + w.rank + 7919 * start
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
        if w.is_main:
            print("resolved config:\n" + to_yaml(cfg), flush=True)
            _write_atomic(self.run_dir / "config.json", json.dumps(to_dict(cfg), indent=1))
            _write_atomic(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=1))
            self._trim_jsonl(start)
        self.tracker = Tracker(cfg, enabled=w.is_main)
        try:
            self.tracker.start(
                cfg.logging.run_name,
                ds_config=self.ds_config,
                resume_run_id=client.get("mlflow_run_id"),
            )
            if w.is_main:
                _write_atomic(self.run_dir / "launch.txt", self._launch_text())
                self.tracker.log_text(self._launch_text(), "launch.txt")
            result = self._loop(engine, train_stream, val_stream, start, rng)
        except BaseException:
            if self.tracker is not None:
                self.tracker.end("FAILED")
            raise
        finally:
            engine.destroy()  # the sweeps call run() many times in one process
        self.tracker.end("FINISHED")
        result["run_id"] = self.tracker.run_id
        return result

    def _trim_jsonl(self, start: int) -> None:
        """Drop records past the resumed iteration (a killed run may have logged further)."""
        for name in ("metrics.jsonl", "eval.jsonl"):
            f = self.run_dir / name
            if not f.exists():
                continue
            if start == 0:
                f.unlink()
                continue
            keep = [
                ln
                for ln in f.read_text().splitlines()
                if ln.strip() and json.loads(ln)["iteration"] <= start
            ]
            _write_atomic(f, "".join(ln + "\n" for ln in keep))

    def _launch_text(self) -> str:
        w = self.world
        return (
            f"world_size={w.world_size} nodes={w.nodes} local_world_size="
            f"{w.local_world_size} device={self.device.type} accumulation={self.accum}\n"
        )

    def _batches(self, train_stream) -> Iterator:
        """Endless batches; epochs roll over. Loading never touches the global torch RNG."""
        epoch = iter(train_stream)
        while True:
            with torch.random.fork_rng(devices=[]):
                try:
                    batch = next(epoch)
                except StopIteration:
                    epoch = iter(train_stream)
                    batch = next(epoch)
            yield batch

    def _loop(self, engine, train_stream, val_stream, start: int, rng: dict | None) -> dict:
        from tqdm import tqdm

        cfg, w = self.cfg, self.world
        total = cfg.schedule.iterations
        criterion = CDGCLoss(
            cfg.loss.alpha,
            cfg.loss.beta,
            cfg.loss.gamma,
            cfg.loss.ohem_thresh,
            cfg.loss.ohem_min_kept,
            self.spec.ignore_index,
            check_labels=False,  # _micro_step checks each batch on the host
        )
        with torch.random.fork_rng(devices=[]):
            pictures = self._picture_samples()
        batches = self._batches(train_stream)
        bar = tqdm(
            total=total,
            initial=start,
            desc="train",
            dynamic_ncols=True,
            disable=not (w.is_main and cfg.runtime.progress),
        )
        images_per_iter = cfg.data.batch_size * w.world_size * self.accum
        metrics: dict = {}
        engine.train()
        watch = LoaderWatch(cfg.data.num_workers)
        try:
            first = True
            for it in range(start + 1, total + 1):
                t0 = time.perf_counter()
                lr = self._set_lr(engine, it - 1)
                finite_all, sums, wait = True, {}, 0.0
                for _ in range(self.accum):
                    t_wait = time.perf_counter()
                    images, labels = next(batches)
                    wait += time.perf_counter() - t_wait
                    if first and rng is not None:
                        set_rng_state(rng)  # after the loader started: see module docstring
                    first = False
                    finite, terms = self._micro_step(engine, criterion, images, labels, it)
                    finite_all &= finite
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v / self.accum
                self._count_nonfinite(finite_all, it)
                dt = time.perf_counter() - t0
                self._record(it, lr, sums, finite_all, engine, images_per_iter / dt, wait / dt)
                warning = watch.add(wait, dt)
                if warning:
                    self._log(f"iteration {it}: {warning}")
                self._stop_if_nonfinite(it)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{sums.get('total', float('nan')):.4f}",
                    lr=f"{lr:.2e}",
                    img_s=f"{images_per_iter / dt:.1f}",
                )
                last = it == total
                if (cfg.checkpoint.every and it % cfg.checkpoint.every == 0) or last:
                    self._save(engine, it, train_stream)
                if (cfg.eval.every and it % cfg.eval.every == 0) or last:
                    with torch.random.fork_rng(devices=[]):  # eval loaders draw seeds too
                        metrics = self._evaluate(engine, val_stream, it, pictures)
                    engine.train()
                self._fault_switches(it)
        finally:
            bar.close()
        if not metrics:  # resumed at the end: evaluate the final weights
            metrics = self._evaluate(engine, val_stream, total, pictures)
        self._export(engine, metrics)
        return metrics

    def _count_nonfinite(self, finite: bool, it: int) -> None:
        if finite:
            self.nonfinite_run = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self._log(
            f"iteration {it}: non-finite loss, step skipped "
            f"({self.nonfinite_run} in a row, {self.nonfinite_total} in total)"
        )

    def _stop_if_nonfinite(self, it: int) -> None:
        if self.nonfinite_run >= self.cfg.runtime.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.nonfinite_run} non-finite losses in a row (iterations "
                f"{it - self.nonfinite_run + 1}..{it}); stopping (runtime.max_nonfinite="
                f"{self.cfg.runtime.max_nonfinite}). The last complete checkpoint in "
                f"{self.ckpts.root} holds finite weights."
            )

    def _record(self, it, lr, terms, finite, engine, images_per_s, data_wait) -> None:
        if not self.world.is_main:
            return
        record = {
            "iteration": it,
            "lr": lr,
            "finite": finite,
            "loss": terms,
            "nonfinite_total": self.nonfinite_total,
            "data_wait_fraction": round(data_wait, 4),
        }
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if it % self.cfg.logging.every and it != self.cfg.schedule.iterations and finite:
            return
        out = {f"train/loss/{k}": v for k, v in terms.items() if math.isfinite(v)}
        out.update(
            {
                "train/lr": lr,
                "train/images_per_s": images_per_s,
                "train/data_wait_fraction": data_wait,
                "train/nonfinite_skipped": self.nonfinite_total,
            }
        )
        norm = engine.get_global_grad_norm() if finite else None
        if norm is not None and math.isfinite(float(norm)):
            out["train/grad_norm"] = float(norm)
        if self.device.type == "cuda":
            out["train/memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            out["train/memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.tracker.log_metrics(out, it)

    def _fault_switches(self, it: int) -> None:
        rt = self.cfg.runtime
        if rt.kill_at == it:
            _barrier()
            os.kill(os.getpid(), signal.SIGKILL)
        if rt.fail_once_at == it:
            marker = self.run_dir / f"failed_once_at_{it}"
            already = marker.exists()
            _barrier()
            if not already:
                if self.world.is_main:
                    marker.write_text("runtime.fail_once_at fired here\n")
                _barrier()
                raise RuntimeError(f"injected failure at iteration {it} (runtime.fail_once_at)")

    def _export(self, engine, metrics: dict) -> None:
        """Consolidated fp32 weights -> <run_dir>/model.pt (save_exported, rank 0)."""
        from launch.export import save_exported

        if self.cfg.runtime.zero_stage == 3:
            from launch.checkpoint import fp32_state_dict

            latest = self.ckpts.root
            tag = max(p.name for p in latest.iterdir() if p.name.startswith("iter_"))
            state = fp32_state_dict(latest / tag) if self.world.is_main else None
        else:
            state = {
                k: v.float() if v.is_floating_point() else v
                for k, v in engine.module.state_dict().items()
            }
        if self.world.is_main:
            save_exported(
                state,
                to_dict(self.cfg),
                self.run_dir / "model.pt",
                meta={"iteration": metrics.get("iteration"), "miou": metrics.get("miou")},
            )
            self._log(f"exported fp32 model: {self.run_dir / 'model.pt'}")
        _barrier()
