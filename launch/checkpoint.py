"""Checkpoints that count only when complete, keep-last-k, and resume across world sizes.

Layout under <run_dir>/checkpoints/:
    iter_00000100/            DeepSpeed save_checkpoint(tag="iter_00000100") files
    iter_00000100/COMPLETE    written by rank 0 after every rank's save returned (JSON meta)
    universal/iter_00000100/  the universal form, made on demand when the world size changed
A save that dies half-way leaves no COMPLETE marker, so resume never picks it; the next complete
save removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from launch.distributed import barrier

MARKER = "COMPLETE"
PREFIX = "iter_"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or resumed from; the message names the path."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    """The tag directory, e.g. runs/x/checkpoints/iter_00000100."""
    iteration: int
    meta: dict

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])


def tag_for(iteration: int) -> str:
    return f"{PREFIX}{iteration:08d}"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def read_info(path: str | Path) -> CheckpointInfo:
    """The meta of one complete checkpoint tag directory; CheckpointError if incomplete."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"{path}: not a complete checkpoint (no {MARKER} marker: the save did not finish)"
        )
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{marker}: unreadable marker ({e})") from e
    return CheckpointInfo(path, int(meta["iteration"]), meta)


def list_complete(root: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(PREFIX) and (d / MARKER).is_file():
            found.append(read_info(d))
    return sorted(found, key=lambda c: c.iteration)


def latest_complete(root: str | Path) -> CheckpointInfo | None:
    done = list_complete(root)
    return done[-1] if done else None


def tensors_finite(module: torch.nn.Module) -> bool:
    """True when every parameter (this rank's ZeRO-3 partition included) and buffer is finite."""
    for p in module.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p if t is None or p.numel() > 0 else t
        if t.numel() and not torch.isfinite(t.detach()).all():
            return False
    return all(torch.isfinite(b).all() for b in module.buffers() if b.is_floating_point())


def all_ranks_true(flag: bool) -> bool:
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    if torch.cuda.is_available():
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item()) == 0


class CheckpointManager:
    """Save (with COMPLETE marker, keep-last-k) and locate DeepSpeed checkpoints of one run."""

    def __init__(self, run_dir: str | Path, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def save(self, engine, iteration: int, client_state: dict, meta: dict) -> Path:
        """Collective: every rank calls it. Refuses to save non-finite weights."""
        if not all_ranks_true(tensors_finite(engine.module)):
            raise CheckpointError(
                f"{self.root}: refusing to save iteration {iteration}: the model holds "
                "non-finite weights or BatchNorm statistics"
            )
        tag = tag_for(iteration)
        path = self.root / tag
        if _rank() == 0 and path.exists():
            shutil.rmtree(path)  # a leftover of a crashed save at the same iteration
        barrier()
        engine.save_checkpoint(
            str(self.root), tag=tag, client_state=client_state, save_latest=False
        )
        barrier()
        if _rank() == 0:
            full = {"iteration": iteration, "tag": tag, "time": time.time(), **meta}
            tmp = path / (MARKER + ".tmp")
            tmp.write_text(json.dumps(full, indent=1))
            os.replace(tmp, path / MARKER)
            self._prune(iteration)
        barrier()
        return path

    def _prune(self, newest: int) -> None:
        complete = list_complete(self.root)
        for old in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(old.path, ignore_errors=True)
            shutil.rmtree(self.root / "universal" / old.tag, ignore_errors=True)
        for d in self.root.iterdir():  # incomplete saves older than the newest complete one
            if (
                d.is_dir()
                and d.name.startswith(PREFIX)
                and not (d / MARKER).exists()
                and int(d.name[len(PREFIX) :]) < newest
            ):
                shutil.rmtree(d, ignore_errors=True)

    def resolve(self, resume: str) -> CheckpointInfo | None:
        """'auto' -> newest complete checkpoint of this run (or None); 'none' -> None; else a path."""
        if resume == "none":
            return None
        if resume == "auto":
            return latest_complete(self.root)
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"{path}: --resume path is not a checkpoint directory")
        if path.name.startswith(PREFIX):
            return read_info(path)  # a tag directory: complete or refused
        if not (path / MARKER).is_file():
            latest = latest_complete(path)  # a checkpoints/ root was given
            if latest is None:
                raise CheckpointError(f"{path}: holds no complete checkpoint (no {MARKER} marker)")
            return latest
        return read_info(path)


# ds_to_universal knows Adam's state names only; SGD's momentum travels under Adam's first name.
_ALIAS = "exp_avg"
_UNUSED = "exp_avg_sq"


def _alias_sgd_states(src: Path, dst: Path) -> None:
    """Copy a tag dir, giving each SGD state group exp_avg (= momentum) and exp_avg_sq (zeros)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith(".pt"):
            continue
        if "optim_states" not in f.name:
            shutil.copy2(f, dst / f.name)
            continue
        # DeepSpeed pickles its own optimizer files; this is one this program wrote.
        sd = torch.load(f, map_location="cpu", weights_only=False)
        osd = sd["optimizer_state_dict"]
        inner = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict") or {}
        flats = osd.get("single_partition_of_fp32_groups") or osd.get("fp32_flat_groups")
        for gid, st in inner.get("state", {}).items():
            ref = flats[gid] if flats is not None else next(iter(st.values()))
            mom = st.get("momentum_buffer")
            if mom is not None and flats is not None and mom.numel() > ref.numel():
                # The fp32 partition is saved without the last rank's alignment padding and
                # the converter strips it once more: give it back so the two agree.
                ref = torch.cat([ref, ref.new_zeros(mom.numel() - ref.numel())])
                flats[gid] = ref
            st[_ALIAS] = mom if mom is not None else torch.zeros_like(ref)
            st.setdefault(_UNUSED, torch.zeros_like(ref))
        torch.save(sd, dst / f.name)


def _unalias(universal_tag_dir: Path) -> None:
    for param_dir in (universal_tag_dir / "zero").iterdir():
        if not param_dir.is_dir():
            continue
        if (param_dir / f"{_ALIAS}.pt").exists():
            os.replace(param_dir / f"{_ALIAS}.pt", param_dir / "momentum_buffer.pt")
        (param_dir / f"{_UNUSED}.pt").unlink(missing_ok=True)


def to_universal(info: CheckpointInfo) -> Path:
    """Convert a checkpoint to DeepSpeed's universal form (rank 0 works, all ranks wait).

    Returns the directory to pass to engine.load_checkpoint (it holds `latest` and the tag).
    The SGD momentum buffers are carried through ds_to_universal under Adam's state name and
    renamed back afterwards (the universal loader restores any state file by its name).
    """
    out_root = info.path.parent / "universal"
    out = out_root / info.tag
    if _rank() == 0 and not (out / MARKER).is_file():
        shutil.rmtree(out, ignore_errors=True)
        staged = out_root / f".{info.tag}.aliased"
        shutil.rmtree(staged, ignore_errors=True)
        out_root.mkdir(parents=True, exist_ok=True)
        _alias_sgd_states(info.path, staged)
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(staged),
            "--output_folder",
            str(out),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
            "--inject_missing_state",
        ]  # ZeRO-2 checkpoints lack the universal info block
        proc = subprocess.run(cmd, capture_output=True, text=True)
        shutil.rmtree(staged, ignore_errors=True)
        if proc.returncode != 0:
            raise CheckpointError(
                f"{info.path}: conversion to a universal checkpoint failed:\n{proc.stderr[-3000:]}"
            )
        _unalias(out)
        (out_root / "latest").write_text(info.tag)
        (out / MARKER).write_text(json.dumps(info.meta))
    barrier()
    return out_root
