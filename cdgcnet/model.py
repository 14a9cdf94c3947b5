"""CDGCNet: dilated ResNet (+ ASPP) -> reduction conv (X) -> coarse logits (P) -> CDGC (R) -> fusion.

Legend: B batch, M classes, C = cfg.channels, h x w the feature grid (input / output stride).

    images (B,3,H,W) -> backbone -> {"aux": stage 3, "out": stage 4}
    stage 4 -> 3x3 reduction conv, or ASPP (ending in its 3x3 reduction conv) -> X (B,C,h,w)
    X -> 1x1 -> coarse P (B,M,h,w)
    CDGC(X, P, target) -> R (B,C,h,w);  [X, R] or X + R -> dropout -> 1x1 -> refined (B,M,h,w)
    stage 3 -> auxiliary FCN head -> aux (B,M,h,w)          (training with cfg.aux only)

All logits stay at feature resolution; losses and inference upsample them.
"""

from __future__ import annotations

from torch import Tensor, nn

from cdgcnet.aspp import ASPP
from cdgcnet.backbone import DilatedResNet
from cdgcnet.cdgc import CDGCModule
from cdgcnet.config import FROM_SCRATCH, ModelConfig
from cdgcnet.heads import AuxHead, FusionHead, ReductionHead


class CDGCNet(nn.Module):
    """The full segmentation network; every ablation variant is chosen by its ModelConfig."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = DilatedResNet(cfg.depth, cfg.output_stride, cfg.deep_stem)
        cin = self.backbone.channels["out"]
        self.aspp: ASPP | None = None
        if cfg.aspp:
            self.aspp = ASPP(cin, cfg.aspp_channels, cfg.channels, cfg.output_stride)
            cin = cfg.channels
        reduce = self.aspp is None  # the ASPP's bottleneck is the reduction conv
        self.head = ReductionHead(cin, cfg.channels, cfg.num_classes, cfg.dropout, reduce)
        self.context: CDGCModule | None = None
        self.fusion: FusionHead | None = None
        if cfg.context != "none":
            self.context = CDGCModule(
                cfg.channels,
                cfg.num_classes,
                graph=cfg.graph,
                ratio=cfg.ratio,
                parts=cfg.parts,
                impl=cfg.impl,
                checkpoint=cfg.checkpoint,
                precision=cfg.cdgc_precision,
                class_wise=cfg.context == "cdgc",
                queries=cfg.queries,
            )
            self.fusion = FusionHead(cfg.channels, cfg.num_classes, cfg.fusion, cfg.dropout)
        self.aux_head = (
            AuxHead(self.backbone.channels["aux"], cfg.num_classes, cfg.dropout)
            if cfg.aux
            else None
        )

    def forward(
        self, images: Tensor, target: Tensor | None = None, return_features: bool = False
    ) -> dict[str, Tensor]:
        """images (B,3,H,W); target (B,H,W) with 255 ignore, used by graph="ds" in training."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CDGCNet expects images (B, 3, H, W), got {tuple(images.shape)}")
        stages = self.backbone(images)
        top = stages["out"] if self.aspp is None else self.aspp(stages["out"])
        feature, coarse = self.head(top)  # X (B,C,h,w), P (B,M,h,w)
        out = {"coarse": coarse}
        if self.context is not None and self.fusion is not None:
            context = self.context(feature, coarse, target if self.training else None)
            out["refined"] = self.fusion(feature, context)
            if return_features:
                out["context"] = context
        if self.training and self.aux_head is not None:
            out["aux"] = self.aux_head(stages["aux"])
        if return_features:
            out["feature"] = feature
        return out


def build_model(cfg: ModelConfig) -> CDGCNet:
    """CDGCNet for cfg, with the backbone's ImageNet weights loaded when cfg.pretrained names a
    file (not None, not "none")."""
    model = CDGCNet(cfg)
    if cfg.pretrained and cfg.pretrained != FROM_SCRATCH:
        from cdgcnet.pretrained import load_pretrained_backbone

        load_pretrained_backbone(model.backbone, cfg.pretrained)
    return model


def final_logits(out: dict[str, Tensor]) -> Tensor:
    """The prediction of a forward dict: refined logits when present, else the coarse ones."""
    return out["refined"] if "refined" in out else out["coarse"]


# The paper trains the whole network at one learning rate (sec. 4.2); presets may raise it.
HEAD_LR_MULT = 1.0


def param_groups(
    model: nn.Module, lr: float, head_lr_mult: float = HEAD_LR_MULT, weight_decay: float = 0.0
) -> list[dict]:
    """Two optimizer groups: pretrained backbone at lr, everything else at lr * head_lr_mult.

    Each group carries "name" and "lr_mult" so a schedule can scale "lr" per group.
    A model wrapped by DDP/DeepSpeed (a `.module` attribute) is unwrapped.
    """
    inner = getattr(model, "module", model)
    backbone, heads = [], []
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if name.startswith("backbone.") else heads).append(p)
    groups = [
        {"name": "backbone", "params": backbone, "lr": lr, "lr_mult": 1.0},
        {"name": "heads", "params": heads, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult},
    ]
    for g in groups:
        g["weight_decay"] = weight_decay
    return [g for g in groups if g["params"]]
