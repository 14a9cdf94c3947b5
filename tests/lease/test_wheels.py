"""lease/wheels.py: a carried wheel is installed only where its package is missing or older, two
wheels of one package are refused, and every carried package is pinned in constraints.txt."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from lease.wheels import (
    WHEEL_PACKAGES,
    _constraint_pins,
    install_wheels,
    plan_wheels,
    prepare_wheels,
)


def _wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal valid pure-Python wheel."""
    dist = f"{name}-{version}.dist-info"
    members = dict(files)
    members[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    members[f"{dist}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, text in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    members[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in members.items():
            z.writestr(member, text)
    return path


def test_wheels_are_installed_only_where_missing_or_older(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    have = metadata.version("tqdm")
    missing = _wheel(wheels, "lease_probe", "1.0", {"lease_probe/__init__.py": "VALUE = 42\n"})
    _wheel(wheels, "tqdm", have, {})  # present at the same version: kept
    _wheel(wheels, "packaging", "0.1", {})  # present and newer than the wheel: kept
    newer = _wheel(wheels, "PyYAML", "999.0", {})  # present but older than the wheel
    install, kept = plan_wheels(wheels)
    assert set(install) == {missing, newer}
    assert set(kept) == {"tqdm", "packaging"}
    assert kept["tqdm"] == f"present ({have} >= {have})"

    site = tmp_path / "site"
    install_wheels([missing], site)
    env = dict(os.environ, PYTHONPATH=str(site))
    probe = [sys.executable, "-c", "import lease_probe; print(lease_probe.VALUE)"]
    assert subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip() == "42"


def test_two_wheels_of_one_package_are_refused(tmp_path: Path) -> None:
    _wheel(tmp_path, "lease_probe", "1.0", {})
    _wheel(tmp_path, "Lease_Probe", "1.1", {})  # the same package, spelled otherwise
    with pytest.raises(SystemExit, match="two wheels of lease-probe"):
        plan_wheels(tmp_path)


def test_missing_wheel_folder_says_how_to_build_it(tmp_path: Path) -> None:
    info = prepare_wheels(tmp_path / "absent", tmp_path / "site")
    assert "make gpu-wheels" in info["status"] and info["site"] is None


def test_every_carried_package_is_pinned() -> None:
    pins = _constraint_pins(WHEEL_PACKAGES)
    assert len(pins) == len(WHEEL_PACKAGES)
    assert all("==" in p for p in pins)
