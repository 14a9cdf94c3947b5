"""Typed model configuration and the paper's presets.

Every ablation variant of the paper is a ModelConfig:

| variant (paper tables 1-3)        | aspp  | context     | graph | fusion  |
|-----------------------------------|-------|-------------|-------|---------|
| dilated ResNet baseline           | False | "none"      |  -    |  -      |
| + ASPP                            | True  | "none"      |  -    |  -      |
| + plain-GCN                       | any   | "plain_gcn" |  -    | any     |
| + class-GCN (no dynamic sampling) | any   | "cdgc"      | "sim" | any     |
| + CDGC(concat / sum)              | False | "cdgc"      | "ds"  | concat/sum |
| ASPP + CDGC(concat / sum)         | True  | "cdgc"      | "ds"  | concat/sum |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cdgcnet.cdgc import GRAPHS, IMPLS, LEGACY_IMPLS, PARTS, QUERIES, check_ratio
from cdgcnet.cdgc import PRECISIONS as CDGC_PRECISIONS
from cdgcnet.heads import FUSIONS
from cdgcnet.labels import CITYSCAPES, LABEL_SPECS, LabelSpec

DEPTHS = (18, 34, 50, 101)
OUTPUT_STRIDES = (8, 16)
CONTEXTS = ("cdgc", "plain_gcn", "none")
FROM_SCRATCH = "none"
"""model.pretrained=none: no ImageNet weights, on purpose (logged as such)."""


@dataclass
class ModelConfig:
    """Architecture of CDGCNet; defaults are the paper's Cityscapes model."""

    num_classes: int = 19
    """Number of output classes M (train ids 0..M-1; 255 is ignore)."""
    depth: int = 101
    """ResNet depth: 18 | 34 | 50 | 101 (the paper uses 101)."""
    output_stride: int = 8
    """Backbone output stride: 8 (paper; stages 3 and 4 dilated) or 16 (stage 4 dilated)."""
    deep_stem: bool = False
    """ResNet-v1c stem: three 3x3 convs instead of one 7x7 conv."""
    pretrained: str | None = None
    """Local ImageNet weights for the backbone (.safetensors from `python -m cdgcnet.weights`, or
    a .pth in this backbone's key layout); "none": from scratch on purpose; None: not set (the
    paper presets refuse to train then, see launch/config.py)."""
    aspp: bool = True
    """Basic network = dilated ResNet + ASPP (True) or dilated ResNet alone (False)."""
    aspp_channels: int = 512
    """Channels of each of the five ASPP branches (the DeepLabV3 reference: the head width, 512);
    their concatenation is reduced to `channels` by the ASPP's 3x3 bottleneck conv."""
    context: str = "cdgc"
    """Context module after the coarse head: "cdgc" | "plain_gcn" | "none" (no refined head)."""
    graph: str = "ds"
    """CDGC graph construction in training: "sim" (coarse masks) | "ds" (dynamic sampling)."""
    ratio: float = 1.0
    """Bernoulli sampling ratio of the easy positives for graph="ds", in [0, 1]."""
    parts: tuple[str, ...] = PARTS
    """Node-set parts used by graph="ds" (paper Table 5): subset of easy, hard_pos, hard_neg."""
    queries: str = "all"
    """The reading of section 3.3: which nodes are the queries and keys of each class graph A_m.
    "all" (every node a query, keys V_m; every pixel gets M class contexts; default) |
    "members" (queries and keys V_m; Z_m is zero outside V_m, and with graph="ds" the refined
    head can read the ground truth from membership) | "masked" (X masked per class, softmax over
    all N nodes). See cdgcnet/cdgc/ and REPRODUCING.md."""
    fusion: str = "concat"
    """How the CDGC output R joins the feature X: "concat" ([X, R], 2C) | "sum" (X + R)."""
    impl: str = "fast"
    """CDGC implementation: "fast" (a few large products per chunk of queries) | "dense" (the
    literal M x N x N reference). "segmented" and "jagged", earlier fast paths, read as "fast"."""
    checkpoint: bool = False
    """Gradient checkpointing of the whole CDGC module."""
    cdgc_precision: str = "split"
    """Arithmetic of the CDGC graph's products under bf16/fp16 autocast (cdgcnet/cdgc/precision.py;
    gradient error against float64 at C=512, sharpened graph, in benchmarks/README.md):
    "split" (bf16 tensor cores, forward products as 3-term bf16 splits with float32 sums, bf16
    backward; about 1.8%) | "fp32" (everything float32; 0.2%, slowest) | "autocast" (everything
    bf16; 10-20%: the softmax of eq. 2-3 amplifies bf16 rounding)."""
    channels: int = 512
    """C: channels of the feature X after the reduction conv."""
    aux: bool = True
    """Auxiliary FCN head on backbone stage 3 (used in training only)."""
    dropout: float = 0.1
    """Channel dropout before each classifier."""

    def __post_init__(self) -> None:
        if isinstance(self.parts, list):  # YAML / JSON give lists
            self.parts = tuple(self.parts)
        _check_int(self, "num_classes", minimum=1)
        _check_choice(self, "depth", DEPTHS)
        _check_choice(self, "output_stride", OUTPUT_STRIDES)
        for name in ("deep_stem", "aspp", "checkpoint", "aux"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.pretrained is not None and not isinstance(self.pretrained, str):
            raise ValueError(
                f"ModelConfig.pretrained must be a path or None, got {self.pretrained!r}"
            )
        if self.pretrained == "":
            self.pretrained = None
        elif self.pretrained is not None and self.pretrained.lower() == FROM_SCRATCH:
            self.pretrained = FROM_SCRATCH
        _check_int(self, "aspp_channels", minimum=1)
        _check_choice(self, "context", CONTEXTS)
        _check_choice(self, "graph", GRAPHS)
        self.ratio = check_ratio(self.ratio, "ModelConfig.ratio")
        if not isinstance(self.parts, tuple) or not self.parts:
            raise ValueError(f"ModelConfig.parts must be a non-empty tuple, got {self.parts!r}")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or len(set(self.parts)) != len(self.parts):
            raise ValueError(
                f"ModelConfig.parts must be distinct names from {PARTS}, got {self.parts!r}"
            )
        _check_choice(self, "fusion", FUSIONS)
        if self.impl in LEGACY_IMPLS:
            self.impl = "fast"
        _check_choice(self, "impl", IMPLS)
        _check_choice(self, "cdgc_precision", CDGC_PRECISIONS)
        _check_choice(self, "queries", QUERIES)
        _check_int(self, "channels", minimum=1)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"ModelConfig.dropout must be a number, got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")

    def replace(self, **changes: object) -> ModelConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _check_int(cfg: ModelConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ModelConfig.{name} must be an int >= {minimum}, got {value!r}")


def _check_choice(cfg: ModelConfig, name: str, choices: tuple) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"ModelConfig.{name} must be one of {choices}, got {value!r}")


# The paper's model for each label set (num_classes from cdgcnet.labels), by dataset name or by
# label-set name ("cocostuff" for both releases), and a small CPU model.
_LABEL_SETS: dict[str, LabelSpec] = {
    **LABEL_SPECS,
    **{spec.name: spec for spec in LABEL_SPECS.values()},
}
PRESETS = (*sorted(_LABEL_SETS), "cpu_small")


def model_preset(name: str) -> ModelConfig:
    """The model of one experiment preset (paper section 4.2: ResNet-101, OS 8, ASPP + CDGC)."""
    if name in _LABEL_SETS:
        return ModelConfig(num_classes=_LABEL_SETS[name].num_classes)
    if name == "cpu_small":
        # Small enough for forward/backward on a laptop CPU in well under a second per 129px image.
        return ModelConfig(
            num_classes=CITYSCAPES.num_classes, depth=18, channels=64, aspp_channels=64
        )
    raise ValueError(f"unknown model preset {name!r}; choose one of {PRESETS}")
