"""ImageNet ResNet weights for the backbone: a catalogue, a checked download and key conversion.

    python -m cdgcnet.weights list
    python -m cdgcnet.weights fetch torchvision-resnet101-v1 --out weights
    python -m cdgcnet.weights fetch mmseg-resnet101-v1c --out weights --url file:///mirror/resnet101_v1c-e67eebb6.pth
    python -m cdgcnet.weights convert resnet101c.pth --from timm --out weights/r101c.safetensors

`fetch` downloads to `<out>/<file>.partial` with a progress line on stderr, checks the file's
sha256 against the catalogue, converts the tensors to this backbone's key layout, checks them
against a DilatedResNet of the entry's depth and stem, writes `<out>/<name>.safetensors`
(temporary name + rename) and prints the `model.pretrained=...` override. A download that fails
its hash or is cut short stays under its `.partial` name and is never converted or used.

Stems, and which weights go with which model:
- 7x7 stem (`model.deep_stem=false`, the default): torchvision's ResNet, one 7x7 conv + BN.
  Weights: torchvision V1/V2 and timm's `resnet50`/`resnet101`, whose key names are
  torchvision's (they load as they are).
- deep stem (`model.deep_stem=true`, "ResNet-v1c"): three 3x3 convs (3->32->32->64) with BN,
  as in mmsegmentation's ResNetV1c. Weights: mmsegmentation's `open-mmlab://resnet101_v1c`
  (same names as this backbone: stem.0 ... stem.7) and timm's `resnet101c` (Gluon v1c), whose
  stem is renamed here (conv1.0/1/3/4/6 + bn1 -> stem.0/1/3/4/6 + stem.7).
- timm's `resnet50d`/`resnet101d` (ResNet-D: deep stem + avg-down downsample) are a different
  architecture (an AvgPool before each strided 1x1 shortcut conv) and are refused.
Every catalogue file is a ResNet v1.5 (stride on the 3x3 conv of the bottleneck), as this
backbone. The paper says only "ImageNet pretrained ResNet-101"; the paper presets use the
7x7 stem, and the recommended file for them is torchvision's V1 ResNet-101 (the original
recipe, closest to what was common in 2020).

Hashes: each file's name carries the first hex digits of its sha256 (torchvision,
OpenMMLab's publish script and timm's checkpoint tools all name files that way); the check is
the one torch.hub's `check_hash` does, a prefix compare. No full sha256 is listed where it
could not be verified. The converted file records the full sha256 of the download.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import struct
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cdgcnet.config import FROM_SCRATCH
from cdgcnet.pretrained import (
    AVG_DOWN_REASON,
    Architecture,
    PretrainedWeightsError,
    architecture,
    architecture_mismatch,
    fit_problems,
    read_state_dict,
    remap_keys,
)

FORMATS = ("torchvision", "timm", "mmseg")
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's HASH_REGEX
_CHUNK = 1 << 20


class WeightsError(ValueError):
    """A bad name, download or file; the message names it and the reason."""


@dataclass(frozen=True)
class Checkpoint:
    """One known ImageNet checkpoint."""

    name: str
    url: str
    format: str
    """Key layout of the file: "torchvision" | "timm" | "mmseg"."""
    depth: int
    stem: str
    """"7x7" | "deep" (see the module docstring)."""
    origin: str
    """Where the file is published and under which name."""
    sha256: str | None = None
    """Full sha256 when verified; None: only the prefix in the file name is checked."""

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def expected(self) -> tuple[str, str]:
        """(kind of check, expected hex digits)."""
        if self.sha256:
            return "sha256", self.sha256
        m = _HASH_IN_NAME.search(self.file_name)
        assert m, self.file_name  # every entry's name carries one
        return "sha256 prefix from the file name", m.group(1)

    @property
    def architecture(self) -> Architecture:
        return Architecture(self.depth, self.stem, avg_down=False)


_TV = "https://download.pytorch.org/models/"
_MM = "https://download.openmmlab.com/pretrain/third_party/"
_RSB = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights/"
_GLUON = "https://github.com/rwightman/pytorch-pretrained-gluonresnet/releases/download/v0.1/"

CATALOGUE: dict[str, Checkpoint] = {
    c.name: c
    for c in (
        Checkpoint("torchvision-resnet50-v1", _TV + "resnet50-0676ba61.pth", "torchvision", 50,
                   "7x7", "torchvision ResNet50_Weights.IMAGENET1K_V1"),
        Checkpoint("torchvision-resnet50-v2", _TV + "resnet50-11ad3fa6.pth", "torchvision", 50,
                   "7x7", "torchvision ResNet50_Weights.IMAGENET1K_V2 (new recipe)"),
        Checkpoint("torchvision-resnet101-v1", _TV + "resnet101-63fe2227.pth", "torchvision",
                   101, "7x7", "torchvision ResNet101_Weights.IMAGENET1K_V1"),
        Checkpoint("torchvision-resnet101-v2", _TV + "resnet101-cd907fc2.pth", "torchvision",
                   101, "7x7", "torchvision ResNet101_Weights.IMAGENET1K_V2 (new recipe)"),
        Checkpoint("mmseg-resnet50-v1c", _MM + "resnet50_v1c-2cccc1ad.pth", "mmseg", 50, "deep",
                   "mmsegmentation open-mmlab://resnet50_v1c"),
        Checkpoint("mmseg-resnet101-v1c", _MM + "resnet101_v1c-e67eebb6.pth", "mmseg", 101,
                   "deep", "mmsegmentation open-mmlab://resnet101_v1c"),
        Checkpoint("timm-resnet50-a1", _RSB + "resnet50_a1_0-14fe96d1.pth", "timm", 50, "7x7",
                   "timm resnet50.a1_in1k (ResNet strikes back A1)"),
        Checkpoint("timm-resnet101-a1h", _RSB + "resnet101_a1h-36d3f2aa.pth", "timm", 101, "7x7",
                   "timm resnet101.a1h_in1k (ResNet strikes back A1h)"),
        Checkpoint("timm-resnet50c-gluon", _GLUON + "gluon_resnet50_v1c-48092f55.pth", "timm",
                   50, "deep", "timm resnet50c.gluon_in1k (Gluon ResNet50_v1c)"),
        Checkpoint("timm-resnet101c-gluon", _GLUON + "gluon_resnet101_v1c-1f26822a.pth", "timm",
                   101, "deep", "timm resnet101c.gluon_in1k (Gluon ResNet101_v1c)"),
    )
}  # fmt: skip

_RESNET_D = (
    "a ResNet-D (deep stem + avg-down downsample): " + AVG_DOWN_REASON + "; for a deep stem use "
    "mmseg-resnet101-v1c or timm-resnet101c-gluon"
)
REFUSED: dict[str, str] = {
    "timm-resnet50d": f"timm resnet50d is {_RESNET_D}",
    "timm-resnet101d": f"timm resnet101d is {_RESNET_D}",
}

# (depth, stem) -> the file the paper presets recommend for that backbone.
RECOMMENDED = {
    (50, "7x7"): "torchvision-resnet50-v1",
    (101, "7x7"): "torchvision-resnet101-v1",
    (50, "deep"): "mmseg-resnet50-v1c",
    (101, "deep"): "mmseg-resnet101-v1c",
}


def recommended(depth: int, deep_stem: bool) -> str | None:
    """Catalogue name of the recommended ImageNet file for a backbone, None when none is known."""
    return RECOMMENDED.get((depth, "deep" if deep_stem else "7x7"))


def lookup(name: str) -> Checkpoint:
    if name in CATALOGUE:
        return CATALOGUE[name]
    if name in REFUSED:
        raise WeightsError(f"{name}: refused: {REFUSED[name]}")
    raise WeightsError(f"unknown weights {name!r}; known: {', '.join(CATALOGUE)}")


# ---------------------------------------------------------------- key conversion

# timm's deep stem: conv1 = Sequential(conv, BN, ReLU, conv, BN, ReLU, conv), then bn1.
_TIMM_DEEP_STEM = {f"conv1.{i}.": f"stem.{i}." for i in (0, 1, 3, 4, 6)} | {"bn1.": "stem.7."}


def convert_state(state: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """A state dict of format `fmt` in this backbone's key layout (prefixes and fc dropped).

    torchvision and mmseg names are this backbone's already; timm's are too except its deep
    stem. An avg-down (ResNet-D) file is refused."""
    if fmt not in FORMATS:
        raise WeightsError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    state = remap_keys(state)
    arch = architecture(state)
    if arch.avg_down:
        raise WeightsError(f"refused: the file is a {arch}: {AVG_DOWN_REASON}")
    if fmt == "timm" and "conv1.0.weight" in state:
        state = {_rename_timm_stem(k): v for k, v in state.items()}
    return state


def _rename_timm_stem(key: str) -> str:
    for old, new in _TIMM_DEEP_STEM.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def check_backbone_state(
    state: dict[str, Tensor], source: str, want: Architecture | None = None
) -> Architecture:
    """The architecture of a converted state dict, after checking that it fits a DilatedResNet
    of that depth and stem key for key and shape for shape (and is `want`, when given)."""
    from cdgcnet.backbone import DilatedResNet

    found = architecture(state)
    if want is not None:
        reason = architecture_mismatch(found, want)
        if reason:
            raise WeightsError(f"{source}: {reason}")
    if found.depth is None or found.stem is None:
        raise WeightsError(
            f"{source}: not a ResNet-18/34/50/101 state dict in a known layout ({found}); "
            f"first keys: {list(state)[:5]}"
        )
    if found.depth not in (18, 34, 50, 101):
        raise WeightsError(f"{source}: a {found}; this backbone has depths 18, 34, 50, 101")
    with torch.device("meta"):  # shapes only, no memory, no init cost
        model = DilatedResNet(found.depth, deep_stem=found.stem == "deep")
    problems = fit_problems(state, model.state_dict())
    if problems:
        raise WeightsError(f"{source}: does not fit a {found} backbone: " + "; ".join(problems))
    return found


# ---------------------------------------------------------------- files


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_safetensors(state: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write atomically: a temporary name in the same folder, then a rename."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        _normal_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _normal_mode(path: Path) -> None:
    """The permissions of a file made with open() (0666 less the umask): safetensors creates its
    files 0600, which other users of a shared weights folder could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a .safetensors header ({} for other or unreadable files; the loader
    names those). Reads the header alone: 8 bytes of length, then JSON."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(n, _CHUNK * 100)))
        meta = header.get("__metadata__") or {}
    except (OSError, struct.error, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def mismatch(pretrained: str | Path, depth: int, deep_stem: bool) -> str | None:
    """Why a file written by fetch/convert cannot serve a ResNet of `depth` and stem, from the
    depth and stem recorded in its header (None: it fits, or the file records neither)."""
    meta = read_metadata(pretrained)
    if not meta.get("depth", "").isdigit() or meta.get("stem") not in ("7x7", "deep"):
        return None
    found = Architecture(int(meta["depth"]), meta["stem"], avg_down=False)
    return architecture_mismatch(found, Architecture(depth, "deep" if deep_stem else "7x7", False))


def provenance(pretrained: str | None) -> dict[str, str]:
    """{"sha256", "source"} of a model.pretrained value, for run records.

    source: the catalogue name (files written by fetch), "convert:<file> (<format>)" (files
    written by convert), else the file name; "none" values say why there are no weights."""
    if pretrained is None:
        return {"sha256": "none", "source": "none (model.pretrained not set: random init)"}
    if pretrained == FROM_SCRATCH:
        return {"sha256": "none", "source": "none (model.pretrained=none: from scratch on purpose)"}
    path = Path(pretrained)
    if not path.is_file():
        return {"sha256": "unavailable (file not found)", "source": path.name}
    meta = read_metadata(path)
    return {"sha256": sha256_file(path), "source": meta.get("source", path.name)}


# ---------------------------------------------------------------- download


def _progress(label: str, done: int, total: int | None, end: str = "") -> None:
    size = f"{done / 1e6:.1f} MB"
    if total:
        size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB ({100 * done / total:.0f}%)"
    print(f"\r{label}: {size}", end=end, file=sys.stderr, flush=True)


def download(url: str, partial: Path, label: str) -> str:
    """Stream `url` into `partial` (replaced) with a progress line on stderr (updated in place on
    a terminal, once at the end otherwise); the sha256 of what arrived. A body shorter than its
    Content-Length is an error naming both sizes."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    if partial.exists():  # a leftover of an earlier attempt is never reported as ours
        size = partial.stat().st_size / 1e6
        print(f"removing {partial} ({size:.1f} MB), left by an earlier attempt", file=sys.stderr)
        partial.unlink()
    live = sys.stderr.isatty()
    h, done, total, last = hashlib.sha256(), 0, None, 0.0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "cdgcnet-weights"})
        with urllib.request.urlopen(request, timeout=60) as response, open(partial, "wb") as f:
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if live and time.monotonic() - last > 0.2:
                    _progress(label, done, total)
                    last = time.monotonic()
    except KeyboardInterrupt:
        if partial.exists():
            print(f"\ninterrupted; what arrived is kept as {partial}", file=sys.stderr)
        raise
    except http.client.IncompleteRead:
        pass  # the connection closed early: named below (done < total), or by the hash check
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        kept = f"; what arrived is kept as {partial}" if partial.exists() else ""
        raise WeightsError(f"{url}: download failed: {reason}{kept}") from e
    _progress(label, done, total, end="\n")
    if total is not None and done != total:
        raise WeightsError(
            f"{url}: truncated download: {done} of {total} bytes arrived; the partial file is "
            f"kept as {partial} and not used"
        )
    return h.hexdigest()


def fetch(entry: Checkpoint, out_dir: str | Path, url: str | None = None) -> Path:
    """Download, check, convert and write `<out_dir>/<entry.name>.safetensors`; its path."""
    out_dir = Path(out_dir)
    url = url or entry.url
    partial = out_dir / f"{entry.file_name}.partial"
    digest = download(url, partial, entry.file_name)
    kind, expected = entry.expected
    if not digest.startswith(expected):
        raise WeightsError(
            f"{url}: hash mismatch: sha256 {digest} does not match the expected {kind} "
            f"{expected} of {entry.name}; the download is kept as {partial} and not used"
        )
    verified = out_dir / entry.file_name
    os.replace(partial, verified)
    try:
        state = convert_state(read_state_dict(verified), entry.format)
        check_backbone_state(state, f"{url} ({entry.name})", want=entry.architecture)
    except (WeightsError, PretrainedWeightsError) as e:
        raise WeightsError(
            f"{e} (the download passed its hash check and is kept as {verified})"
        ) from e
    out = out_dir / f"{entry.name}.safetensors"
    metadata = {
        "source": entry.name,
        "source_url": url,
        "source_sha256": digest,
        "format": entry.format,
        "depth": str(entry.depth),
        "stem": entry.stem,
    }
    write_safetensors(state, out, metadata)
    verified.unlink()
    return out


def convert_file(src: str | Path, fmt: str, dst: str | Path) -> tuple[Path, Architecture]:
    """Convert a file the user has; writes `dst` (.safetensors) atomically."""
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise WeightsError(f"{dst}: the output must be a .safetensors file")
    state = convert_state(read_state_dict(src), fmt)
    found = check_backbone_state(state, str(src))
    metadata = {
        "source": f"convert:{src.name} ({fmt})",
        "source_sha256": sha256_file(src),
        "format": fmt,
        "depth": str(found.depth),
        "stem": str(found.stem),
    }
    write_safetensors(state, dst, metadata)
    return dst, found


def override(path: Path, arch: Architecture) -> str:
    """The key=value overrides that train a backbone from `path` (absolute: sweep trials run in
    their own working directories); depth and stem only where they differ from the defaults."""
    parts = [f"model.pretrained={path.resolve()}"]
    if arch.depth != 101:
        parts.append(f"model.depth={arch.depth}")
    if arch.stem == "deep":
        parts.append("model.deep_stem=true")
    return " ".join(parts)


# ---------------------------------------------------------------- CLI


def _list(as_json: bool) -> None:
    rows = []
    for c in CATALOGUE.values():
        kind, digits = c.expected
        rows.append({"name": c.name, "depth": c.depth, "stem": c.stem, "format": c.format,
                     "check": kind, "expected": digits, "url": c.url, "origin": c.origin,
                     "recommended": RECOMMENDED.get((c.depth, c.stem)) == c.name})  # fmt: skip
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        print(f"{r['name']:24} ResNet-{r['depth']:<4} {r['stem']:4} stem  {r['format']:11} "
              f"{r['check']}: {r['expected']}")  # fmt: skip
        mark = (
            f" (recommended for ResNet-{r['depth']}, {r['stem']} stem)" if r["recommended"] else ""
        )
        print(f"{'':24} {r['url']}\n{'':24} {r['origin']}{mark}")
    for name, why in REFUSED.items():
        print(f"{name:24} refused: {why}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cdgcnet.weights",
        description="ImageNet ResNet weights for the CDGCNet backbone: list, fetch, convert.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="the known checkpoints, their hashes and stems")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_fetch = sub.add_parser("fetch", help="download, check, convert one catalogue entry")
    p_fetch.add_argument("name", help="a name from `list`")
    p_fetch.add_argument("--out", default="weights", help="output folder (default weights/)")
    p_fetch.add_argument("--url", help="a mirror or file:// copy of the same file")
    p_conv = sub.add_parser("convert", help="convert a file you already have")
    p_conv.add_argument("src", help=".pth/.pt/.safetensors state dict")
    p_conv.add_argument("--from", dest="fmt", required=True, choices=FORMATS)
    p_conv.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            _list(args.json)
            return 0
        if args.command == "fetch":
            entry = lookup(args.name)
            path = fetch(entry, args.out, args.url)
            arch = entry.architecture
        else:
            path, arch = convert_file(args.src, args.fmt, args.out)
    except (WeightsError, PretrainedWeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {path} ({arch}); train with:")
    print(f"  {override(path, arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
