"""The import blocker: MLflow and Ray are not on the bare GPU image, so every stage process (and
the trainer's child) runs with them made unimportable; the CPU dry run then fails where the GPU
image would. Call `hide_absent_packages()` before importing a stage or the trainer."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

ABSENT = ("mlflow", "ray")


class _Absent:
    """A meta-path finder that makes the named top-level packages unimportable."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU image)")
        return None


def hide_absent_packages() -> None:
    sys.meta_path.insert(0, _Absent(ABSENT))
