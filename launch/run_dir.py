"""Which directory a training run lives in, and whether the run there is already done.

A run dir holds one run: its config, logs, checkpoints and exported model. Without `--run-dir`
(or a `runtime.run_dir` override), launch/train.py names it after what it trains,
`runs/<preset>-<length>-<key>` (`runs/scenes-200it-3f9a2c1b`), where the key is a short hash of
the resolved config without its paths, logging settings and progress switch. So the same command
finds its own run again (an interrupted run resumes, a finished one is reported complete) and a
changed config never lands in another run's directory. A directory the user names is used as
given.

A run is finished when its exported model.pt and an evaluation at its last iteration are there.
Rerunning a finished run changes nothing: train.py says so in one line and exits 0.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from launch.config import PRESETS, ConfigError, TrainConfig, to_dict

# What does not change what a run trains: where things are, how it is logged and shown.
IGNORED = ("runtime.run_dir", "data.root", "runtime.progress", "logging")
CONFIG_FILE = "config.json"  # written by launch.train_log.TrainLog at the start of every run
EXPORT_FILE = "model.pt"
EVAL_FILE = "eval.jsonl"


def length_label(iterations: int) -> str:
    """`30k` for whole thousands, else `200it`."""
    if iterations >= 1000 and iterations % 1000 == 0:
        return f"{iterations // 1000}k"
    return f"{iterations}it"


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if any(key == i or key.startswith(i + ".") for i in IGNORED):
            continue
        if isinstance(v, dict) and k != "tags":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def trained_fields(cfg_dict: dict) -> dict[str, Any]:
    """Dotted key -> value of everything in a config dict that decides what is trained."""
    return _flat(cfg_dict)


def config_key(cfg: TrainConfig) -> str:
    """8 hex digits naming what `cfg` trains (the same on every rank and every machine)."""
    blob = json.dumps(trained_fields(to_dict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def default_run_dir(cfg: TrainConfig) -> str:
    """`runs/<preset>-<length>-<key>`, beside where the preset would put its runs."""
    base = PRESETS[cfg.name]().runtime.run_dir if cfg.name in PRESETS else "runs/run"
    parent = Path(base).parent
    name = f"{cfg.name}-{length_label(cfg.schedule.iterations)}-{config_key(cfg)}"
    return str(parent / name)


def named_by_user(cfg: TrainConfig, run_dir_flag: str | None, overrides: list[str]) -> bool:
    """True when the user chose the run dir: --run-dir, a runtime.run_dir override, or a config
    file whose run_dir differs from its preset's."""
    if run_dir_flag is not None:
        return True
    if any(o.split("=", 1)[0].strip() == "runtime.run_dir" for o in overrides):
        return True
    base = PRESETS.get(cfg.name)
    return base is None or cfg.runtime.run_dir != base().runtime.run_dir


def holds_run(run_dir: str | Path) -> bool:
    """Whether a run has started in `run_dir` (its config, checkpoints or export are there)."""
    d = Path(run_dir)
    return any((d / name).exists() for name in (CONFIG_FILE, "checkpoints", EXPORT_FILE))


def finished_result(run_dir: str | Path) -> dict | None:
    """The final evaluation record of the finished run in `run_dir`, else None (no run, or one
    that has not reached its last iteration and exported its model)."""
    d = Path(run_dir)
    try:
        saved = json.loads((d / CONFIG_FILE).read_text())
        lines = [ln for ln in (d / EVAL_FILE).read_text().splitlines() if ln.strip()]
        last = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
    if last is None or not (d / EXPORT_FILE).is_file():
        return None
    if int(last.get("iteration", -1)) < int(saved["schedule"]["iterations"]):
        return None
    return last


def _changed(run_dir: str | Path, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """key -> (saved, given) for the fields that decide what is trained and differ between the
    run in `run_dir` and `cfg`."""
    try:
        saved = trained_fields(json.loads((Path(run_dir) / CONFIG_FILE).read_text()))
    except (OSError, ValueError):
        return {}
    given = trained_fields(json.loads(json.dumps(to_dict(cfg))))  # tuples as lists, like the file
    keys = sorted(k for k in saved.keys() | given.keys() if saved.get(k) != given.get(k))
    return {k: (saved.get(k), given.get(k)) for k in keys}


def differences(run_dir: str | Path, cfg: TrainConfig, most: int = 3) -> list[str]:
    """`key: saved -> given` for fields that decide what is trained and differ between the run
    in `run_dir` and `cfg` (at most `most`, then `...`)."""
    changed = _changed(run_dir, cfg)
    out = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:most]]
    return [*out, "..."] if len(changed) > most else out


def extends(run_dir: str | Path, cfg: TrainConfig) -> bool:
    """Whether `cfg` is the run in `run_dir` with more iterations and nothing else changed:
    training it longer resumes from its newest checkpoint (the poly schedule follows the new
    length from there on)."""
    changed = _changed(run_dir, cfg)
    saved, given = changed.get("schedule.iterations", (None, None))
    return list(changed) == ["schedule.iterations"] and int(given) > int(saved)


def complete_or_refuse(cfg: TrainConfig, resume: str, named: bool) -> str | None:
    """Before any work: the one line to print when the run is already complete (the caller
    exits 0), None to go on; ConfigError when a new run would land in another run's directory.

    - `--resume auto` on a finished run of the same config: complete.
    - `--resume auto` on a finished run of another config (a directory the user named): refused,
      unless the only change is more iterations (the run is extended from its newest checkpoint).
    - `--resume none` on a run dir train.py named itself that holds a run: refused (a fresh
      start would overwrite it); in a directory the user named, it starts over as asked.
    """
    run_dir = cfg.runtime.run_dir
    if resume == "none":
        if not named and holds_run(run_dir):
            raise ConfigError(
                f"--resume none: {run_dir} already holds a run of this config; leave out "
                "--resume none to continue it, give --run-dir NEW for a second run, or change "
                "runtime.seed"
            )
        return None
    if resume != "auto":
        return None
    result = finished_result(run_dir)
    if result is None or extends(run_dir, cfg):
        return None
    changed = differences(run_dir, cfg)
    if changed:
        raise ConfigError(
            f"{run_dir} holds a finished run of another config ({'; '.join(changed)}); give "
            "another --run-dir, or leave --run-dir out for a directory named after the config"
        )
    miou = result.get("miou")
    score = f", val mIoU {miou:.4f}" if isinstance(miou, (int, float)) else ""
    return (
        f"{run_dir}: this run is complete (iteration {result['iteration']}{score}; model "
        f"{Path(run_dir) / EXPORT_FILE}); nothing to do. For another run give --run-dir NEW "
        "or change the config"
    )
