"""Typed training configuration, the paper's presets, file loading and key=value overrides.

One TrainConfig describes a whole run. A preset is a function that states its values; a YAML or
JSON file may name a preset (`preset: cityscapes`) and change some fields; `key=value` overrides
on the command line use dotted names (`optim.lr=0.02`, `model.depth=50`, `eval.scales=[1.0,1.5]`).
Every field is checked in `__post_init__`, so a bad value fails where it is given.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdgcnet.config import FROM_SCRATCH, ModelConfig, model_preset
from cdgcnet.model import HEAD_LR_MULT
from launch import bounded, resources
from launch.bounded import BoundsError, clip, quote
from pipeline.datasets import DATASETS, DatasetSpec

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EVAL_MODES = ("whole", "slide")


class ConfigError(ValueError):
    """A bad config value, key or file; the message names which."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require_int(where: str, value: object, minimum: int) -> None:
    _require(
        _is_int(value) and value >= minimum,
        f"{where} must be an int >= {minimum}, got {quote(value)}",
    )


def _require_num(where: str, value: object) -> float:
    """A finite number >= 0, returned as a float."""
    return _require_range(where, value, 0.0)


def _require_range(
    where: str,
    value: object,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """A finite number in [lo, hi] (either end open or absent), returned as a float.

    inf and nan are refused everywhere: an infinite LR or loss weight trains nonsense, and an
    infinite evaluation scale only fails after the whole training.
    """
    interval = (
        ("(" if lo_open else "[")
        + ("-inf" if lo is None else f"{lo:g}")
        + ", "
        + ("inf" if hi is None else f"{hi:g}")
        + (")" if hi_open or hi is None else "]")
    )
    ok = _is_num(value) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    _require(ok, f"{where} must be a finite number in {interval}, got {quote(value)}")
    return float(value)


def _require_bound(where: str, value: object, problem) -> None:
    """An upper bound of launch.resources: problem(value) is None, else refused with its reason."""
    reason = problem(value)
    _require(reason is None, f"{where}={quote(value)} {reason}")


MIN_GRID = 4
"""Crops must give a feature grid of at least MIN_GRID x MIN_GRID at the output stride: the
ASPP's dilated 3x3 convs and the class graphs see nothing but padding below that."""


def _check_run_dir(run_dir: object) -> None:
    """runtime.run_dir must not resolve to a filesystem root, a top-level directory, the home
    directory, a system tree or the repository (launch.resources): checkpoint rotation and log
    trimming delete files under it."""
    _require(
        isinstance(run_dir, str) and run_dir.strip() != "",
        f"runtime.run_dir must be a path, got {quote(run_dir)}",
    )
    reason = resources.run_dir_problem(run_dir)
    resolved = os.path.realpath(os.path.expanduser(run_dir))
    _require(
        reason is None,
        f"runtime.run_dir={quote(run_dir)} ({resolved}) is {reason}; give a folder of its own "
        "(e.g. runs/NAME)",
    )


@dataclass
class DataConfig:
    """Where the shards are and how training batches are made."""

    root: str = "shards/cityscapes"
    """Shard set folder holding <split>/manifest.json."""
    train_split: str = "train"
    val_split: str = "val"
    crop_size: int = 769
    """Square training crop (pixels)."""
    batch_size: int = 2
    """Images per rank per micro-step."""
    global_batch_size: int | None = 8
    """Images per optimizer step over all ranks (the paper's batch); gradient accumulation makes
    up the difference. None: batch_size x world size (no accumulation)."""
    num_workers: int = 2
    """Decoding worker processes per rank."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    jitter: bool = False
    on_corrupt: str = "raise"
    """What the reader does with a corrupt sample: "raise" | "skip"."""

    def __post_init__(self) -> None:
        self.scale_range = tuple(float(s) for s in self.scale_range)  # type: ignore[assignment]
        _require_int("data.crop_size", self.crop_size, 8)
        _require_int("data.batch_size", self.batch_size, 1)
        _require_bound(
            f"data.batch_size={self.batch_size} with data.crop_size",
            self.crop_size,
            lambda crop: resources.training_memory_problem(self.batch_size, crop),
        )
        _require(
            self.global_batch_size is None
            or (_is_int(self.global_batch_size) and self.global_batch_size >= 1),
            f"data.global_batch_size must be null or an int >= 1, got {quote(self.global_batch_size)}",
        )
        if _is_int(self.global_batch_size):
            _require(
                self.global_batch_size % self.batch_size == 0,
                f"data.global_batch_size={self.global_batch_size} is not a multiple of "
                f"data.batch_size={self.batch_size}",
            )
        _require_int("data.num_workers", self.num_workers, 0)
        _require_bound("data.num_workers", self.num_workers, resources.workers_problem)
        _require(
            len(self.scale_range) == 2,
            f"data.scale_range must be (lo, hi), got {quote(self.scale_range)}",
        )
        lo, hi = self.scale_range
        _require_range("data.scale_range[0]", lo, 0.0, lo_open=True)
        _require_range("data.scale_range[1]", hi, lo)
        _require(
            self.on_corrupt in ("raise", "skip"),
            f"data.on_corrupt must be 'raise' or 'skip', got {quote(self.on_corrupt)}",
        )


@dataclass
class OptimConfig:
    """SGD with momentum; the heads may learn faster than the backbone."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_lr_mult: float = HEAD_LR_MULT
    """LR multiplier of the heads (ASPP, CDGC, classifiers) over the backbone."""
    nesterov: bool = False
    grad_clip: float = 0.0
    """Max gradient norm; 0 disables clipping (written explicitly into the DeepSpeed config)."""

    def __post_init__(self) -> None:
        self.lr = _require_range("optim.lr", self.lr, 0.0, lo_open=True)
        self.momentum = _require_range("optim.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        self.weight_decay = _require_num("optim.weight_decay", self.weight_decay)
        self.head_lr_mult = _require_range(
            "optim.head_lr_mult", self.head_lr_mult, 0.0, lo_open=True
        )
        self.grad_clip = _require_num("optim.grad_clip", self.grad_clip)


@dataclass
class LossConfig:
    """Eq. (5): alpha * CE(coarse) + beta * OHEM-CE(refined) + gamma * CE(aux)."""

    alpha: float = 0.6
    beta: float = 0.7
    gamma: float = 0.4
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            setattr(self, name, _require_num(f"loss.{name}", getattr(self, name)))
        _require(
            self.alpha + self.beta + self.gamma > 0,
            "loss.alpha, loss.beta and loss.gamma are all 0: nothing would be learned",
        )
        # OHEM keeps pixels whose true-class probability is below the threshold: above 1 it
        # keeps every pixel, at 0 none.
        self.ohem_thresh = _require_range(
            "loss.ohem_thresh", self.ohem_thresh, 0.0, 1.0, lo_open=True
        )
        _require_int("loss.ohem_min_kept", self.ohem_min_kept, 0)


@dataclass
class ScheduleConfig:
    """Iteration-based poly schedule: lr * (1 - it / iterations) ** power after a linear warmup."""

    iterations: int = 30_000
    power: float = 0.9
    warmup_iters: int = 0
    warmup_factor: float = 0.1
    """LR at iteration 0 of the warmup, as a fraction of the poly LR."""

    def __post_init__(self) -> None:
        _require_int("schedule.iterations", self.iterations, 1)
        self.power = _require_num("schedule.power", self.power)
        _require(
            _is_int(self.warmup_iters) and 0 <= self.warmup_iters < self.iterations,
            f"schedule.warmup_iters must be an int in [0, iterations), got {quote(self.warmup_iters)}",
        )
        self.warmup_factor = _require_range(
            "schedule.warmup_factor", self.warmup_factor, 0.0, 1.0, lo_open=True
        )


@dataclass
class EvalConfig:
    """Evaluation during and after training."""

    mode: str = "whole"
    """"whole" image or "slide" (sliding window of crop x crop with stride)."""
    crop: int = 769
    stride: int = 513
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    every: int = 5000
    """Evaluate every this many iterations (0: only at the end)."""
    num_pictures: int = 4
    """Validation images drawn as overlays / Fig. 4 / Fig. 6 pictures at each evaluation."""

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        _require(
            self.mode in EVAL_MODES,
            f"eval.mode must be one of {EVAL_MODES}, got {quote(self.mode)}",
        )
        _require_int("eval.crop", self.crop, 8)
        _require_int("eval.stride", self.stride, 1)
        _require(len(self.scales) > 0, "eval.scales must hold at least one scale")
        for i, s in enumerate(self.scales):
            _require_range(f"eval.scales[{i}]", s, 0.0, lo_open=True)
        _require_int("eval.every", self.every, 0)
        _require_int("eval.num_pictures", self.num_pictures, 0)


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints under <run_dir>/checkpoints/."""

    every: int = 2000
    """Save every this many iterations (0: only at the end)."""
    keep: int = 3
    """Keep the newest this many complete checkpoints."""

    def __post_init__(self) -> None:
        _require_int("checkpoint.every", self.every, 0)
        _require_int("checkpoint.keep", self.keep, 1)


@dataclass
class RuntimeConfig:
    """Where the run lives, precision, ZeRO stage and the non-finite loss limit."""

    run_dir: str = "runs/cityscapes"
    seed: int = 0
    precision: str = "auto"
    """"auto" (bf16 autocast on GPUs that have it, else fp16; fp32 on CPU) | fp32 | bf16 | fp16."""
    zero_stage: int = 2
    sync_bn: bool = True
    """SyncBatchNorm across ranks when the world has more than one rank."""
    channels_last: bool = True
    """Input batches in channels-last (NHWC) memory, which every convolution's output then
    follows (see benchmarks/README.md). The weights keep the default layout: DeepSpeed
    broadcasts and flattens them as contiguous buffers."""
    max_nonfinite: int = 5
    """Stop with an error after this many non-finite losses in a row (each one skips its step)."""
    cpu_shm_comm: bool = False
    """Use DeepSpeed's shared-memory CPU all-reduce op (JIT-compiled on first use, ~2.5 min)."""
    deterministic: bool = False
    """Deterministic cuDNN, cuBLAS and torch algorithms on the GPU, for resumes that repeat the
    losses as closely as torch allows (launch/determinism.py; CPU runs are exact either way)."""
    progress: bool = True
    """tqdm progress bar on rank 0."""

    def __post_init__(self) -> None:
        _check_run_dir(self.run_dir)
        _require(_is_int(self.seed), f"runtime.seed must be an int, got {quote(self.seed)}")
        _require(
            self.precision in PRECISIONS,
            f"runtime.precision must be one of {PRECISIONS}, got {quote(self.precision)}",
        )
        _require(
            self.zero_stage in (0, 1, 2, 3),
            f"runtime.zero_stage must be 0, 1, 2 or 3, got {quote(self.zero_stage)}",
        )
        _require_int("runtime.max_nonfinite", self.max_nonfinite, 1)


@dataclass
class LoggingConfig:
    """MLflow (rank 0 only) and the console."""

    tracking_uri: str | None = None
    """None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment: str | None = None
    """None: the dataset name."""
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    """Grouping tags (variant, table, ...)."""
    parent_run_id: str | None = None
    """Nest the MLflow run under this parent run."""
    every: int = 10
    """Log training metrics every this many iterations."""
    enabled: bool = True
    """False: no MLflow at all (losses still go to <run_dir>/metrics.jsonl)."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.tags, dict), f"logging.tags must be a mapping, got {quote(self.tags)}"
        )
        self.tags = {str(k): str(v) for k, v in self.tags.items()}
        _require_int("logging.every", self.every, 1)


@dataclass
class TrainConfig:
    """One training run."""

    name: str = "cityscapes"
    """Preset name the config started from."""
    dataset: str = "cityscapes"
    """Dataset name (pipeline.datasets.DATASETS): its labels, and what the shards' manifest must
    say (checked at start-up)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _require(
            self.dataset in DATASETS,
            f"dataset must be one of {sorted(DATASETS)}, got {quote(self.dataset)}",
        )
        self._check_crops()

    def _check_crops(self) -> None:
        """Training and sliding-window crops span at least MIN_GRID feature cells."""
        least = MIN_GRID * self.model.output_stride
        for key, crop in (("data.crop_size", self.data.crop_size), ("eval.crop", self.eval.crop)):
            _require(
                crop >= least,
                f"{key}={crop} gives a feature grid under {MIN_GRID}x{MIN_GRID} at "
                f"model.output_stride={self.model.output_stride}; use at least {least}",
            )


# ---------------------------------------------------------------- presets (paper section 4.2)


def _paper(spec: DatasetSpec) -> TrainConfig:
    """The published setting of a dataset: its recipe (pipeline.datasets) on the paper's model
    (ResNet-101, OS 8, ASPP + CDGC, checkpointed) with SGD momentum 0.9 and poly power 0.9."""
    r = spec.recipe
    return TrainConfig(
        name=spec.name,
        dataset=spec.name,
        model=model_preset(spec.name).replace(checkpoint=True),
        data=DataConfig(
            root=spec.shards,
            train_split=spec.train_split,
            val_split=spec.val_split,
            crop_size=r.crop_size,
            batch_size=r.batch_size,
            global_batch_size=r.global_batch_size,
        ),
        optim=OptimConfig(lr=r.lr, momentum=0.9, weight_decay=r.weight_decay),
        schedule=ScheduleConfig(iterations=r.iterations, power=0.9),
        eval=EvalConfig(
            mode=r.eval_mode, crop=r.crop_size, stride=r.eval_stride, every=r.eval_every
        ),
        runtime=RuntimeConfig(run_dir=f"runs/{spec.name}"),
    )


def _scenes() -> TrainConfig:
    """The embedded default: the synthetic `scenes` set, ResNet-18, CPU, 2 ranks (make demo)."""
    spec = DATASETS["scenes"]
    model = model_preset("cpu_small").replace(num_classes=spec.num_classes, dropout=0.0)
    return TrainConfig(
        name=spec.name,
        dataset=spec.name,
        model=model,
        data=DataConfig(
            root=spec.shards,
            train_split=spec.train_split,
            val_split=spec.val_split,
            crop_size=96,
            batch_size=4,
            global_batch_size=None,
            num_workers=1,
            scale_range=(0.75, 1.25),
        ),
        optim=OptimConfig(lr=0.02, momentum=0.9, weight_decay=1e-4, head_lr_mult=10.0),
        loss=LossConfig(ohem_min_kept=4096),
        schedule=ScheduleConfig(iterations=200, power=0.9, warmup_iters=10),
        eval=EvalConfig(mode="whole", crop=96, stride=64, every=0, num_pictures=2),
        checkpoint=CheckpointConfig(every=100, keep=2),
        runtime=RuntimeConfig(run_dir=f"runs/{spec.name}", zero_stage=2),
    )


def _context() -> TrainConfig:
    """The `scenes` preset on the generated `context` set (same-class context needed)."""
    spec = DATASETS["context"]
    cfg = _scenes()
    cfg.name = cfg.dataset = spec.name
    cfg.data.root = spec.shards
    cfg.runtime.run_dir = f"runs/{spec.name}"
    return cfg


# One preset per dataset with a published recipe, and the CPU demo sets.
PRESETS: dict[str, typing.Callable[[], TrainConfig]] = {
    **{
        name: functools.partial(_paper, spec)
        for name, spec in DATASETS.items()
        if spec.recipe is not None
    },
    "scenes": _scenes,
    "context": _context,
}


def preset(name: str) -> TrainConfig:
    """A fresh TrainConfig of one preset."""
    if name not in PRESETS:
        raise ConfigError(
            f"unknown preset {quote(name)}; choose one of {sorted(PRESETS)} or give a .yaml/.json file"
        )
    return PRESETS[name]()


PAPER_PRESETS = tuple(name for name, spec in DATASETS.items() if spec.recipe is not None)
"""Presets of a published setting (the paper's, and ADE20K's), which start from ImageNet weights
(paper section 4.2)."""


def check_pretrained(cfg: TrainConfig) -> None:
    """Before any training work: a paper preset needs model.pretrained (a file, or "none" to
    train from scratch on purpose); a named weight file must exist and, when it records its
    depth and stem (files written by `python -m cdgcnet.weights`), match the model's.
    One-line ConfigError."""
    pretrained = cfg.model.pretrained
    if pretrained is None and cfg.name in PAPER_PRESETS:
        raise ConfigError(
            f"preset {quote(cfg.name)} starts from ImageNet weights and model.pretrained is not set: "
            f"{_fetch_hint(cfg.model)}, or model.pretrained={FROM_SCRATCH} to train from scratch "
            "on purpose"
        )
    if pretrained in (None, FROM_SCRATCH):
        return
    if not Path(pretrained).is_file():
        raise ConfigError(
            f"model.pretrained={pretrained}: file not found; {_fetch_hint(cfg.model)}"
        )
    from cdgcnet.weights import mismatch

    reason = mismatch(pretrained, cfg.model.depth, cfg.model.deep_stem)
    if reason:
        raise ConfigError(f"model.pretrained={pretrained}: {reason}")


def _fetch_hint(model: ModelConfig) -> str:
    from cdgcnet.weights import recommended

    name = recommended(model.depth, model.deep_stem)
    if name is None:
        return (
            f"no known ImageNet file for ResNet-{model.depth}; convert one with "
            "`python -m cdgcnet.weights convert` and give model.pretrained=<file>"
        )
    return (
        f"run `python -m cdgcnet.weights fetch {name} --out weights` and add the "
        "model.pretrained=... override it prints"
    )


# ---------------------------------------------------------------- dict <-> config


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists), fit for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/JSON value to the field's type; ConfigError naming the key otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{key}: bad value {quote(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {quote(value)}")
    if tp is int:
        if _is_int(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {quote(value)}")
    if tp is float:
        if _is_num(value):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {quote(value)}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {quote(value)}")
    if origin is tuple:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {quote(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} items, got {quote(value)}")
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {quote(value)}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key} must be a mapping of {tp.__name__} fields, got {quote(value)}"
            )
        return _build(tp, value, key)
    return value


def _build(cls: type, d: dict, prefix: str, base: Any = None) -> Any:
    """Instantiate dataclass `cls` from dict `d` on top of `base` (or defaults)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {quote([where + str(k) for k in unknown[:6]])}; "
            f"{cls.__name__} has {sorted(names)}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        current = getattr(base, f.name) if base is not None else None
        if f.name in d:
            v = d[f.name]
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp) and isinstance(v, dict):
                kwargs[f.name] = _build(tp, v, key, base=current)
            else:
                kwargs[f.name] = _coerce(v, tp, key)
        elif base is not None:
            kwargs[f.name] = current
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {clip(str(e))}") from e


def _bounded(d: Any, where: str) -> dict:
    """d, once it is known to be a mapping of plain values within launch.bounded's limits (a
    config from a checkpoint may be a graph of shared references)."""
    try:
        bounded.check_tree(d)
    except BoundsError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {quote(d)}")
    return d


def from_dict(d: dict, base: TrainConfig | None = None) -> TrainConfig:
    """TrainConfig from a nested dict (fields absent from `d` come from `base` or the defaults)."""
    return _build(TrainConfig, _bounded(d, "config"), "", base=base)


def model_config(d: dict) -> ModelConfig:
    """ModelConfig from the "model" section of a config dict (YAML/JSON values coerced and
    checked as in a TrainConfig); the one dict -> ModelConfig path."""
    return _build(ModelConfig, _bounded(d, "model"), "model")


def flatten(cfg: TrainConfig) -> dict[str, str]:
    """Dotted key -> string value, for MLflow params."""
    out: dict[str, str] = {}

    def walk(v: Any, prefix: str) -> None:
        if isinstance(v, dict) and prefix.split(".")[-1] != "tags":
            for k, x in v.items():
                walk(x, f"{prefix}.{k}" if prefix else k)
        elif isinstance(v, dict):
            out[prefix] = json.dumps(v, sort_keys=True)
        elif isinstance(v, list):
            out[prefix] = json.dumps(v)
        else:
            out[prefix] = str(v)

    walk(to_dict(cfg), "")
    return out


# ---------------------------------------------------------------- loading and overrides


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {quote(key)}: {quote(p)} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """['optim.lr=0.02', 'model.depth=50'] -> nested dict with YAML-parsed values."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {quote(item)} is not of the form key=value (e.g. optim.lr=0.02)"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {quote(item)} has an empty key")
        try:
            value = bounded.load_yaml(raw) if raw.strip() != "" else ""
        except BoundsError as e:
            raise ConfigError(f"override {quote(item)}: {e}") from None
        _set_dotted(out, key, value)
    return out


def load_file(path: str | Path) -> TrainConfig:
    """A YAML or JSON config; `preset: NAME` in it starts from that preset, else from defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        d = bounded.load_file(path)
    except (BoundsError, OSError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    d = dict(d)
    base_name = d.pop("preset", None)
    try:
        base = preset(base_name) if base_name is not None else None
        return from_dict(d, base=base)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """A preset name or a .yaml/.yml/.json file, then dotted key=value overrides."""
    if name_or_path.endswith((".yaml", ".yml", ".json")) or Path(name_or_path).is_file():
        cfg = load_file(name_or_path)
    else:
        cfg = preset(name_or_path)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """A validated copy of cfg with key=value overrides applied."""
    return from_dict(parse_overrides(overrides), base=cfg)


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
