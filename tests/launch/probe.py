"""Run a command as the issue's probes do: its exit status, its output, its peak memory (the
largest resident set of it and its descendants) and its wall time; and hostile inputs for them.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from tests.launch.train_utils import env

# Runs the command, then writes the peak resident set (kB) of its process tree to argv[1].
_WRAP = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(rc)\n"
)


@dataclass
class Probe:
    returncode: int
    stdout: str
    stderr: str
    peak_mb: float
    seconds: float

    @property
    def lines(self) -> list[str]:
        """Every non-empty line the command printed, stdout and stderr."""
        return [ln for ln in (self.stdout + "\n" + self.stderr).splitlines() if ln.strip()]

    def one_refusal(self) -> str:
        """Assert the probe's goal: exit 2, one `error:` line and at most two more (a hint),
        no traceback; returns the error line."""
        text = f"rc={self.returncode}\n{self.stdout[-3000:]}\n{self.stderr[-5000:]}"
        assert self.returncode == 2, text
        assert "Traceback" not in self.stderr, text
        errors = [ln for ln in self.lines if ln.startswith("error:")]
        assert len(errors) == 1, text
        assert len(self.lines) <= 3, text
        return errors[0]


def probe(cmd: list[str], cwd: Path, timeout: float = 120, **extra_env: str) -> Probe:
    peak = cwd / f".peak-{time.monotonic_ns()}"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _WRAP, str(peak), *cmd],
        cwd=cwd,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.monotonic() - t0
    kb = int(peak.read_text()) if peak.is_file() else 0
    peak.unlink(missing_ok=True)
    return Probe(proc.returncode, proc.stdout, proc.stderr, kb / 1024, seconds)


def alias_bomb(levels: int = 9, flow: bool = False) -> str:
    """YAML whose last anchor expands to 10**levels strings through nested aliases."""
    items = [("a0", "[" + ", ".join(["lol"] * 10) + "]")]
    for i in range(1, levels + 1):
        items.append((f"a{i}", "[" + ", ".join([f"*a{i - 1}"] * 10) + "]"))
    if flow:
        return "{" + ", ".join(f"{k}: &{k} {v}" for k, v in items) + "}"
    return "".join(f"{k}: &{k} {v}\n" for k, v in items)


def shared_graph(levels: int = 9) -> list:
    """A list that holds 10**levels strings when expanded, 10 * levels objects in memory."""
    node: list = ["lol"] * 10
    for _ in range(levels):
        node = [node] * 10
    return node


def huge_png(path: Path, width: int = 30000, height: int = 30000) -> None:
    """A valid grey PNG of width x height zero pixels, under 1 MB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    z = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    parts = [z.compress(row) for _ in range(height)]
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )  # fmt: skip
