"""Reading torch.save files that may come from anyone: `torch.load(weights_only=True)` only,
and its failures said in one line.

torch's own refusal runs to a dozen lines and advises re-running with `weights_only=False`,
which would run whatever code the pickle names; that advice is never passed on here.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch


class TorchFileError(ValueError):
    """A torch file that is unsafe (pickled objects) or unreadable; one line naming the file.
    `refused`: torch's weights-only unpickler refused it; `reason`: why, in a few words."""

    def __init__(self, path: str | os.PathLike, reason: str, refused: bool) -> None:
        what = "refused by torch.load(weights_only=True)" if refused else "unreadable"
        super().__init__(f"{path}: {what}: {reason}")
        self.reason, self.refused = reason, refused


def refusal_reason(error: BaseException) -> str:
    """What torch's weights-only unpickler refused, in a few words (no advice)."""
    text = str(error)
    found = re.search(r"GLOBAL (\S+)", text) or re.search(r"Unsupported global: (\S+)", text)
    if found:
        return f"it pickles {found.group(1)}, which is not a tensor type and could run code"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"pickle opcode {found.group(1)} is not allowed (not a weights-only torch file)"
    return "it holds pickled objects other than tensors and plain values"


def load_tensors(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load(path, weights_only=True); TorchFileError in one line otherwise: refused
    (pickled objects) or unreadable (not a torch file, truncated)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise TorchFileError(path, refusal_reason(e), refused=True) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
        raise TorchFileError(path, f"not a torch.save file ({first})", refused=False) from None
