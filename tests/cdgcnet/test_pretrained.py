import collections

import pytest
import torch
from safetensors.torch import save_file

from cdgcnet.backbone import DilatedResNet
from cdgcnet.config import ModelConfig
from cdgcnet.model import build_model
from cdgcnet.pretrained import PretrainedWeightsError, load_pretrained_backbone


class NotATensor:
    pass


def _torchvision_resnet18_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict shaped and named like torchvision's resnet18 (fc included)."""
    torch.manual_seed(seed)
    state = {k: torch.randn_like(v.float()) for k, v in DilatedResNet(18).state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    return state


def _assert_loaded(backbone, state):
    got = backbone.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)


def test_loads_torchvision_pth_with_module_prefix(tmp_path):
    state = _torchvision_resnet18_state()
    path = tmp_path / "resnet18.pth"
    torch.save(collections.OrderedDict(("module." + k, v) for k, v in state.items()), path)
    backbone = DilatedResNet(18, output_stride=8)
    load_pretrained_backbone(backbone, path)
    _assert_loaded(backbone, state)


def test_loads_safetensors_and_wrapped_checkpoint(tmp_path):
    state = _torchvision_resnet18_state(1)
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))
    backbone = DilatedResNet(18, output_stride=16)
    load_pretrained_backbone(backbone, path)
    _assert_loaded(backbone, state)
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"backbone." + k: v for k, v in state.items()}}, wrapped)
    backbone = DilatedResNet(18)
    load_pretrained_backbone(backbone, wrapped)
    _assert_loaded(backbone, state)


def test_build_model_loads_cfg_pretrained(tmp_path):
    state = _torchvision_resnet18_state(2)
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = build_model(
        ModelConfig(num_classes=3, depth=18, channels=8, aspp_channels=8, pretrained=str(path))
    )
    _assert_loaded(model.backbone, state)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = _torchvision_resnet18_state()
    del state["layer4.1.conv2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained_backbone(DilatedResNet(18), path)
    msg = str(info.value)
    assert str(path) in msg
    assert "1 missing keys: ['layer4.1.conv2.weight']" in msg
    assert "1 unexpected keys: ['layer5.0.conv1.weight']" in msg


def test_shape_mismatch_is_named(tmp_path):
    # A resnet18 file into a resnet50 backbone: names overlap, shapes do not.
    path = tmp_path / "r18.pth"
    torch.save(_torchvision_resnet18_state(), path)
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained_backbone(DilatedResNet(50), path)
    msg = str(info.value)
    assert (
        "shape mismatches: ['layer1.0.conv1.weight: file (64, 64, 3, 3) vs model (64, 64, 1, 1)'"
        in msg
    )
    assert "missing keys: ['layer1.0.conv3.weight'" in msg
    state = _torchvision_resnet18_state()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, path)
    with pytest.raises(
        PretrainedWeightsError, match=r"conv1.weight: file \(64, 3, 3, 3\) vs model \(64, 3, 7, 7\)"
    ):
        load_pretrained_backbone(DilatedResNet(18), path)


def test_pickled_object_is_refused(tmp_path):
    state = _torchvision_resnet18_state()
    state["evil"] = NotATensor()
    path = tmp_path / "pickled.pth"
    torch.save(state, path)
    backbone = DilatedResNet(18)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(PretrainedWeightsError, match="refused: the file holds pickled objects"):
        load_pretrained_backbone(backbone, path)
    for k, v in backbone.state_dict().items():  # nothing half-loaded
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_other_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_pretrained_backbone(DilatedResNet(18), tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match=r"junk\.pth"):
        load_pretrained_backbone(DilatedResNet(18), junk)
    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"\x00" * 16)
    with pytest.raises(PretrainedWeightsError, match=r"not a readable \.safetensors"):
        load_pretrained_backbone(DilatedResNet(18), junk_st)
    listy = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listy)
    with pytest.raises(PretrainedWeightsError, match="expected a non-empty dict of tensors"):
        load_pretrained_backbone(DilatedResNet(18), listy)


def test_deep_stem_takes_stem_names_and_refuses_torchvision_stem(tmp_path):
    source = DilatedResNet(18, deep_stem=True)
    path = tmp_path / "v1c.pth"
    torch.save({"state_dict": {"backbone." + k: v for k, v in source.state_dict().items()}}, path)
    target = DilatedResNet(18, deep_stem=True)
    load_pretrained_backbone(target, path)
    _assert_loaded(target, source.state_dict())
    tv = tmp_path / "r18.pth"
    torch.save(_torchvision_resnet18_state(), tv)
    with pytest.raises(PretrainedWeightsError, match=r"deep-stem.*missing keys: \['stem.0.weight'"):
        load_pretrained_backbone(DilatedResNet(18, deep_stem=True), tv)


def test_none_means_from_scratch_and_loads_nothing():
    for value in ("none", "None", "NONE"):
        assert ModelConfig(pretrained=value).pretrained == "none"
    assert ModelConfig(pretrained="").pretrained is None
    torch.manual_seed(0)
    a = build_model(ModelConfig(num_classes=3, depth=18, channels=8, aspp_channels=8))
    torch.manual_seed(0)
    b = build_model(
        ModelConfig(num_classes=3, depth=18, channels=8, aspp_channels=8, pretrained="none")
    )
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
