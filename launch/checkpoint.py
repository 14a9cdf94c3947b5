"""Checkpoints that count only when complete and intact, keep-last-k, and resume across world
sizes; no checkpoint file is ever unpickled with code execution allowed.

Layout under <run_dir>/checkpoints/:
    iter_00000100/            DeepSpeed save_checkpoint(tag="iter_00000100") files
    iter_00000100/COMPLETE    written by rank 0 after every rank's save returned (JSON meta, with
                              the size and sha256 of every file of the tag directory)
    universal/iter_00000100/  the universal form, made on demand when the world size changed
A save that dies half-way leaves no COMPLETE marker, so resume never picks it; the next complete
save removes it. A save that fails (a full disk) removes its partial directory at once.

Trust: DeepSpeed loads its files with `torch.load(weights_only=False)`, which runs any code a
pickle names. Every file of a checkpoint is therefore unpickled first with `weights_only=True`
and an allow-list of the few DeepSpeed types our saves contain (`safe_load`, `verify`), and the
DeepSpeed loads themselves run with `torch.load` forced to the same (`load_engine`,
`fp32_state_dict`). A file that names any other global is refused with its path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from launch.checkpoint_layout import (
    MAX_MARKER_BYTES,
    PREFIX,
    UNIVERSAL,
    marker_problem,
    parse_tag,
    sizes_match,
    warn_unknown_entries,
)
from launch.distributed import barrier
from pipeline.atomic import disk_full

MARKER = "COMPLETE"
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or resumed from; the message names the path."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds a pickled object outside the allow-list: never loaded, never
    skipped over silently (someone wrote it on purpose)."""


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


def universal_reason(info: CheckpointInfo, world_size: int) -> str | None:
    """Why a checkpoint loads here only through the universal form (its per-parameter files fit
    any layout), or None when DeepSpeed loads it as it is.

    Another world size partitions the flat buffers otherwise. ZeRO-1/2 checkpoints saved before
    16-byte parameter alignment (markers without "parameter_alignment") hold the unpadded flat
    layout, which DeepSpeed refuses to load into a padded engine.
    """
    if info.world_size != world_size:
        return f"was saved by {info.world_size} rank(s), this world has {world_size}"
    if info.meta.get("zero_stage") in (1, 2) and not info.meta.get("parameter_alignment"):
        return "holds ZeRO's unpadded parameter layout (saved before 16-byte alignment)"
    return None


def tag_for(iteration: int) -> str:
    return f"{PREFIX}{iteration:08d}"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


# ---------------------------------------------------------------- reading files safely


def allowed_globals() -> list:
    """The non-tensor types DeepSpeed's own saves hold (found by loading every file of ZeRO-1/2/3
    and universal checkpoints with weights_only=True); torch's defaults cover the rest."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


def safe_load(file: str | Path, map_location="cpu", mmap: bool = False):
    """torch.load with weights_only=True and the allow-list. A pickle naming any other global ->
    UnsafeCheckpointError; a file torch cannot read (truncated, not a torch file) ->
    CheckpointError. Both name the file."""
    file = Path(file)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # the global torch refused to import
        if found:
            raise UnsafeCheckpointError(
                f"{file}: refused: it pickles {found.group(1)}, which is neither a tensor nor an "
                "allowed checkpoint type, and could run code when loaded"
            ) from None
        raise CheckpointError(
            f"{file}: unreadable checkpoint file (not a weights-only torch file)"
        ) from None
    except Exception as e:  # truncated zip, not a torch file at all
        raise CheckpointError(
            f"{file}: unreadable checkpoint file ({type(e).__name__}: {e})"
        ) from None


def check_file(file: Path) -> None:
    """Unpickle the file's object tree without reading its tensor data (mmap): cheap, and enough,
    since only the pickle can run code."""
    with open(file, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch's zip format; mmap needs it
    obj = safe_load(file, mmap=zipped)
    del obj


def file_record(file: Path) -> dict:
    """{"size", "sha256"} of one file, read in chunks."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return {"size": file.stat().st_size, "sha256": h.hexdigest()}


def checkpoint_files(path: Path) -> list[Path]:
    """Every file under a tag directory but its marker, sorted; a link or a special file is
    refused (a link could point anywhere, a FIFO would hang the reader)."""
    out = []
    for f in sorted(path.rglob("*")):
        if f.is_symlink() or not (f.is_file() or f.is_dir()):
            raise UnsafeCheckpointError(f"{f}: refused: not a regular file inside a checkpoint")
        if f.is_file() and f.relative_to(path).as_posix() not in (MARKER, MARKER + ".tmp"):
            out.append(f)
    return out


def record_files(path: Path) -> dict[str, dict]:
    """The marker's "files": relative path -> size and sha256, each file also checked to unpickle
    safely (a save that wrote a file torch cannot read is not complete)."""
    files = {}
    for f in checkpoint_files(path):
        check_file(f)
        files[f.relative_to(path).as_posix()] = file_record(f)
    return files


def verify(path: str | Path, meta: dict | None = None) -> None:
    """Every file of a tag directory unpickles safely and, when the marker lists the files, has
    the recorded size and sha256, none missing and none extra. Raises UnsafeCheckpointError or
    CheckpointError naming the first bad file. Each file is read once (hash) plus its pickle."""
    path = Path(path)
    listed = (meta or {}).get("files")
    present = {f.relative_to(path).as_posix(): f for f in checkpoint_files(path)}
    for name in sorted(set(listed or ()) - set(present)):
        raise CheckpointError(f"{path / name}: missing (listed in {path / MARKER})")
    for name, f in present.items():
        try:
            check_file(f)  # first: a planted file is refused as such, not as mere damage
            unreadable = None
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            unreadable = e
        if listed is not None:
            want, size = listed.get(name), f.stat().st_size
            if want is None:
                raise CheckpointError(
                    f"{f}: not written by the save (not listed in {path / MARKER})"
                )
            if size != want["size"]:
                raise CheckpointError(f"{f}: damaged: {size} bytes, the save wrote {want['size']}")
        if unreadable is not None:
            raise unreadable
        if listed is not None and file_record(f)["sha256"] != listed[name]["sha256"]:
            raise CheckpointError(f"{f}: damaged: its sha256 differs from the one recorded at save")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def newest_intact(root: str | Path, damaged_tags: set[str] | None = None) -> CheckpointInfo | None:
    """The newest complete checkpoint under root whose files verify; each damaged newer one is
    named in a warning (and its tag added to damaged_tags). None when there is no complete
    checkpoint. A file that is unsafe to load stops here (UnsafeCheckpointError); when every
    complete checkpoint is damaged -> CheckpointError."""
    done = list_complete(root)
    damaged = []
    for info in reversed(done):
        try:
            verify(info.path, info.meta)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            damaged.append(str(e))
            if damaged_tags is not None:
                damaged_tags.add(info.tag)
            continue
        for reason in damaged:  # said only here: when none is intact, the error names them all
            _warn(f"skipping a damaged checkpoint: {reason}")
        if damaged:
            _warn(f"falling back to the newest intact checkpoint {info.path}")
        return info
    if damaged:
        raise CheckpointError(
            f"{root}: no intact checkpoint ({'; '.join(damaged)}); remove the damaged ones or "
            "pass --resume none to start over"
        )
    return None


@contextlib.contextmanager
def _weights_only_loads():
    """Every torch.load inside (DeepSpeed's, called with weights_only=False) runs with
    weights_only=True and the allow-list: the files were verified already, this closes the gap
    between that check and DeepSpeed's read."""
    real = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed_globals()):
            return real(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def load_engine(engine, load_dir: str | Path, tag: str):
    """engine.load_checkpoint(load_dir, tag) with no code execution possible from its files."""
    with _weights_only_loads():
        return engine.load_checkpoint(str(load_dir), tag=tag)


def fp32_state_dict(tag_dir: str | Path) -> dict:
    """Consolidated fp32 weights of a ZeRO checkpoint (deepspeed.utils.zero_to_fp32), its loads
    forced to weights_only=True."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(tag_dir)
    with _weights_only_loads():
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


# ---------------------------------------------------------------- locating checkpoints


def read_info(path: str | Path) -> CheckpointInfo:
    """The meta of one complete checkpoint tag directory; CheckpointError if incomplete."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"{path}: not a complete checkpoint (no {MARKER} marker: the save did not finish)"
        )
    try:
        with open(marker, "rb") as f:
            meta = json.loads(f.read(MAX_MARKER_BYTES + 1))
        problem = marker_problem(meta)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
        problem = f"not JSON ({type(e).__name__})"
    if problem:
        raise CheckpointError(f"{marker}: unreadable marker ({problem})")
    return CheckpointInfo(path, meta["iteration"], meta)


def list_complete(root: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and parse_tag(d.name) is not None and (d / MARKER).is_file():
            try:
                found.append(read_info(d))
            except CheckpointError as e:  # a damaged marker: the checkpoint does not count
                _warn(f"skipping checkpoint {d}: {e}")
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


def _broadcast_from_rank0(fn):
    """fn() on rank 0 only (it reads every file), its result or CheckpointError on every rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return fn()
    box: list = [None]
    if _rank() == 0:
        try:
            box[0] = ("ok", fn())
        except CheckpointError as e:
            box[0] = (type(e).__name__, str(e))
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "ok":
        return value
    raise (UnsafeCheckpointError if kind == "UnsafeCheckpointError" else CheckpointError)(value)


class CheckpointManager:
    """Save (with COMPLETE marker, keep-last-k) and locate DeepSpeed checkpoints of one run."""

    def __init__(self, run_dir: str | Path, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.damaged: set[str] = set()
        """Tags rank 0 found damaged when resuming: never counted among the kept ones."""

    def save(self, engine, iteration: int, client_state: dict, meta: dict) -> Path:
        """Collective: every rank calls it. Refuses to save non-finite weights. A failed save
        (full disk) removes its partial directory on every rank's word and raises
        CheckpointError; the previous checkpoints are untouched."""
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
        failure = None
        try:
            engine.save_checkpoint(
                str(self.root), tag=tag, client_state=client_state, save_latest=False
            )
        except Exception as e:
            failure = e
            barrier()  # the one DeepSpeed's save ends with, where the other ranks wait
        barrier()  # every rank's files are written, or its save failed
        if failure is None and _rank() == 0:
            failure = self._mark_complete(path, iteration, meta)
        if not all_ranks_true(failure is None):
            self._abandon(path, iteration, failure)
        if _rank() == 0:
            self._prune(iteration)  # only now: the new checkpoint is complete and verified
        barrier()
        return path

    def _mark_complete(self, path: Path, iteration: int, meta: dict) -> Exception | None:
        """Rank 0: hash and check every file, then write the marker (temp name + rename)."""
        tmp = path / (MARKER + ".tmp")
        try:
            files = record_files(path)
            full = {"iteration": iteration, "tag": path.name, "time": time.time(), **meta}
            tmp.write_text(json.dumps({**full, "files": files}, indent=1))
            os.replace(tmp, path / MARKER)
        except Exception as e:
            return e
        return None

    def _abandon(self, path: Path, iteration: int, failure: Exception | None) -> None:
        """Every rank: remove the partial save (rank 0) and raise one clear error."""
        full = failure is not None and disk_full(failure, self.root)
        if _rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        barrier()
        previous = latest_complete(self.root)
        kept = f"{previous.path} is intact" if previous else "there is no earlier checkpoint"
        if full:
            reason = f"the disk is full (no space left on the device holding {self.root})"
        elif failure is None:
            reason = "another rank's save failed"
        else:
            reason = f"{type(failure).__name__}: {failure}"
        hint = "; free space and rerun the same command to resume" if full else ""
        raise CheckpointError(
            f"{path}: saving iteration {iteration} failed: {reason}. The partial checkpoint was "
            f"removed and {kept}{hint}"
        ) from failure

    def _prune(self, newest: int) -> None:
        """Keep the newest `keep` intact checkpoints. A damaged one (found at resume, or whose
        files' sizes differ from its marker's: a stat each, no hashing) is not counted and not
        removed; entries no save wrote are left alone."""
        warn_unknown_entries(self.root)
        self.damaged.discard(tag_for(newest))  # saved again just now
        intact = [c for c in list_complete(self.root) if sizes_match(c.path, c.meta, self.damaged)]
        for old in intact[: max(0, len(intact) - self.keep)]:
            shutil.rmtree(old.path, ignore_errors=True)
            shutil.rmtree(self.root / UNIVERSAL / old.tag, ignore_errors=True)
        for d in self.root.iterdir():  # incomplete saves older than the newest complete one
            it = parse_tag(d.name)
            if d.is_dir() and it is not None and it < newest and not (d / MARKER).exists():
                shutil.rmtree(d, ignore_errors=True)

    def resolve(self, resume: str) -> CheckpointInfo | None:
        """'auto' -> newest intact checkpoint of this run (or None); 'none' -> None; else a path
        (a tag directory must be intact; a checkpoints/ root falls back like 'auto'). Rank 0
        verifies the files, every rank gets its answer."""
        if resume == "none":
            return None
        if resume == "auto":
            if _rank() == 0:
                warn_unknown_entries(self.root)
            return _broadcast_from_rank0(lambda: newest_intact(self.root, self.damaged))
        return _broadcast_from_rank0(lambda: _resolve_path(Path(resume)))


def _resolve_path(path: Path) -> CheckpointInfo:
    if not path.is_dir():
        raise CheckpointError(f"{path}: --resume path is not a checkpoint directory")
    if path.name.startswith(PREFIX) or (path / MARKER).is_file():
        info = read_info(path)  # a tag directory: complete or refused
        verify(info.path, info.meta)
        return info
    latest = newest_intact(path)  # a checkpoints/ root was given
    if latest is None:
        raise CheckpointError(f"{path}: holds no complete checkpoint (no {MARKER} marker)")
    return latest


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
        sd = safe_load(f)
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

    Returns the directory to pass to load_engine (it holds `latest` and the tag). The SGD
    momentum buffers are carried through ds_to_universal under Adam's state name and renamed
    back afterwards (the universal loader restores any state file by its name). The source is
    verified first, since the converter loads it with weights_only=False; a universal form made
    earlier is reused only when its own marker's file records verify.
    """
    out_root = info.path.parent / "universal"
    out = out_root / info.tag
    _broadcast_from_rank0(lambda: _convert(info, out) if _rank() == 0 else None)
    return out_root


def _reusable(out: Path) -> bool:
    """A finished universal form whose files verify; an unsafe file is refused, damage redoes it."""
    try:
        marker = read_info(out)
        verify(out, marker.meta)
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        if out.exists():
            _warn(f"converting again: {e}")
        return False
    return True


def _convert(info: CheckpointInfo, out: Path) -> None:
    """Rank 0: verify the source, stage it with aliased SGD states, run ds_to_universal."""
    if _reusable(out):
        return
    verify(info.path, info.meta)
    out_root = out.parent
    shutil.rmtree(out, ignore_errors=True)
    staged = out_root / f".{info.tag}.aliased"
    shutil.rmtree(staged, ignore_errors=True)
    out_root.mkdir(parents=True, exist_ok=True)
    _alias_sgd_states(info.path, staged)
    for f in checkpoint_files(staged):  # what the converter reads (weights_only=False) is ours
        check_file(f)
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
    files = record_files(out)
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps({**info.meta, "files": files}, indent=1))
    os.replace(tmp, out / MARKER)
