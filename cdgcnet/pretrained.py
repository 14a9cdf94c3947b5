"""ImageNet weights for the backbone from a local file; nothing is downloaded here.

Accepted: a ResNet state dict in this backbone's key layout saved with torch.save (.pth / .pt),
possibly wrapped as {"state_dict": ...} or {"model": ...} and with "module." / "backbone." key
prefixes, or the same tensors in a .safetensors file. torch.load runs with weights_only=True, so
a file holding pickled objects is refused before anything in it runs. The classifier (fc.*) is
dropped. The key layout is torchvision's (conv1/bn1 stem); the deep stem (v1c) takes
mmsegmentation's names (stem.0 ... stem.7), which this backbone uses too. Files in other layouts
(timm's deep stem) are converted by `python -m cdgcnet.weights convert` (cdgcnet/weights.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from cdgcnet.torch_files import TorchFileError, load_tensors

_PREFIXES = ("module.", "backbone.")
_DROPPED = ("fc.",)
_SHOW = 10  # names listed per kind of problem in an error
_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.")
# Blocks per stage -> ResNet depth (bottleneck and basic-block ResNets of cdgcnet/backbone.py).
_DEPTHS = {
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
}


AVG_DOWN_REASON = (
    "its avg-down downsample (an AvgPool before each strided 1x1 shortcut conv) is a different "
    "architecture from this backbone's strided 1x1 conv, so its weights cannot be used"
)


class PretrainedWeightsError(ValueError):
    """A weight file that cannot be used for this backbone; the message names file and reason."""


@dataclass(frozen=True)
class Architecture:
    """What a ResNet state dict is, read from its key names (None: cannot tell)."""

    depth: int | None
    stem: str | None
    """"7x7" (torchvision conv1/bn1), "deep" (three 3x3 convs: stem.* or timm's conv1.0 ...)."""
    avg_down: bool
    """ResNet-D downsample (AvgPool, conv, BN: keys downsample.1 / downsample.2)."""

    def __str__(self) -> str:
        depth = f"ResNet-{self.depth}" if self.depth else "ResNet of unknown depth"
        stem = {"7x7": "7x7 stem", "deep": "deep stem", None: "unknown stem"}[self.stem]
        return f"{depth}, {stem}" + (", avg-down (ResNet-D)" if self.avg_down else "")


def architecture(state: dict[str, Tensor]) -> Architecture:
    """Depth, stem and downsample kind of a ResNet state dict (wrapper prefixes stripped)."""
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = _BLOCK.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    counts = tuple(len(blocks.get(i, ())) for i in (1, 2, 3, 4))
    kind = "bottleneck" if any(k.endswith(".conv3.weight") for k in state) else "basic"
    if any(k.startswith("stem.") for k in state) or "conv1.0.weight" in state:
        stem = "deep"
    elif "conv1.weight" in state:
        stem = "7x7"
    else:
        stem = None
    avg_down = any(".downsample.2." in k for k in state)
    return Architecture(_DEPTHS.get((kind, counts)), stem, avg_down)


def backbone_architecture(backbone: nn.Module) -> Architecture:
    return Architecture(
        getattr(backbone, "depth", None),
        "deep" if getattr(backbone, "deep_stem", False) else "7x7",
        avg_down=False,
    )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .pth/.pt (torch.load weights_only=True) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weight file not found (nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise PretrainedWeightsError(f"{path}: not a readable .safetensors file: {e}") from e
    try:
        obj = load_tensors(path)
    except TorchFileError as e:
        if e.refused:
            raise PretrainedWeightsError(
                f"{path}: refused: the file holds pickled objects, not only tensors ({e.reason})"
            ) from None
        raise PretrainedWeightsError(f"{path}: {e.reason}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj:
        raise PretrainedWeightsError(
            f"{path}: expected a non-empty dict of tensors, got {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise PretrainedWeightsError(f"{path}: entries that are not tensors: {bad[:_SHOW]}")
    return obj


def remap_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes ("module.", "backbone.") and drop the ImageNet classifier."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        if not key.startswith(_DROPPED):
            out[key] = value
    return out


def fit_problems(state: dict[str, Tensor], expected: dict[str, Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of `state` against `expected`, one
    entry per kind (empty: it fits). BatchNorm `num_batches_tracked` counters may be absent
    (older torchvision files)."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    for what, names in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if names:
            more = f" ... (+{len(names) - _SHOW} more)" if len(names) > _SHOW else ""
            problems.append(f"{len(names)} {what}: {names[:_SHOW]}{more}")
    return problems


def architecture_mismatch(found: Architecture, wanted: Architecture) -> str | None:
    """One sentence when a file of architecture `found` cannot serve a `wanted` backbone."""
    if found.avg_down:
        return f"the file is a {found}: {AVG_DOWN_REASON}"
    depth_differs = found.depth is not None and found.depth != wanted.depth
    stem_differs = found.stem is not None and found.stem != wanted.stem
    if depth_differs or stem_differs:
        return (
            f"wrong architecture: the file is a {found}, the model a {wanted} "
            "(match model.depth / model.deep_stem to the file, or use other weights; "
            "`python -m cdgcnet.weights list` shows which file has which)"
        )
    return None


def load_pretrained_backbone(backbone: nn.Module, path: str | Path) -> None:
    """Load weights into `backbone`, failing with every missing/unexpected key and bad shape named
    (and, first, the architecture mismatch when depth, stem or downsample kind differ)."""
    state = remap_keys(read_state_dict(path))
    expected = backbone.state_dict()
    problems = fit_problems(state, expected)
    if problems:
        wanted = backbone_architecture(backbone)
        reason = architecture_mismatch(architecture(state), wanted)
        head = f"{reason}; " if reason else ""
        raise PretrainedWeightsError(
            f"{path}: does not fit {type(backbone).__name__}"
            f"{_describe(backbone)}: {head}" + "; ".join(problems)
        )
    converted = {k: v.to(expected[k].dtype) for k, v in state.items()}
    backbone.load_state_dict(converted, strict=False)


def _describe(backbone: nn.Module) -> str:
    depth = getattr(backbone, "depth", None)
    stem = " deep-stem" if getattr(backbone, "deep_stem", False) else ""
    return f" (depth {depth}{stem})" if depth is not None else ""
