"""The wheels the lease carries to the GPU image, which lacks DeepSpeed, WebDataset and what they
need: built here with network (`python -m lease --build-wheels`, what `make gpu-wheels` runs)
for Python 3.12 / manylinux x86_64 at the versions of constraints.txt, into an ignored folder
that travels with the working tree; installed there, before the stages, with `pip install
--no-index --no-deps --target` into a temporary folder that goes first on the stages'
PYTHONPATH, each wheel only where its package is missing or older."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lease import ROOT

WHEEL_DIR = ROOT / ".whl"
# What the GPU image lacks for launch/ and pipeline/ (DeepSpeed, WebDataset and their needs),
# plus needs the image is listed with, as a fallback where it holds an older version or none.
# Versions come from constraints.txt.
WHEEL_PACKAGES = (
    "deepspeed", "webdataset", "braceexpand", "hjson", "pydantic", "pydantic_core",
    "annotated-types", "typing-inspection", "typing_extensions", "msgpack", "ninja", "psutil",
    "py-cpuinfo", "PyYAML", "tqdm", "packaging", "einops", "safetensors",
)  # fmt: skip
WHEEL_LIMIT_MB = 48.0  # of the 64 MiB the working tree may carry to the GPU machine
PIP_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def _dist_key(name: str) -> str:
    """PEP 503 normalised distribution name (wheel file names use '_' for '-')."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_tuple(text: str) -> tuple:
    """A comparable version; packaging's parser where present (it is on both machines)."""
    try:
        from packaging.version import Version

        return (Version(text),)
    except Exception:  # no packaging, or a version it rejects: compare the digits
        return tuple(int(p) for p in re.findall(r"\d+", text))


def plan_wheels(wheel_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """(wheels to install, {package: why not}) for the wheels in wheel_dir.

    A wheel is installed when its package is missing from this interpreter or older than the
    wheel; a package present at the same or a newer version is left alone. Two wheels of one
    package are refused (pip would stop the whole install).
    """
    from importlib import metadata

    wheels = sorted(wheel_dir.glob("*.whl"))
    by_name: dict[str, Path] = {}
    for w in wheels:
        parts = w.name.split("-")
        if len(parts) < 5:
            raise SystemExit(f"lease: {w}: not a wheel file name (name-version-...-tag.whl)")
        key = _dist_key(parts[0])
        if key in by_name:
            raise SystemExit(
                f"lease: {wheel_dir}: two wheels of {key}: {by_name[key].name}, {w.name}"
            )
        by_name[key] = w
    install, kept = [], {}
    for key, w in sorted(by_name.items()):
        wanted = w.name.split("-")[1]
        try:
            have = metadata.version(key)
        except metadata.PackageNotFoundError:
            install.append(w)
            continue
        try:
            newer = _version_tuple(have) >= _version_tuple(wanted)
        except TypeError:  # one parsed by packaging, the other not: take the wheel
            newer = False
        if newer:
            kept[key] = f"present ({have} >= {wanted})"
        else:
            install.append(w)
    return install, kept


def install_wheels(wheels: Sequence[Path], site: Path) -> None:
    """pip install --no-index --no-deps --target site: nothing is fetched, nothing resolved."""
    if not wheels:
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--disable-pip-version-check", "--target", str(site)]
    proc = subprocess.run([*cmd, *map(str, wheels)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"pip install --target {site} failed: {' | '.join(tail)}")


def prepare_wheels(wheel_dir: Path, site: Path) -> dict[str, Any]:
    """Install what is missing into site; returns the record for lease.json."""
    info: dict[str, Any] = {"wheel_dir": str(wheel_dir), "site": None}
    if not wheel_dir.is_dir():
        info["status"] = f"no wheel folder {wheel_dir} (run `make gpu-wheels` before the lease)"
        return info
    t0 = time.perf_counter()
    install, kept = plan_wheels(wheel_dir)
    info["kept"] = kept
    info["installed"] = [w.name for w in install]
    if install:
        install_wheels(install, site)
        info["site"] = str(site)
        info["status"] = f"installed {len(install)} wheel(s)"
    else:
        info["status"] = "skipped: every package present"
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return info


def _constraint_pins(names: Sequence[str]) -> list[str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_dist_key(name)] = f"{name}=={version.strip()}"
    missing = [n for n in names if _dist_key(n) not in pins]
    if missing:
        raise SystemExit(f"lease: constraints.txt pins no version of {missing}")
    return [pins[_dist_key(n)] for n in names]


def build_wheels(dest: Path) -> int:
    """Wheels for Python 3.12 / manylinux x86_64 (the GPU image) into dest, replacing it."""
    pins = _constraint_pins(WHEEL_PACKAGES)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    binary = [p for p in pins if not p.startswith("deepspeed==")]
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    download = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    download += ["--implementation", "cp", "-d", str(tmp)]
    for plat in PIP_PLATFORMS:
        download += ["--platform", plat]
    subprocess.run([*download, *binary], check=True)
    # DeepSpeed ships an sdist only; without ops it builds into a pure-Python wheel (the ops
    # compile just in time where they are used, which ZeRO-2 with torch's SGD is not).
    ds_pin = next(p for p in pins if p.startswith("deepspeed=="))
    env = dict(os.environ, DS_BUILD_OPS="0")
    wheel = [*pip, "wheel", "--no-deps", "--no-cache-dir", "-w", str(tmp), ds_pin]
    subprocess.run(wheel, check=True, env=env)
    got = sorted(p.name for p in tmp.glob("*.whl"))
    if len(got) != len(pins):
        raise SystemExit(f"lease: expected {len(pins)} wheels, got {len(got)}: {got}")
    size_mb = sum(p.stat().st_size for p in tmp.glob("*.whl")) / 2**20
    if size_mb > WHEEL_LIMIT_MB:
        raise SystemExit(f"lease: wheels take {size_mb:.1f} MiB, over {WHEEL_LIMIT_MB} MiB")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    print(f"{len(got)} wheels, {size_mb:.1f} MiB in {dest}:")
    for name in got:
        print(f"  {name}")
    return 0
