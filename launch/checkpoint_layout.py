"""What a run's `checkpoints/` folder may hold, read without trusting it: tag names, the content
of a COMPLETE marker, entries no save wrote, and a cheap check that a checkpoint's files still
have their recorded sizes. launch.checkpoint saves, verifies and loads; this reads names.

    checkpoints/iter_00000100/            a tag (`tag_for`, `parse_tag`)
    checkpoints/iter_00000100/COMPLETE    JSON: iteration, world_size, files {name: size, sha256}
    checkpoints/universal/                the world-size conversion's output
    checkpoints/zero_to_fp32.py, ...      DeepSpeed's own scripts beside its saves (DEEPSPEED_FILES)
    anything else                         not ours: named once in a warning, never touched
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from launch.bounded import quote

PREFIX = "iter_"
UNIVERSAL = "universal"
MAX_MARKER_BYTES = 64 << 20
"""A marker lists every file of a checkpoint (about 150 bytes each)."""
_TAG = re.compile(rf"^{PREFIX}(\d{{1,18}})$")
DEEPSPEED_FILES = frozenset({"zero_to_fp32.py", "zero_to_torch.py", "latest", "latest_universal"})


def parse_tag(name: str) -> int | None:
    """The iteration of a tag name written by `tag_for` (iter_00000100 -> 100), else None."""
    m = _TAG.match(name)
    return int(m.group(1)) if m else None


_warned_unknown: set[str] = set()


def warn_unknown_entries(root: Path) -> None:
    """One warning per run and process naming what in a run's checkpoints/ no save wrote (a
    stray iter_backup/, a note): ignored, never removed."""
    if str(root) in _warned_unknown or not root.is_dir():
        return
    unknown = sorted(
        d.name
        for d in root.iterdir()
        if not (d.is_dir() and (parse_tag(d.name) is not None or d.name == UNIVERSAL))
        and not (d.is_file() and d.name in DEEPSPEED_FILES)
    )
    if unknown:
        _warned_unknown.add(str(root))
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        print(
            f"warning: ignoring {len(unknown)} entr{'y' if len(unknown) == 1 else 'ies'} in "
            f"{root} that no checkpoint save wrote ({', '.join(unknown[:3])}{more}); they are "
            "left as they are",
            file=sys.stderr,
            flush=True,
        )


def marker_problem(meta: object) -> str | None:
    """What is wrong with a marker's content (None: it is what a save writes)."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key, least in (("iteration", 0), ("world_size", 1)):
        v = meta.get(key)
        bad = isinstance(v, bool) or not isinstance(v, int) or v < least
        if bad and (key in meta or key == "iteration"):
            return f"{key} must be an integer >= {least}, got {quote(v)}"
    files = meta.get("files")
    if files is not None and not (
        isinstance(files, dict)
        and all(
            isinstance(r, dict)
            and isinstance(r.get("size"), int)
            and isinstance(r.get("sha256"), str)
            for r in files.values()
        )
    ):
        return "its files are not a mapping of names to size and sha256"
    return None


def sizes_match(tag_dir: Path, meta: dict, damaged: set[str]) -> bool:
    """Not known damaged, and every file the marker lists is there with its recorded size (a
    stat per file: the cheap part of verification)."""
    if tag_dir.name in damaged:
        return False
    try:
        files = meta.get("files") or {}
        return all((tag_dir / n).stat().st_size == r["size"] for n, r in files.items())
    except OSError:
        return False
