"""Write the key names and shapes of published ImageNet ResNet state dicts (the JSON files here).

    python tests/cdgcnet/data/make_resnet_keys.py

Each layout follows the library's own module code, read from its source (not from
cdgcnet/backbone.py), so the conversion tests check cdgcnet against those libraries:
- torchvision `models/resnet.py`: conv1 (7x7) + bn1; Bottleneck conv1/bn1/conv2/bn2/conv3/bn3;
  downsample = Sequential(conv1x1, BN) -> downsample.0 / downsample.1; fc.
- timm `models/resnet.py`: stem_type "" is torchvision's stem; stem_type "deep" with
  stem_width 32 (resnet101c, resnet101d) is conv1 = Sequential(conv 3->32 s2, BN, ReLU,
  conv 32->32, BN, ReLU, conv 32->64) -> conv1.0/1/3/4/6, then bn1 (64); avg_down (resnet101d)
  makes downsample = Sequential(AvgPool or Identity, conv1x1, BN) -> downsample.1 / .2; fc.
- mmsegmentation `models/backbones/resnet.py` ResNetV1c (deep_stem=True): stem = Sequential(
  conv 3->32 s2, BN, ReLU, conv 32->32, BN, ReLU, conv 32->64, BN, ReLU) -> stem.0/1/3/4/6/7;
  norms named bn1/bn2/bn3 (build_norm_layer's "bn" + postfix); downsample.0 / .1; the
  backbone has no fc (whether the published ImageNet file carries one is not known here; fc.*
  is dropped either way, so it is left out).
BatchNorm entries are weight, bias, running_mean, running_var and num_batches_tracked (shape
[]), as nn.BatchNorm2d.state_dict() gives them.
"""

from __future__ import annotations

import json
from pathlib import Path

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
HERE = Path(__file__).resolve().parent


def bn(prefix: str, c: int) -> list:
    return [[f"{prefix}.{n}", [c]] for n in ("weight", "bias", "running_mean", "running_var")] + [
        [f"{prefix}.num_batches_tracked", []]
    ]


def conv(prefix: str, cout: int, cin: int, k: int) -> list:
    return [[f"{prefix}.weight", [cout, cin, k, k]]]


def stages(depth: int, avg_down: bool = False) -> list:
    keys, inplanes = [], 64
    for i, (n, planes) in enumerate(zip(BLOCKS[depth], (64, 128, 256, 512), strict=True)):
        for b in range(n):
            p = f"layer{i + 1}.{b}"
            keys += conv(f"{p}.conv1", planes, inplanes, 1) + bn(f"{p}.bn1", planes)
            keys += conv(f"{p}.conv2", planes, planes, 3) + bn(f"{p}.bn2", planes)
            keys += conv(f"{p}.conv3", planes * 4, planes, 1) + bn(f"{p}.bn3", planes * 4)
            if b == 0:  # every stage's first block changes width (and stride): a projection
                d = 1 if avg_down else 0
                keys += conv(f"{p}.downsample.{d}", planes * 4, inplanes, 1)
                keys += bn(f"{p}.downsample.{d + 1}", planes * 4)
            inplanes = planes * 4
    return keys


FC = [["fc.weight", [1000, 2048]], ["fc.bias", [1000]]]
STEM_7X7 = conv("conv1", 64, 3, 7) + bn("bn1", 64)
STEM_TIMM_DEEP = (
    conv("conv1.0", 32, 3, 3)
    + bn("conv1.1", 32)
    + conv("conv1.3", 32, 32, 3)
    + bn("conv1.4", 32)
    + conv("conv1.6", 64, 32, 3)
    + bn("bn1", 64)
)
STEM_MMSEG = (
    conv("stem.0", 32, 3, 3)
    + bn("stem.1", 32)
    + conv("stem.3", 32, 32, 3)
    + bn("stem.4", 32)
    + conv("stem.6", 64, 32, 3)
    + bn("stem.7", 64)
)

LAYOUTS = {
    "torchvision_resnet50": ("torchvision resnet50", STEM_7X7 + stages(50) + FC),
    "torchvision_resnet101": ("torchvision resnet101", STEM_7X7 + stages(101) + FC),
    "timm_resnet101": ("timm resnet101 (stem_type '')", STEM_7X7 + stages(101) + FC),
    "timm_resnet101c": ("timm resnet101c (deep stem, width 32)", STEM_TIMM_DEEP + stages(101) + FC),
    "timm_resnet101d": (
        "timm resnet101d (deep stem, width 32, avg_down)",
        STEM_TIMM_DEEP + stages(101, avg_down=True) + FC,
    ),
    "mmseg_resnet101_v1c": ("mmsegmentation ResNetV1c depth 101", STEM_MMSEG + stages(101)),
}

if __name__ == "__main__":
    for name, (what, keys) in LAYOUTS.items():
        path = HERE / f"{name}.json"
        path.write_text(json.dumps({"layout": what, "keys": keys}, separators=(",", ":")) + "\n")
        print(f"{path}: {len(keys)} keys")
