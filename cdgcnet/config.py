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

from cdgcnet.cdgc import QUERIES

DEPTHS = (18, 34, 50, 101)
OUTPUT_STRIDES = (8, 16)
CONTEXTS = ("cdgc", "plain_gcn", "none")
GRAPHS = ("sim", "ds")
PARTS = ("easy", "hard_pos", "hard_neg")
FUSIONS = ("concat", "sum")
IMPLS = ("segmented", "dense", "jagged")


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
    """Local ImageNet weights for the backbone (torchvision-format .pth or .safetensors)."""
    aspp: bool = True
    """Basic network = dilated ResNet + ASPP (True) or dilated ResNet alone (False)."""
    aspp_channels: int = 256
    """Channels of each ASPP branch and of its projection."""
    context: str = "cdgc"
    """Context module after the coarse head: "cdgc" | "plain_gcn" | "none" (no refined head)."""
    graph: str = "ds"
    """CDGC graph construction in training: "sim" (coarse masks) | "ds" (dynamic sampling)."""
    ratio: float = 1.0
    """Bernoulli sampling ratio of the easy positives for graph="ds", in [0, 1]."""
    parts: tuple[str, ...] = PARTS
    """Node-set parts used by graph="ds" (paper Table 5): subset of easy, hard_pos, hard_neg."""
    queries: str = "all"
    """Which nodes are the rows (queries) of each class graph A_m (the keys are V_m in both):
    "all" (every node, so every pixel gets M class contexts; default) | "members" (V_m only; Z_m
    is zero outside V_m, and with graph="ds" the refined head can read the ground truth from
    membership). See cdgcnet/cdgc.py and REPRODUCING.md for the two readings of section 3.3."""
    fusion: str = "concat"
    """How the CDGC output R joins the feature X: "concat" ([X, R], 2C) | "sum" (X + R)."""
    impl: str = "segmented"
    """CDGC implementation: "segmented" (fast) | "dense" (literal M x N x N reference) |
    "jagged" (segmented, all segments in one nested-tensor attention call; for CUDA, opt-in,
    not with checkpoint)."""
    checkpoint: bool = False
    """Gradient checkpointing of the whole CDGC module."""
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
        _check_int(self, "aspp_channels", minimum=1)
        _check_choice(self, "context", CONTEXTS)
        _check_choice(self, "graph", GRAPHS)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise ValueError(f"ModelConfig.ratio must be a number in [0, 1], got {self.ratio!r}")
        self.ratio = float(self.ratio)
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ModelConfig.ratio must be in [0, 1], got {self.ratio}")
        if not isinstance(self.parts, tuple) or not self.parts:
            raise ValueError(f"ModelConfig.parts must be a non-empty tuple, got {self.parts!r}")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or len(set(self.parts)) != len(self.parts):
            raise ValueError(
                f"ModelConfig.parts must be distinct names from {PARTS}, got {self.parts!r}"
            )
        _check_choice(self, "fusion", FUSIONS)
        _check_choice(self, "impl", IMPLS)
        _check_choice(self, "queries", QUERIES)
        if self.impl == "jagged" and self.queries == "all" and self.context == "cdgc":
            raise ValueError(
                "ModelConfig.impl='jagged' cannot run queries='all' (its queries are every node, "
                "not segments); use impl='segmented'"
            )
        if self.impl == "jagged" and self.checkpoint:
            raise ValueError(
                "ModelConfig.impl='jagged' cannot be checkpointed (torch's checkpoint cannot save "
                "nested tensors); use impl='segmented' with checkpoint=True"
            )
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


PRESETS = ("cityscapes", "voc", "cocostuff", "cpu_small")


def model_preset(name: str) -> ModelConfig:
    """The model of one experiment preset (paper section 4.2: ResNet-101, OS 8, ASPP + CDGC)."""
    if name == "cityscapes":
        return ModelConfig(num_classes=19)
    if name == "voc":
        return ModelConfig(num_classes=21)
    if name == "cocostuff":
        return ModelConfig(num_classes=171)
    if name == "cpu_small":
        # Small enough for forward/backward on a laptop CPU in well under a second per 129px image.
        return ModelConfig(num_classes=19, depth=18, channels=64, aspp_channels=64)
    raise ValueError(f"unknown model preset {name!r}; choose one of {PRESETS}")
