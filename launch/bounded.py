"""Untrusted config text and values, read with bounded memory and quoted in bounded messages.

Every config this program reads comes through here: YAML/JSON config files, `key=value`
overrides on the command line, the `config.json` / `config.yaml` of a run directory, and the
config dict stored in a checkpoint or an exported `model.pt`. What can go wrong with them:

- A YAML alias bomb: a few kB of nested anchors (`&a`) and aliases (`*a`) that PyYAML builds
  as shared references and that expand to 10^9 elements as soon as anything walks or prints
  them. Anchors and aliases are refused (no config needs them).
- The same in a pickle: `torch.load(weights_only=True)` keeps the pickle's shared references, so
  a config dict in a checkpoint can be such a graph. `check_tree` walks any value counting every
  node it meets (a shared one once per path), and stops at `MAX_NODES`.
- Size: config text above `MAX_TEXT_BYTES`, nesting deeper than `MAX_DEPTH`, strings longer
  than `MAX_STRING` (and more than MAX_TEXT_BYTES characters in all), integers wider than 64 bits.
- Error messages: `quote` prints at most `QUOTE_CHARS` characters of a value, however large or
  shared it is (reprlib, with a bounded depth and item count).
"""

from __future__ import annotations

import json
import os
import reprlib
from pathlib import Path
from typing import Any

import yaml

MAX_TEXT_BYTES = 1 << 20
"""Bytes of one config file or override value (the resolved config is about 3 kB)."""
MAX_NODES = 10_000
"""Values (mappings, lists and scalars, counted along every path) in one config."""
MAX_DEPTH = 32
MAX_STRING = 65536
"""Characters of one string; all strings of a config together (counted along every path) are
held to MAX_TEXT_BYTES characters."""
QUOTE_CHARS = 80

_PLAIN = (str, int, float, bool, type(None))


class BoundsError(ValueError):
    """Config text or a config value over a bound, or using YAML anchors/aliases."""


class _Repr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, QUOTE_CHARS, QUOTE_CHARS
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = 6

    def repr_str(self, x: str, level: int) -> str:
        # A prefix (reprlib keeps both ends): the start of a value is what its author knows.
        text = repr(x[: self.maxstring])
        return text if len(x) <= self.maxstring else text[:-1] + "..." + text[-1]

    def repr_int(self, x: int, level: int) -> str:
        # repr() of a huge int is slow and refused past 4300 digits.
        return repr(x) if x.bit_length() <= 128 else f"<int of {x.bit_length()} bits>"


_REPR = _Repr()


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """A repr of `value` of at most `limit` characters, in time independent of its size."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a value whose repr fails must not hide the message it is in
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(message: str, limit: int = 400) -> str:
    """The first line of a message, at most `limit` characters."""
    lines = message.strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases before building anything."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            raise BoundsError(
                f"YAML anchors and aliases (&name, *name) are not accepted in a config "
                f"(line {mark.line + 1}, column {mark.column + 1})"
            )
        return super().compose_node(parent, index)


def _check_text(text: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise BoundsError(f"{size} bytes of config text, over the limit of {MAX_TEXT_BYTES}")


def load_yaml(text: str) -> Any:
    """yaml.safe_load without anchors or aliases, within the size bounds; BoundsError (one
    line) for any problem, syntax errors included."""
    _check_text(text)
    try:
        value = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass
    except BoundsError:
        raise
    except yaml.YAMLError as e:
        raise BoundsError(f"not valid YAML ({clip(str(e).replace(chr(10), ' '), 200)})") from None
    except RecursionError:
        raise BoundsError(f"nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # e.g. an integer literal of more than 4300 digits
        raise BoundsError(f"not valid YAML ({clip(str(e), 200)})") from None
    check_tree(value)
    return value


def load_json(text: str) -> Any:
    """json.loads within the size bounds; BoundsError (one line) for any problem."""
    _check_text(text)
    try:
        value = json.loads(text)
    except RecursionError:
        raise BoundsError(f"nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError, or a too long integer literal
        raise BoundsError(f"not valid JSON ({clip(str(e), 200)})") from None
    check_tree(value)
    return value


def read_text(path: str | os.PathLike) -> str:
    """A config file's text: a regular file of at most MAX_TEXT_BYTES, UTF-8. BoundsError
    otherwise (a FIFO or a device is refused without being opened for reading)."""
    path = Path(path)
    st = path.stat()
    if not path.is_file():
        raise BoundsError("not a regular file")
    if st.st_size > MAX_TEXT_BYTES:
        raise BoundsError(f"{st.st_size} bytes, over the limit of {MAX_TEXT_BYTES} for a config")
    with open(path, "rb") as f:
        raw = f.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise BoundsError(f"over the limit of {MAX_TEXT_BYTES} bytes for a config")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BoundsError(f"not UTF-8 text (byte {e.start})") from None


def load_file(path: str | os.PathLike) -> Any:
    """A .json file as JSON, anything else as YAML, through read_text and the loaders."""
    text = read_text(path)
    return load_json(text) if Path(path).suffix == ".json" else load_yaml(text)


def check_tree(value: Any) -> None:
    """Refuse a value that is not plain config data within the bounds: mappings with string
    keys, lists, tuples, strings, numbers, booleans and None; at most MAX_NODES values counted
    along every path (so a graph of shared references costs what it would cost expanded, up to
    the bound), MAX_DEPTH levels, MAX_STRING characters per string and MAX_TEXT_BYTES in all,
    64-bit integers."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    nodes = chars = 0
    while stack:
        v, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise BoundsError(
                f"more than {MAX_NODES} values (shared references are counted at every use)"
            )
        if depth > MAX_DEPTH:
            raise BoundsError(f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise BoundsError(f"a mapping key of type {type(k).__name__}")
                stack.append((k, depth + 1))
                stack.append((x, depth + 1))
        elif isinstance(v, (list, tuple)):
            stack.extend((x, depth + 1) for x in v[: MAX_NODES + 1])
        elif isinstance(v, str):
            if len(v) > MAX_STRING:
                raise BoundsError(
                    f"a string of {len(v)} characters (over {MAX_STRING}): {quote(v)}"
                )
            chars += len(v)
            if chars > MAX_TEXT_BYTES:
                raise BoundsError(
                    f"more than {MAX_TEXT_BYTES} characters of strings (shared ones are counted "
                    "at every use)"
                )
        elif isinstance(v, int) and not isinstance(v, bool):
            if v.bit_length() > 64:
                raise BoundsError(f"an integer wider than 64 bits: {quote(v)}")
        elif not isinstance(v, _PLAIN):
            raise BoundsError(f"a value of type {type(v).__name__}, not plain config data")
