"""cdgcnet.weights: catalogue, checked download (file:// and a 127.0.0.1 HTTP server, never the
internet), key conversion per format against the real key names of each library (data/*.json,
written by data/make_resnet_keys.py), and every bad input named."""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cdgcnet import weights
from cdgcnet.backbone import DilatedResNet
from cdgcnet.pretrained import (
    Architecture,
    PretrainedWeightsError,
    load_pretrained_backbone,
    remap_keys,
)
from cdgcnet.weights import Checkpoint, WeightsError

DATA = Path(__file__).parent / "data"


def layout(name: str, device: str = "meta") -> dict[str, torch.Tensor]:
    """A state dict with the key names and shapes of data/<name>.json (meta: shapes only)."""
    keys = json.loads((DATA / f"{name}.json").read_text())["keys"]
    return {
        k: torch.empty(shape, device=device, dtype=torch.int64 if not shape else torch.float32)
        for k, shape in keys
    }


def _resnet18_file(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout ResNet-18 file (fc included) with random values; its tensors."""
    g = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in DilatedResNet(18).state_dict().items()
    }
    state["fc.weight"] = torch.randn(1000, 512, generator=g)
    state["fc.bias"] = torch.randn(1000, generator=g)
    torch.save(state, path)
    return state


def _entry(url: str, name: str = "test-resnet18") -> Checkpoint:
    return Checkpoint(name, url, "torchvision", 18, "7x7", "generated in the test")


def _hashed_copy(src: Path, folder: Path) -> Path:
    """src copied under a torch.hub-style name carrying its own sha256 prefix."""
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dst = folder / f"resnet18-{digest[:8]}.pth"
    dst.write_bytes(src.read_bytes())
    return dst


class _Server:
    """HTTP on 127.0.0.1: path -> bytes; paths in `truncate` send half the body under the full
    Content-Length and close."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        files, truncate = self.files, self.truncate

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in truncate else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


# ---------------------------------------------------------------- catalogue


def test_catalogue_entries_carry_a_hash_and_an_architecture():
    assert len(weights.CATALOGUE) == 10
    for name, c in weights.CATALOGUE.items():
        kind, digits = c.expected
        assert c.sha256 is None and kind == "sha256 prefix from the file name"
        assert len(digits) == 8 and c.file_name.endswith(f"-{digits}.pth"), name
        assert c.depth in (50, 101) and c.stem in ("7x7", "deep") and c.format in weights.FORMATS
        assert c.url.startswith("https://")
    assert weights.CATALOGUE["torchvision-resnet101-v1"].expected[1] == "63fe2227"
    assert weights.CATALOGUE["mmseg-resnet101-v1c"].stem == "deep"
    assert weights.recommended(101, deep_stem=False) == "torchvision-resnet101-v1"
    assert weights.recommended(101, deep_stem=True) == "mmseg-resnet101-v1c"
    assert weights.recommended(18, deep_stem=False) is None


def test_list_prints_every_entry_with_its_check(capsys):
    assert weights.main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(weights.CATALOGUE)
    r101 = rows[[r["name"] for r in rows].index("torchvision-resnet101-v1")]
    assert r101["url"] == "https://download.pytorch.org/models/resnet101-63fe2227.pth"
    assert (r101["depth"], r101["stem"], r101["expected"]) == (101, "7x7", "63fe2227")
    assert [r["name"] for r in rows if r["recommended"]] == sorted(
        weights.RECOMMENDED.values(), key=list(weights.CATALOGUE).index
    )
    assert weights.main(["list"]) == 0
    text = capsys.readouterr().out
    assert "timm-resnet101c-gluon" in text and "timm-resnet101d" in text and "refused" in text


def test_unknown_and_refused_names_from_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "cdgcnet.weights", "fetch", "resnet101-imagenet", "--out", "x"],
        cwd=Path(__file__).resolve().parents[2],  # this checkout's cdgcnet, not an installed one
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown weights 'resnet101-imagenet'; known: torchvision-resnet50-v1" in proc.stderr
    with pytest.raises(WeightsError, match=r"timm-resnet101d: refused: .*avg-down"):
        weights.lookup("timm-resnet101d")


# ---------------------------------------------------------------- key layouts per format


def test_key_lists_match_torchvision_parameter_counts():
    # torchvision's published num_params: resnet50 25_557_032, resnet101 44_549_160.
    for name, params in (
        ("torchvision_resnet50", 25_557_032),
        ("torchvision_resnet101", 44_549_160),
    ):
        state = layout(name)
        n = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))  # fmt: skip
        assert n == params, name


@pytest.mark.parametrize(
    ("name", "fmt", "depth", "stem"),
    [
        ("torchvision_resnet101", "torchvision", 101, "7x7"),
        ("torchvision_resnet50", "torchvision", 50, "7x7"),
        ("timm_resnet101", "timm", 101, "7x7"),
        ("timm_resnet101c", "timm", 101, "deep"),
        ("mmseg_resnet101_v1c", "mmseg", 101, "deep"),
    ],
)
def test_each_format_converts_to_the_backbone_layout(name, fmt, depth, stem):
    state = layout(name)
    converted = weights.convert_state(state, fmt)
    arch = weights.check_backbone_state(converted, name, want=Architecture(depth, stem, False))
    assert arch == Architecture(depth, stem, False)
    with torch.device("meta"):
        model = DilatedResNet(depth, deep_stem=stem == "deep")
    assert set(converted) == set(model.state_dict())  # fc dropped, nothing else missing
    for k, v in model.state_dict().items():
        assert converted[k].shape == v.shape, k


def test_timm_deep_stem_is_renamed_and_needs_the_rename():
    state = layout("timm_resnet101c")
    with pytest.raises(WeightsError, match=r"missing keys: \['stem.0.weight'"):
        weights.check_backbone_state(remap_keys(state), "raw timm resnet101c")
    converted = weights.convert_state(state, "timm")
    for old, new in (("conv1.0.weight", "stem.0.weight"), ("conv1.4.running_var", "stem.4.running_var"), ("conv1.6.weight", "stem.6.weight"), ("bn1.weight", "stem.7.weight")):  # fmt: skip
        assert converted[new] is state[old]
    assert converted["layer1.0.bn1.weight"] is state["layer1.0.bn1.weight"]  # blocks untouched
    # torchvision/mmseg conversion does not rename: a timm deep stem read as mmseg fails
    with pytest.raises(WeightsError, match="unexpected keys"):
        weights.check_backbone_state(weights.convert_state(state, "mmseg"), "as mmseg")


def test_resnet_d_avg_down_is_refused():
    with pytest.raises(WeightsError, match=r"refused: the file is a ResNet-101, deep stem, avg-down.*different architecture"):  # fmt: skip
        weights.convert_state(layout("timm_resnet101d"), "timm")


def test_wrong_depth_or_stem_is_named():
    r50 = weights.convert_state(layout("torchvision_resnet50"), "torchvision")
    with pytest.raises(WeightsError, match="wrong architecture: the file is a ResNet-50, 7x7 stem, the model a ResNet-101, 7x7 stem"):  # fmt: skip
        weights.check_backbone_state(r50, "r50", want=Architecture(101, "7x7", False))
    v1c = weights.convert_state(layout("mmseg_resnet101_v1c"), "mmseg")
    with pytest.raises(WeightsError, match="the file is a ResNet-101, deep stem, the model a ResNet-101, 7x7 stem"):  # fmt: skip
        weights.check_backbone_state(v1c, "v1c", want=Architecture(101, "7x7", False))


def test_loader_names_the_architecture_first(tmp_path):
    path = tmp_path / "r18.pth"
    _resnet18_file(path)
    with pytest.raises(PretrainedWeightsError, match=r"wrong architecture: the file is a ResNet-18, 7x7 stem, the model a ResNet-34, 7x7 stem.*missing keys"):  # fmt: skip
        load_pretrained_backbone(DilatedResNet(34), path)


# ---------------------------------------------------------------- fetch


def _check_written(out: Path, state: dict, source_bytes: bytes, name: str) -> None:
    backbone = DilatedResNet(18)
    load_pretrained_backbone(backbone, out)
    got = backbone.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    meta = weights.read_metadata(out)
    assert meta["source"] == name
    assert meta["source_sha256"] == hashlib.sha256(source_bytes).hexdigest()
    assert weights.provenance(str(out)) == {"sha256": weights.sha256_file(out), "source": name}
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no .partial, no raw file
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes files, not 0600


def test_fetch_over_http_checks_hash_converts_and_writes(tmp_path, server):
    raw = tmp_path / "raw.pth"
    state = _resnet18_file(raw)
    src = _hashed_copy(raw, tmp_path)
    server.files[f"/{src.name}"] = src.read_bytes()
    entry = _entry(f"{server.url}/{src.name}")
    out = weights.fetch(entry, tmp_path / "w")
    assert out == tmp_path / "w" / "test-resnet18.safetensors"
    _check_written(out, state, src.read_bytes(), "test-resnet18")


def test_fetch_command_from_a_file_url_prints_the_override(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw.pth"
    state = _resnet18_file(raw, seed=1)
    src = _hashed_copy(raw, tmp_path)
    # the catalogue's URL is unreachable on purpose: --url gives the mirror
    entry = _entry(f"https://example.invalid/models/{src.name}")
    monkeypatch.setitem(weights.CATALOGUE, entry.name, entry)
    rc = weights.main(["fetch", entry.name, "--out", str(tmp_path / "w"), "--url", src.as_uri()])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = tmp_path / "w" / "test-resnet18.safetensors"
    assert captured.out.splitlines()[-1].strip() == f"model.pretrained={out} model.depth=18"
    assert "MB (100%)" in captured.err  # the progress line
    _check_written(out, state, src.read_bytes(), "test-resnet18")


def test_hash_mismatch_keeps_partial_and_writes_nothing(tmp_path, server):
    raw = tmp_path / "raw.pth"
    _resnet18_file(raw)
    src = _hashed_copy(raw, tmp_path)
    tampered = bytearray(src.read_bytes())
    tampered[-100] ^= 0xFF
    server.files[f"/{src.name}"] = bytes(tampered)
    entry = _entry(f"{server.url}/{src.name}")
    out_dir = tmp_path / "w"
    with pytest.raises(WeightsError, match=rf"hash mismatch: sha256 [0-9a-f]{{64}} does not match the expected sha256 prefix from the file name {src.name[9:17]} of test-resnet18; the download is kept as .*{src.name}\.partial and not used"):  # fmt: skip
        weights.fetch(entry, out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == [f"{src.name}.partial"]


def test_truncated_download_is_named(tmp_path, server):
    raw = tmp_path / "raw.pth"
    _resnet18_file(raw)
    src = _hashed_copy(raw, tmp_path)
    body = src.read_bytes()
    server.files[f"/{src.name}"] = body
    server.truncate.add(f"/{src.name}")
    out_dir = tmp_path / "w"
    with pytest.raises(WeightsError, match=rf"truncated download: {len(body) // 2} of {len(body)} bytes arrived; the partial file is kept as .*\.partial and not used"):  # fmt: skip
        weights.fetch(_entry(f"{server.url}/{src.name}"), out_dir)
    assert [p.name for p in out_dir.iterdir()] == [f"{src.name}.partial"]


def test_missing_file_on_the_server_is_named(tmp_path, server, capsys):
    stale = tmp_path / "w" / "resnet18-00000000.pth.partial"  # left by an earlier attempt
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    with pytest.raises(WeightsError) as info:
        weights.fetch(_entry(f"{server.url}/resnet18-00000000.pth"), tmp_path / "w")
    assert str(info.value) == f"{server.url}/resnet18-00000000.pth: download failed: Not Found"
    assert list((tmp_path / "w").iterdir()) == []
    # the leftover is named as it goes, not removed without a word
    assert f"removing {stale} (0.0 MB), left by an earlier attempt" in capsys.readouterr().err


# ---------------------------------------------------------------- pickled payloads


class _Payload:
    """Unpickling this creates a marker file: it runs code when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_payload_is_refused_and_never_runs(tmp_path, server, capsys):
    marker = tmp_path / "ran"
    raw = tmp_path / "raw.pth"
    state = _resnet18_file(raw)
    state["evil"] = _Payload(marker)
    torch.save(state, raw)
    # convert: refused, nothing executed
    rc = weights.main(["convert", str(raw), "--from", "torchvision", "--out", str(tmp_path / "o.safetensors")])  # fmt: skip
    assert rc == 2
    assert "refused: the file holds pickled objects" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()
    # fetch: passes its hash (the file is what the name says) and is still refused
    src = _hashed_copy(raw, tmp_path)
    server.files[f"/{src.name}"] = src.read_bytes()
    with pytest.raises(WeightsError, match="refused: the file holds pickled objects"):
        weights.fetch(_entry(f"{server.url}/{src.name}"), tmp_path / "w")
    assert not marker.exists() and not (tmp_path / "w" / "test-resnet18.safetensors").exists()
    # control: an unsafe load would have run it
    torch.load(raw, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------- convert and provenance


def test_convert_timm_deep_stem_file_loads_into_a_deep_stem_backbone(tmp_path, capsys):
    source = DilatedResNet(18, deep_stem=True)
    rename = {v: k for k, v in weights._TIMM_DEEP_STEM.items()}  # stem.7. -> bn1., ...
    timm_state = {}
    for k, v in source.state_dict().items():
        new = next((rename[p] + k[len(p) :] for p in rename if k.startswith(p)), k)
        timm_state[new] = v
    assert "conv1.0.weight" in timm_state and "bn1.running_mean" in timm_state
    src = tmp_path / "resnet18c.pth"
    torch.save({"state_dict": timm_state}, src)
    dst = tmp_path / "r18c.safetensors"
    assert weights.main(["convert", str(src), "--from", "timm", "--out", str(dst)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].strip() == (
        f"model.pretrained={dst} model.depth=18 model.deep_stem=true"
    )
    target = DilatedResNet(18, deep_stem=True)
    load_pretrained_backbone(target, dst)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v, rtol=0, atol=0)
    assert weights.read_metadata(dst)["source"] == "convert:resnet18c.pth (timm)"
    with pytest.raises(WeightsError, match=r"must be a \.safetensors file"):
        weights.convert_file(src, "timm", tmp_path / "out.pth")


def test_provenance_of_unset_and_from_scratch():
    assert weights.provenance(None)["source"].startswith("none (model.pretrained not set")
    assert weights.provenance("none") == {
        "sha256": "none",
        "source": "none (model.pretrained=none: from scratch on purpose)",
    }
    assert weights.provenance("/nonexistent/x.pth")["sha256"] == "unavailable (file not found)"
