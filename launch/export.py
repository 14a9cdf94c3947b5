"""Exported fp32 model files (``model.pt``) and loading any checkpoint for evaluation/inference.

An export is ``torch.save({"model": state_dict, "config": cfg_dict, "format": FORMAT})`` where
``cfg_dict`` is the resolved training config as a plain dict (its "model" entry builds the net).
It is read back with ``torch.load(weights_only=True)`` only.

``load_checkpoint`` also accepts DeepSpeed checkpoints: a run directory, its ``checkpoints/``
folder (the newest complete ``iter_*`` tag is used; a plain DeepSpeed folder with ``latest`` works
too) or one tag folder. ZeRO partitions are consolidated to fp32 with
``deepspeed.utils.zero_to_fp32`` and the config is read from the run directory's ``config.json``
(or ``config.yaml``), else from the checkpoint's client state. Every file of the tag folder is
checked first (``launch.checkpoint.verify``: safe unpickling, recorded sizes and hashes), and a
run or ``checkpoints/`` folder falls back past damaged checkpoints to the newest intact one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdgcnet.config import ModelConfig
from cdgcnet.torch_files import TorchFileError, load_tensors
from launch.bounded import quote
from launch.checkpoint import CheckpointError
from launch.config import ConfigError, TrainConfig, model_config, to_dict
from launch.distributed import barrier
from pipeline.atomic import atomic_path

FORMAT = "cdgcnet-export-v1"
_MODEL_STATES = "mp_rank_00_model_states.pt"


def save_exported(
    model_state_dict: dict,
    cfg_dict: dict,
    path: str | os.PathLike,
    *,
    meta: dict | None = None,
) -> None:
    """Write an fp32 export atomically (temporary file in the same folder, then rename).

    meta: optional plain values kept beside the weights, e.g. {"iteration": 30000, "miou": 0.8}.
    """
    path = Path(path)
    if "model" not in cfg_dict or not isinstance(cfg_dict["model"], dict):
        raise CheckpointError(f"{path}: cfg_dict must hold the model config under 'model'")
    state = {k: v.detach().to("cpu", copy=True) for k, v in model_state_dict.items()}
    payload = {"model": state, "config": _plain(cfg_dict), "format": FORMAT}
    if meta:
        payload["meta"] = _plain(meta)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def export_trained(engine, cfg: TrainConfig, ckpt_root: Path, world, metrics: dict) -> Path:
    """The trained weights as an fp32 export, <run_dir>/model.pt (collective; rank 0 writes).
    Under ZeRO-3 they are consolidated from the newest checkpoint in ckpt_root."""
    path = Path(cfg.runtime.run_dir) / "model.pt"
    if cfg.runtime.zero_stage == 3:
        from launch.checkpoint import fp32_state_dict, latest_complete

        newest = latest_complete(ckpt_root) if world.is_main else None
        state = fp32_state_dict(newest.path) if newest is not None else None
    else:
        state = {
            k: v.float() if v.is_floating_point() else v
            for k, v in engine.module.state_dict().items()
        }
    if world.is_main:
        meta = {"iteration": metrics.get("iteration"), "miou": metrics.get("miou")}
        save_exported(state, to_dict(cfg), path, meta=meta)
        print(f"exported fp32 model: {path}", flush=True)
    barrier()
    return path


def load_exported(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Build the model from an export and load its weights: (model in eval mode, cfg_dict)."""
    payload = _read_export(Path(path))
    model = model_from_state(payload["model"], payload["config"], source=path)
    return model, payload["config"]


def _read_export(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such export file")
    try:
        payload = load_tensors(path)
    except TorchFileError as e:
        how = "refused by torch.load(weights_only=True): " if e.refused else ""
        raise CheckpointError(f"{path}: not a cdgcnet export ({how}{e.reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path}: not a cdgcnet export (format {found!r}, expected {FORMAT!r})"
        )
    for key in ("model", "config"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"{path}: export has no {key!r} dict")
    return payload


def model_from_state(state_dict: dict, cfg_dict: dict, *, source: str | os.PathLike) -> nn.Module:
    """Build CDGCNet from cfg_dict["model"] and load state_dict strictly (named errors)."""
    from cdgcnet.model import build_model

    model = build_model(model_config_from_dict(cfg_dict, source=source))
    result = model.load_state_dict(state_dict, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys {_some(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys {_some(result.unexpected_keys)}")
    if problems:
        raise CheckpointError(
            f"{source}: weights do not fit the model config: {'; '.join(problems)}"
        )
    return model.eval()


def model_config_from_dict(cfg_dict: dict, *, source: str | os.PathLike) -> ModelConfig:
    """ModelConfig from a resolved config dict; pretrained is dropped (the weights are here)."""
    model = cfg_dict.get("model") if isinstance(cfg_dict, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{source}: config has no 'model' section")
    # Models saved before the `queries` option existed were built with the "members" reading.
    try:
        return model_config({"queries": "members", **model, "pretrained": None})
    except ConfigError as e:
        raise CheckpointError(f"{source}: invalid model config: {e}") from e


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict, int | None]:
    """A model.pt export, a run dir, a checkpoints/ dir or one DeepSpeed tag dir ->
    (model in eval mode, cfg_dict, iteration or None)."""
    path = Path(path)
    if path.is_file():
        payload = _read_export(path)
        model = model_from_state(payload["model"], payload["config"], source=path)
        meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}
        return model, payload["config"], _int_or_none(meta.get("iteration"))
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    from launch import checkpoint

    try:  # every file unpickles safely (and matches its recorded hash) before DeepSpeed reads it
        tag_dir = _deepspeed_tag_dir(path)
    except checkpoint.CheckpointError as e:
        raise CheckpointError(str(e)) from None
    cfg, iteration = _deepspeed_config(tag_dir)
    state = _deepspeed_fp32_state(tag_dir)
    model = model_from_state(state, cfg, source=tag_dir)
    return model, cfg, iteration


def _deepspeed_tag_dir(path: Path) -> Path:
    """The tag folder to load: given, the newest complete one, or the one `latest` names."""
    from launch.checkpoint import MARKER, PREFIX, newest_intact, read_info, verify

    if (path / _MODEL_STATES).is_file() or (path / MARKER).is_file():  # a tag folder
        if path.name.startswith(PREFIX) and not (path / MARKER).is_file():
            raise CheckpointError(
                f"{path}: incomplete checkpoint (no {MARKER} marker: the save did not finish)"
            )
        verify(path, read_info(path).meta if (path / MARKER).is_file() else None)
        return path
    if (path / "checkpoints").is_dir() and not (path / "latest").is_file():
        path = path / "checkpoints"  # a run directory
    newest = newest_intact(path)
    if newest is not None:
        return newest.path
    latest = path / "latest"
    if latest.is_file():
        tag = _read_latest(latest)
        if not (path / tag / _MODEL_STATES).is_file():
            raise CheckpointError(
                f"{latest}: names tag {tag!r} but {path / tag} holds no {_MODEL_STATES}"
            )
        verify(path / tag)  # a plain DeepSpeed folder: no recorded hashes, still no pickles
        return path / tag
    raise CheckpointError(
        f"{path}: not a DeepSpeed checkpoint (no {_MODEL_STATES}, no complete {PREFIX}* "
        f"checkpoint and no 'latest' file)"
    )


def _read_latest(latest: Path) -> str:
    """The tag a DeepSpeed `latest` file names: one line of printable ASCII, a folder name."""
    with open(latest, "rb") as f:
        raw = f.read(257)
    tag = raw.strip()
    if (
        len(raw) > 256
        or not tag
        or not all(0x21 <= b < 0x7F for b in tag)
        or tag in (b".", b"..")
        or b"/" in tag
    ):
        raise CheckpointError(
            f"{latest}: does not name a checkpoint tag (expected one folder name in ASCII, "
            f"found {quote(raw[:40])})"
        )
    return tag.decode()


def _deepspeed_fp32_state(tag_dir: Path) -> dict:
    """fp32 weights: ZeRO partitions consolidated; ZeRO-0 saves hold them whole in 'module'."""
    if not any(tag_dir.glob("*optim_states.pt")):
        client = _client_state(tag_dir / _MODEL_STATES)
        if client is None or not isinstance(client.get("module"), dict):
            raise CheckpointError(
                f"{tag_dir / _MODEL_STATES}: no ZeRO optimizer partitions and no loadable "
                "'module' weights"
            )
        return {k: v.float() if v.is_floating_point() else v for k, v in client["module"].items()}
    from launch.checkpoint import fp32_state_dict

    try:
        return fp32_state_dict(tag_dir)
    except Exception as e:  # DeepSpeed raises bare ValueError/FileNotFoundError/KeyError
        raise CheckpointError(f"{tag_dir}: cannot consolidate the ZeRO checkpoint: {e}") from e


def _deepspeed_config(tag_dir: Path) -> tuple[dict, int | None]:
    """Config and iteration: the run dir's config.json/yaml, else the client state."""
    from launch.checkpoint import MARKER

    iteration = None
    marker = tag_dir / MARKER
    if marker.is_file():
        try:
            iteration = _int_or_none(json.loads(marker.read_text()).get("iteration"))
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{marker}: unreadable checkpoint marker ({e})") from e
    run_dir = tag_dir.parent.parent if tag_dir.parent.name == "checkpoints" else tag_dir.parent
    for folder in (run_dir, tag_dir.parent):
        for name in ("config.json", "config.yaml"):
            f = folder / name
            if f.is_file():
                return _read_config_file(f), iteration
    client = _client_state(tag_dir / _MODEL_STATES)
    if client is not None and isinstance(client.get("config"), dict):
        if iteration is None:
            iteration = _int_or_none(client.get("iteration"))
        return client["config"], iteration
    raise CheckpointError(
        f"{tag_dir}: no config found (no config.json / config.yaml in {run_dir}, and the "
        "client state holds no loadable 'config')"
    )


def _client_state(file: Path) -> dict | None:
    """The model-states file with weights_only=True; None when it holds non-tensor objects."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:
        return None  # e.g. numpy RNG states in the client state: not loadable safely
    return state if isinstance(state, dict) else None


def _read_config_file(f: Path) -> dict:
    from launch import bounded

    try:
        data = bounded.load_file(f)
    except (bounded.BoundsError, OSError) as e:
        raise CheckpointError(f"{f}: cannot read the config: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{f}: config is not a mapping")
    return data


def _plain(obj: Any) -> Any:
    """Tuples -> lists recursively, so the dict loads with weights_only=True and dumps to YAML."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _some(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None
