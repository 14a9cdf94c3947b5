"""The training loop around a DeepSpeed engine: build, resume, then one `run_step` per iteration
with hooks around it (detectron2's `run_step`, torchtitan's train loop).

Legend: B images per rank per micro-step, M classes, crop x crop training crops.

One concern per component, each a hook (launch.hooks) called after the step in this order:
- launch.train_log.TrainLog: metrics.jsonl, MLflow, console, progress bar (and eval.jsonl)
- launch.nonfinite.NonFinitePolicy: skipped steps counted, too many in a row stop the run
- launch.resume.Checkpointing: checkpoints with the RNG and data-stream state for exact resume
- launch.evaluation.Evaluator: periodic evaluation and its pictures
then the caller's hooks (`Trainer(hooks=...)`, `launch.train.run(hooks=...)`). The fp32 export
(launch.export) follows the final evaluation.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cdgcnet.labels import LabelSpec
from cdgcnet.losses import CDGCLoss, validate_labels
from cdgcnet.model import build_model, param_groups
from launch.alignment import check_alignment
from launch.checkpoint import CheckpointManager, universal_reason
from launch.config import TrainConfig
from launch.console import peer_failed
from launch.distributed import WorldInfo, barrier, convert_sync_batchnorm, device_type
from launch.ds_config import ModelSize, accumulation_steps, build_ds_config
from launch.evaluation import Evaluator
from launch.export import export_trained
from launch.hooks import Hook, StepResult
from launch.nonfinite import NonFinitePolicy, mean_over_ranks
from launch.resume import Checkpointing, RunState
from launch.train_log import TrainLog
from pipeline.manifest import check_dataset

# DeepSpeed's ZeRO-2 calls a torch collective that torch marks deprecated, once per step.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def poly_lr_factor(iteration: int, cfg: TrainConfig) -> float:
    """LR multiplier at 0-based `iteration`: linear warmup, then (1 - it/iterations) ** power."""
    s = cfg.schedule
    factor = (1.0 - iteration / s.iterations) ** s.power
    if iteration < s.warmup_iters:
        alpha = iteration / s.warmup_iters
        factor *= s.warmup_factor + (1.0 - s.warmup_factor) * alpha
    return factor


def set_lr(optimizer, cfg: TrainConfig, iteration: int) -> float:
    """Give every param group its LR at 0-based `iteration`; returns the base LR."""
    factor = poly_lr_factor(iteration, cfg)
    for g in optimizer.param_groups:
        g["lr"] = cfg.optim.lr * g.get("lr_mult", 1.0) * factor
    return cfg.optim.lr * factor


def build_engine(cfg: TrainConfig, world: WorldInfo, device: torch.device, load_universal: bool):
    """The DeepSpeed engine of the run: (engine, DeepSpeed config, gradient accumulation)."""
    import deepspeed

    torch.manual_seed(cfg.runtime.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    if world.world_size > 1 and cfg.runtime.sync_bn:
        model = convert_sync_batchnorm(model, device.type)
    model.to(device)
    groups = param_groups(model, cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.weight_decay)
    optimizer = torch.optim.SGD(
        groups,
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        nesterov=cfg.optim.nesterov,
    )
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    ds_config = build_ds_config(
        cfg,
        world.world_size,
        device.type,
        ModelSize.of(model),
        bf16_supported=bf16,
        load_universal=load_universal,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    check_alignment(engine)  # before any kernel reads a parameter
    return engine, ds_config, accumulation_steps(cfg, world.world_size)


def build_streams(cfg: TrainConfig, world: WorldInfo, device: torch.device, spec: LabelSpec):
    """This rank's TrainStream and EvalStream. The loader workers check each training label,
    off the step's path (the losses run with check_labels=False: no host-device sync)."""
    from pipeline.reader import EvalStream, TrainStream

    root = Path(cfg.data.root)
    check = functools.partial(
        validate_labels, num_classes=spec.num_classes, ignore_index=spec.ignore_index
    )
    train = TrainStream(
        root / cfg.data.train_split,
        batch_size=cfg.data.batch_size,
        crop_size=cfg.data.crop_size,
        rank=world.rank,
        world_size=world.world_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.runtime.seed,
        scale_range=cfg.data.scale_range,
        flip=cfg.data.flip,
        jitter=cfg.data.jitter,
        on_corrupt=cfg.data.on_corrupt,
        pin_memory=device.type == "cuda",
        label_check=check,
    )
    val = EvalStream(
        root / cfg.data.val_split,
        rank=world.rank,
        world_size=world.world_size,
        on_corrupt=cfg.data.on_corrupt,
    )
    return train, val


class Trainer:
    """One run: build, (resume,) train, evaluate, checkpoint, export."""

    def __init__(
        self,
        cfg: TrainConfig,
        world: WorldInfo,
        on_eval: Callable[[int, dict], None] | None = None,
        hooks: Sequence[Hook] = (),
    ):
        self.cfg, self.world, self.on_eval = cfg, world, on_eval
        self.extra_hooks = list(hooks)
        self.device = (
            torch.device("cuda", world.local_rank)
            if device_type() == "cuda"
            else torch.device("cpu")
        )
        self.run_dir = Path(cfg.runtime.run_dir)
        self.ckpts = CheckpointManager(self.run_dir, cfg.checkpoint.keep)
        self.spec = check_dataset(
            cfg.data.root, (cfg.data.train_split, cfg.data.val_split), cfg.dataset,
            cfg.model.num_classes,
        )  # fmt: skip
        self.log = TrainLog(cfg, world, self.run_dir)

    def _launch_text(self) -> str:
        w = self.world
        return (
            f"world_size={w.world_size} nodes={w.nodes} local_world_size="
            f"{w.local_world_size} device={self.device.type} accumulation={self.accum}\n"
        )

    # ------------------------------------------------------------ the run

    def fit(self, resume: str = "auto") -> dict:
        cfg, w = self.cfg, self.world
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self.ckpts.resolve(resume)
        barrier()
        universal = ckpt is not None and universal_reason(ckpt, w.world_size) is not None
        self.engine, self.ds_config, self.accum = build_engine(cfg, w, self.device, universal)
        train_stream, val_stream = build_streams(cfg, w, self.device, self.spec)
        self.state = RunState(cfg, w, self.ckpts)
        client = self.state.restore(self.engine, train_stream, ckpt)
        self.nonfinite = NonFinitePolicy(
            cfg.runtime.max_nonfinite, w, self.ckpts.root, int(client.get("nonfinite_total", 0))
        )
        self.log.write_config(self.state.start, self.ds_config)
        try:
            self.log.start(self.ds_config, client.get("mlflow_run_id"), self._launch_text())
            result = self._train(train_stream, val_stream)
        except BaseException as e:
            # Ctrl-C or SIGTERM: KILLED, as MLflow names a run stopped from outside; a stop
            # caused by another rank's failure is that failure.
            stopped = isinstance(e, KeyboardInterrupt) and not peer_failed()
            self.log.tracker.end("KILLED" if stopped else "FAILED")
            raise
        finally:
            self.engine.destroy()  # the sweeps call run() many times in one process
        self.log.tracker.end("FINISHED")
        result["run_id"] = self.log.tracker.run_id
        return result

    def _train(self, train_stream, val_stream) -> dict:
        cfg = self.cfg
        loss = cfg.loss
        self.criterion = CDGCLoss(
            loss.alpha,
            loss.beta,
            loss.gamma,
            loss.ohem_thresh,
            loss.ohem_min_kept,
            self.spec.ignore_index,
            check_labels=False,  # the loader workers check each sample (build_streams)
        )
        evaluator = Evaluator(self, val_stream, self.on_eval)
        checkpointing = Checkpointing(
            self.state, self.engine, train_stream, self._client_extra, self.log.tracker
        )
        self.hooks = [self.log, self.nonfinite, checkpointing, evaluator, *self.extra_hooks]
        self.batches = self.state.batches(train_stream)
        for hook in self.hooks:
            hook.before_train(self)
        self.engine.train()
        try:
            for it in range(self.state.start + 1, cfg.schedule.iterations + 1):
                for hook in self.hooks:
                    hook.before_step(it)
                step = self.run_step(it)
                for hook in self.hooks:
                    hook.after_step(step)
        finally:
            for hook in self.hooks:
                hook.after_train()
        metrics = evaluator.final()
        export_trained(self.engine, cfg, self.ckpts.root, self.world, metrics)
        return metrics

    def _client_extra(self) -> dict:
        return {"nonfinite_total": self.nonfinite.total, "mlflow_run_id": self.log.tracker.run_id}

    # ------------------------------------------------------------ the step

    def run_step(self, it: int) -> StepResult:
        """Iteration `it` (from 1): `accum` micro-steps of forward, loss, one all-rank verdict on
        finiteness, backward and step. A non-finite step changes no weight."""
        t0 = time.perf_counter()
        lr = set_lr(self.engine.optimizer, self.cfg, it - 1)
        self._grad_norm_for(it)
        finite, losses, wait = True, {}, 0.0
        for _ in range(self.accum):
            t_wait = time.perf_counter()
            images, labels = next(self.batches)
            wait += time.perf_counter() - t_wait
            images = images.to(self.device, non_blocking=True)  # (B, 3, crop, crop)
            if self.cfg.runtime.channels_last:  # every activation follows the input's layout
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(self.device, non_blocking=True)  # (B, crop, crop)
            outputs = {k: v.float() for k, v in self.engine(images, labels).items()}  # fp32 losses
            loss, terms = self.criterion(outputs, labels)
            ok, means = mean_over_ranks(terms, self.world.world_size)
            # Skip a non-finite micro-step, unless earlier ones already hold gradients: then
            # DeepSpeed's overflow check drops the whole accumulated step.
            if ok or self.accum > 1:
                self.engine.backward(loss)
                self.engine.step()
            finite &= ok
            for k, v in means.items():
                losses[k] = losses.get(k, 0.0) + v / self.accum
        self.nonfinite.observe(finite, it)
        dt = time.perf_counter() - t0
        return StepResult(it, lr, losses, finite, seconds=dt, wait_seconds=wait)

    def _grad_norm_for(self, it: int) -> None:
        """ZeRO-1/2 compute the gradient norm (a kernel per parameter and a host-device sync)
        only where it is used: every step when clipping, else the steps whose norm MLflow logs.
        The norm is all-reduced: every rank decides alike, from the config alone."""
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "compute_grad_norm"):  # ZeRO-3 and no ZeRO have no switch
            needed = self.cfg.optim.grad_clip > 0 or self.log.logs_grad_norm(it)
            optimizer.compute_grad_norm = needed
