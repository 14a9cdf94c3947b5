"""ImageNet weights for the backbone from a local file; nothing is downloaded.

Accepted: a torchvision-format ResNet state dict saved with torch.save (.pth / .pt), possibly
wrapped as {"state_dict": ...} or {"model": ...} and with "module." / "backbone." key prefixes,
or the same tensors in a .safetensors file. torch.load runs with weights_only=True, so a file
holding pickled objects is refused. The classifier (fc.*) is dropped. Deep-stem (v1c) backbones
take mmsegmentation-style names (stem.0 ... stem.8), which this backbone uses too.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

_PREFIXES = ("module.", "backbone.")
_DROPPED = ("fc.",)
_SHOW = 10  # names listed per kind of problem in an error


class PretrainedWeightsError(ValueError):
    """A weight file that cannot be used for this backbone; the message names file and reason."""


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
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:200]
        raise PretrainedWeightsError(
            f"{path}: refused: the file holds pickled objects, not only tensors "
            f"(torch.load weights_only=True failed: {first})"
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise PretrainedWeightsError(f"{path}: not a readable torch.save file: {e}") from e
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


def load_pretrained_backbone(backbone: nn.Module, path: str | Path) -> None:
    """Load weights into `backbone`, failing with every missing/unexpected key and bad shape named.

    BatchNorm `num_batches_tracked` counters may be absent (older torchvision files).
    """
    state = remap_keys(read_state_dict(path))
    expected = backbone.state_dict()
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
    if problems:
        raise PretrainedWeightsError(
            f"{path}: does not fit {type(backbone).__name__}"
            f"{_describe(backbone)}: " + "; ".join(problems)
        )
    converted = {k: v.to(expected[k].dtype) for k, v in state.items()}
    backbone.load_state_dict(converted, strict=False)


def _describe(backbone: nn.Module) -> str:
    depth = getattr(backbone, "depth", None)
    stem = " deep-stem" if getattr(backbone, "deep_stem", False) else ""
    return f" (depth {depth}{stem})" if depth is not None else ""
