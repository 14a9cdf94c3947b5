import pytest
import torch

from cdgcnet.backbone import DilatedResNet

# torchvision ResNet parameter counts without the fc layer (torchvision totals minus fc).
TORCHVISION_BACKBONE_PARAMS = {18: 11_176_512, 34: 21_284_672, 50: 23_508_032, 101: 42_500_160}
CHANNELS = {18: (256, 512), 34: (256, 512), 50: (1024, 2048), 101: (1024, 2048)}


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_parameter_count_matches_torchvision(depth):
    net = DilatedResNet(depth, output_stride=8)
    assert sum(p.numel() for p in net.parameters()) == TORCHVISION_BACKBONE_PARAMS[depth]


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_strides_and_channels(depth, output_stride):
    net = DilatedResNet(depth, output_stride=output_stride).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    aux_c, out_c = CHANNELS[depth]
    assert net.channels == {"aux": aux_c, "out": out_c}
    stage3_stride = 8 if output_stride == 8 else 16
    assert out["aux"].shape == (1, aux_c, 64 // stage3_stride, 64 // stage3_stride)
    assert out["out"].shape == (1, out_c, 64 // output_stride, 64 // output_stride)


def test_dilation_pattern_os8_and_os16():
    net = DilatedResNet(50, output_stride=8)
    # First block of a dilated stage keeps the previous dilation (torchvision convention).
    assert net.layer3[0].conv2.dilation == (1, 1) and net.layer3[0].conv2.stride == (1, 1)
    assert net.layer3[1].conv2.dilation == (2, 2)
    assert net.layer4[0].conv2.dilation == (2, 2) and net.layer4[2].conv2.dilation == (4, 4)
    net16 = DilatedResNet(18, output_stride=16)
    assert net16.layer3[0].conv1.stride == (2, 2) and net16.layer3[1].conv1.dilation == (1, 1)
    assert net16.layer4[0].conv1.stride == (1, 1) and net16.layer4[1].conv1.dilation == (2, 2)


def test_torchvision_key_names():
    keys = set(DilatedResNet(18).state_dict())
    for k in (
        "conv1.weight",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "layer4.1.bn2.bias",
    ):
        assert k in keys
    assert not any(k.startswith("fc.") for k in keys)
    assert len(keys) == 120  # torchvision resnet18 state dict (122 keys) minus fc.weight/fc.bias


def test_deep_stem():
    net = DilatedResNet(18, output_stride=8, deep_stem=True).eval()
    assert not hasattr(net, "conv1")
    convs = [m for m in net.stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3
    assert [c.stride for c in convs] == [(2, 2), (1, 1), (1, 1)]
    assert [c.out_channels for c in convs] == [32, 32, 64]
    with torch.no_grad():
        out = net(torch.randn(2, 3, 48, 48))
    assert out["out"].shape == (2, 512, 6, 6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth must be one of"):
        DilatedResNet(152)
    with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
        DilatedResNet(18, output_stride=32)
