"""`--resume` unpickles a sweep folder only when this driver created it and no other user can
have written it: the trust boundary of sweeps/resume_trust.py."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps import resume_trust
from sweeps.resume_trust import SweepTrustError, check, record

REPO = Path(__file__).resolve().parents[2]


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sweep(tmp_path: Path, name: str = "s1") -> Path:
    """A sweep folder as a driver leaves it: tuner.pkl, Tune's state, a trial, the state file
    with the record."""
    storage = tmp_path / "sweeps"
    folder = storage / name
    (folder / "trial_0").mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(pickle.dumps({"tuner": "state"}))
    (folder / "experiment_state-2026.json").write_text("{}")
    (folder / "trial_0" / "result.json").write_text("{}")
    (storage / f"{name}.sweep.json").write_text(json.dumps({"parent_run_id": "r", "name": name}))
    record(storage, name)
    return storage


def test_a_sweep_this_driver_created_may_be_resumed(tmp_path) -> None:
    storage = _sweep(tmp_path)
    check(storage, "s1")
    state = json.loads((storage / "s1.sweep.json").read_text())
    assert state["parent_run_id"] == "r" and len(state["resume_trust"]["tuner_sha256"]) == 64


def test_a_planted_tuner_pkl_is_refused(tmp_path) -> None:
    storage = _sweep(tmp_path)
    (storage / "s1" / "tuner.pkl").write_bytes(pickle.dumps(Payload(tmp_path / "PWNED")))
    with pytest.raises(SweepTrustError, match=r"tuner\.pkl: changed since the sweep started"):
        check(storage, "s1")


def test_a_folder_it_did_not_create_is_refused(tmp_path) -> None:
    storage = _sweep(tmp_path)
    shutil.copytree(storage / "s1", tmp_path / "copy")
    shutil.rmtree(storage / "s1")
    (tmp_path / "copy").rename(storage / "s1")  # same content, another folder
    with pytest.raises(SweepTrustError, match="not the folder this driver created"):
        check(storage, "s1")
    (storage / "s2").mkdir()
    (storage / "s2" / "tuner.pkl").write_bytes(b"x")
    (storage / "s2.sweep.json").write_text("{}")  # a state file without the record
    with pytest.raises(SweepTrustError, match=r"no record that this driver created it"):
        check(storage, "s2")


@pytest.mark.parametrize("where", ["trial_0/result.json", "trial_0", "s1.sweep.json"])
def test_files_other_users_could_write_are_refused(tmp_path, where) -> None:
    storage = _sweep(tmp_path)
    path = storage / where if where.endswith("sweep.json") else storage / "s1" / where
    path.chmod(path.stat().st_mode | 0o002)
    with pytest.raises(SweepTrustError, match=rf"{path.name}: is writable by every user"):
        check(storage, "s1")


def test_links_are_refused(tmp_path) -> None:
    storage = _sweep(tmp_path)
    (storage / "s1" / "trial_0" / "error.pkl").symlink_to(tmp_path / "elsewhere.pkl")
    with pytest.raises(SweepTrustError, match=r"error\.pkl: is a symbolic link"):
        check(storage, "s1")


@pytest.mark.skipif(os.getuid() != 0, reason="changing a file's owner needs root")
def test_files_of_another_user_are_refused(tmp_path) -> None:
    storage = _sweep(tmp_path)
    os.chown(storage / "s1" / "experiment_state-2026.json", 12345, -1)
    with pytest.raises(SweepTrustError, match="is owned by uid 12345, not by this user"):
        check(storage, "s1")


def test_recording_a_folder_by_hand_lets_it_resume(tmp_path) -> None:
    storage = _sweep(tmp_path)
    (storage / "s1" / "tuner.pkl").write_bytes(pickle.dumps({"read": "and trusted"}))
    with pytest.raises(SweepTrustError):
        check(storage, "s1")
    assert resume_trust.main([str(storage), "s1"]) == 0
    check(storage, "s1")


def test_ratio_sweep_resume_of_a_planted_folder_is_one_line_and_runs_nothing(tmp_path) -> None:
    """The probe: `ratio_sweep.py --resume` on a folder whose tuner.pkl was planted. Refused
    before any MLflow server or Ray starts; the payload never runs."""
    storage = _sweep(tmp_path)
    marker = tmp_path / "PWNED"
    (storage / "s1" / "tuner.pkl").write_bytes(pickle.dumps(Payload(marker)))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sweeps.ratio_sweep", "--config", "scenes",
         "--storage", str(storage), "--name", "s1", "--resume"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {storage / 's1' / 'tuner.pkl'}: ")
    assert "Traceback" not in proc.stderr and not marker.exists()
    assert time.monotonic() - t0 < 30
