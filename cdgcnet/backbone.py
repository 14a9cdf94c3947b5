"""Dilated ResNet backbone (18/34/50/101), output stride 8 or 16, optional v1c deep stem.

Parameter names follow torchvision's ResNet (conv1, bn1, layer1..layer4, downsample.0/1), so
torchvision ImageNet state dicts (and timm's resnet50/resnet101, same names) load after dropping
fc.*. The deep stem (ResNet-v1c, as in mmsegmentation) replaces the 7x7 conv1/bn1 by `stem`:
three 3x3 convs (3->32, 32->32, 32->64) with BN + ReLU, named stem.0/1/3/4/6/7 as in
mmsegmentation. Which weights go with which stem (torchvision / timm for the 7x7 stem,
mmsegmentation v1c / timm resnet101c for the deep stem; ResNet-D avg-down files fit neither):
cdgcnet/weights.py and `python -m cdgcnet.weights list`. The paper presets use the 7x7 stem.

Dilation follows torchvision's replace_stride_with_dilation: a dilated stage keeps stride 1, its
first block uses the previous dilation and the following blocks the new one.
"""

from __future__ import annotations

from torch import Tensor, nn

# depth -> (block type, blocks per stage)
_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DilatedResNet(nn.Module):
    """ResNet returning {"aux": stage-3 feature, "out": stage-4 feature}.

    Attributes `channels` ({"aux": int, "out": int}) and `output_stride` describe the outputs.
    """

    def __init__(self, depth: int = 101, output_stride: int = 8, deep_stem: bool = False) -> None:
        super().__init__()
        if depth not in _LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(_LAYOUTS)}, got {depth!r}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        kind, blocks = _LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.output_stride = output_stride
        self.deep_stem = deep_stem

        if deep_stem:
            self.stem = nn.Sequential(
                _conv3x3(3, 32, stride=2),
                nn.BatchNorm2d(32),
                nn.ReLU(inplace=True),
                _conv3x3(32, 32),
                nn.BatchNorm2d(32),
                nn.ReLU(inplace=True),
                _conv3x3(32, 64),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
            )
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        # (stride, dilation) of stages 3 and 4: OS 8 dilates both, OS 16 only stage 4.
        dilate3, dilate4 = (True, True) if output_stride == 8 else (False, True)
        self._inplanes = 64
        self._dilation = 1
        self.layer1 = self._make_layer(block, 64, blocks[0], stride=1, dilate=False)
        self.layer2 = self._make_layer(block, 128, blocks[1], stride=2, dilate=False)
        self.layer3 = self._make_layer(block, 256, blocks[2], stride=2, dilate=dilate3)
        self.layer4 = self._make_layer(block, 512, blocks[3], stride=2, dilate=dilate4)
        self.channels = {"aux": 256 * block.expansion, "out": 512 * block.expansion}
        self._init_weights()

    def _make_layer(
        self, block: type[nn.Module], planes: int, n: int, stride: int, dilate: bool
    ) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        expansion = block.expansion
        downsample = None
        if stride != 1 or self._inplanes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * expansion),
            )
        layers = [block(self._inplanes, planes, stride, previous_dilation, downsample)]
        self._inplanes = planes * expansion
        layers += [block(self._inplanes, planes, 1, self._dilation) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self.stem(images) if self.deep_stem else self.relu(self.bn1(self.conv1(images)))
        x = self.maxpool(x)  # (B, 64, H/4, W/4)
        x = self.layer1(x)
        x = self.layer2(x)  # (B, 128e, H/8, W/8)
        stage3 = self.layer3(x)  # (B, 256e, H/os3, W/os3)
        stage4 = self.layer4(stage3)  # (B, 512e, H/os, W/os)
        return {"aux": stage3, "out": stage4}


def build_backbone(depth: int, output_stride: int, deep_stem: bool = False) -> DilatedResNet:
    return DilatedResNet(depth=depth, output_stride=output_stride, deep_stem=deep_stem)


__all__ = ["BasicBlock", "Bottleneck", "DilatedResNet", "build_backbone"]
