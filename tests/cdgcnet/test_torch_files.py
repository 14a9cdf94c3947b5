"""torch files from anyone: refused or unreadable in one line, torch's advice never passed on."""

from __future__ import annotations

import pickle

import pytest
import torch

from cdgcnet.torch_files import TorchFileError, load_tensors


class Payload:
    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.parametrize("kind", ["torch.save", "raw pickle", "garbage", "truncated"])
def test_failures_are_one_line_without_the_weights_only_false_advice(tmp_path, kind) -> None:
    path = tmp_path / "w.pt"
    if kind == "torch.save":
        torch.save({"w": torch.zeros(2), "x": Payload()}, path)
    elif kind == "raw pickle":
        path.write_bytes(pickle.dumps({"x": Payload()}, protocol=2))
    elif kind == "garbage":
        path.write_bytes(b"not a torch file at all")
    else:
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(TorchFileError) as e:
        load_tensors(path)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and len(text) < 400
    assert "False" not in text and "trusted source" not in text
    if kind == "torch.save":
        assert e.value.refused and "it pickles print" in text


def test_tensors_load() -> None:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    buf.seek(0)
    assert torch.equal(load_tensors(buf)["w"], torch.ones(2))
