"""What `--resume` of a sweep trusts, and the check that enforces it.

Ray Tune restores a sweep by unpickling files of its experiment folder: `tuner.pkl`
(pickle.loads), the trial states in `experiment_state-*.json` (cloudpickle blobs inside the
JSON), a trial's `error.pkl`. A planted file there runs code. The decision:

1. A sweep folder is resumed only if this driver created it. When a sweep starts, the driver
   writes beside it, in `<storage>/<name>.sweep.json` (a file only the driver writes), the
   experiment folder's device and inode and the sha256 of `tuner.pkl`, which Tune writes once
   when the sweep starts and never again. A folder copied or downloaded into place, or replaced,
   has another inode; a changed `tuner.pkl` another hash: both are refused.
2. Every file and folder of the sweep that Tune or the driver reads on resume (the storage
   folder, the state file, the experiment folder and everything under it) is owned by this user,
   is no symlink, and is writable by no other user: not by others, and by its group only when
   that is this user's own primary group (ssh's StrictModes, with the usual umask 002 allowed).

What this leaves trusted: this user's own account. `experiment_state-*.json` changes throughout
a sweep and cannot be hashed across a crash; a process running as this user could rewrite it,
or this record, as it could rewrite ~/.bashrc. A sweep folder from elsewhere (a colleague's, a
download) is not resumed; start a new sweep, or, having read what is in it, record it as yours
with `python -m sweeps.resume_trust STORAGE NAME`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path

from pipeline.atomic import write_json_atomic

TUNER_PKL = "tuner.pkl"
RECORD_KEY = "resume_trust"


class SweepTrustError(ValueError):
    """A sweep folder that --resume does not unpickle; one line saying why."""


def state_file(storage: Path, name: str) -> Path:
    return storage / f"{name}.sweep.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _identity(folder: Path) -> dict:
    st = os.lstat(folder)
    experiment = folder / TUNER_PKL
    return {"device": st.st_dev, "inode": st.st_ino, "tuner_sha256": _sha256(experiment)}


def record(storage: Path, name: str) -> None:
    """Write the experiment folder's identity into its state file (after Tune wrote tuner.pkl)."""
    path = state_file(storage, name)
    state = json.loads(path.read_text()) if path.is_file() else {"name": name}
    state[RECORD_KEY] = _identity(storage / name)
    write_json_atomic(path, state, indent=2)


def _unsafe(path: Path, st: os.stat_result) -> str | None:
    """Why a file or folder could hold what another user put there, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & stat.S_IWOTH:
        return "is writable by every user"
    if st.st_mode & stat.S_IWGRP and st.st_gid != os.getgid():
        return f"is writable by group {st.st_gid}, not this user's own group"
    return None


def _walk(folder: Path):
    """Every path under folder (folders first), without following links."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            yield Path(root) / name


def check(storage: Path, name: str) -> None:
    """SweepTrustError (one line) unless the sweep folder storage/name may be resumed."""
    folder, path = storage / name, state_file(storage, name)
    hint = (
        "Ray Tune unpickles files of a sweep folder on --resume (code could run); only sweeps "
        "this driver started are resumed (see sweeps/resume_trust.py)"
    )
    for p in (storage, path, folder):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise SweepTrustError(f"{p}: missing; nothing to resume") from None
        reason = _unsafe(p, st)
        if reason:
            raise SweepTrustError(f"{p}: {reason}; refused. {hint}")
    try:
        recorded = json.loads(path.read_text()).get(RECORD_KEY)
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise SweepTrustError(
            f"{folder}: no record that this driver created it ({path} has none); refused. "
            f"{hint}; to resume one you trust: python -m sweeps.resume_trust {storage} {name}"
        )
    for p in _walk(folder):
        reason = _unsafe(p, os.lstat(p))
        if reason:
            raise SweepTrustError(f"{p}: {reason}; refused. {hint}")
    try:
        now = _identity(folder)
    except FileNotFoundError:
        raise SweepTrustError(f"{folder / TUNER_PKL}: missing; nothing to resume") from None
    if (now["device"], now["inode"]) != (recorded.get("device"), recorded.get("inode")):
        raise SweepTrustError(
            f"{folder}: not the folder this driver created (another inode: copied or replaced); "
            f"refused. {hint}"
        )
    if now["tuner_sha256"] != recorded.get("tuner_sha256"):
        raise SweepTrustError(
            f"{folder / TUNER_PKL}: changed since the sweep started (its sha256 differs from the "
            f"one recorded in {path}); refused. {hint}"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m sweeps.resume_trust STORAGE NAME  (records the sweep folder "
              "STORAGE/NAME as one this user trusts)", file=sys.stderr)  # fmt: skip
        return 2
    storage = Path(argv[0]).resolve()
    try:
        record(storage, argv[1])
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"recorded {storage / argv[1]} as a sweep this user trusts; --resume will take it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
