"""Label metadata for every dataset: class names, palettes and source-id -> train-id maps.

This is the label part of each dataset's spec (pipeline/datasets.py holds the rest: source layout,
generator, splits, training preset), kept here because the model must not import the pipeline.
`LABEL_SPECS` is keyed by the same dataset names as the packer, the generator, the presets and
the shard manifests. It is shared by the packers (which map source ids to train ids), the model
presets (number of classes), training (which checks the shards against it) and the
visualisations (palettes). Source ids not in a `label_map` map to the ignore index (255).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

IGNORE_INDEX = 255


@dataclass(frozen=True)
class LabelSpec:
    """Class names, palette and source-id -> train-id map of one dataset."""

    name: str  # the label set: "cityscapes" | "voc" | "cocostuff" | "ade20k"
    class_names: tuple[str, ...]  # train-id order, len == num_classes
    palette: tuple[tuple[int, int, int], ...]  # RGB per train id
    label_map: dict[int, int]  # source id -> train id (ids not in it -> ignore_index)
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if len(self.palette) != n:
            raise ValueError(f"{self.name}: {len(self.palette)} palette entries for {n} classes")
        if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in self.palette):
            raise ValueError(f"{self.name}: palette entries must be RGB triples in 0..255")
        if not 0 <= self.ignore_index <= 255 or self.ignore_index < n:
            raise ValueError(f"{self.name}: ignore_index {self.ignore_index} must be in {n}..255")
        for src, dst in self.label_map.items():
            if not 0 <= src <= 255:
                raise ValueError(f"{self.name}: source id {src} outside 0..255 cannot be a pixel")
            if not (0 <= dst < n or dst == self.ignore_index):
                raise ValueError(f"{self.name}: source id {src} maps to invalid train id {dst}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def lut(self) -> np.ndarray:
        """(256,) uint8 lookup table: source pixel value -> train id, or ignore_index."""
        table = np.full(256, self.ignore_index, dtype=np.uint8)
        for src, dst in self.label_map.items():
            table[src] = dst
        return table


# ---------------------------------------------------------------------------------------------
# Cityscapes: the official label table (cityscapesScripts helpers/labels.py).


class CityscapesLabel(NamedTuple):
    name: str
    id: int  # value in *_gtFine_labelIds.png (-1: license plate, never written to labelIds)
    train_id: int  # 255 = ignored in training/evaluation
    category: str
    has_instances: bool
    color: tuple[int, int, int]  # RGB in *_gtFine_color.png


CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, 255, "void", False, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, "void", False, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, "void", False, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, "void", False, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, "void", False, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, "void", False, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, "void", False, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, "flat", False, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, "flat", False, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, "flat", False, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, "flat", False, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, "construction", False, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, "construction", False, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, "construction", False, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, "construction", False, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, "construction", False, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, "construction", False, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, "object", False, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, "object", False, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, "object", False, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, "object", False, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, "nature", False, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, "nature", False, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, "sky", False, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, "human", True, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, "human", True, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, "vehicle", True, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, "vehicle", True, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, "vehicle", True, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, "vehicle", True, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, "vehicle", True, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, "vehicle", True, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, "vehicle", True, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, "vehicle", True, (119, 11, 32)),
    CityscapesLabel("license plate", -1, 255, "vehicle", False, (0, 0, 142)),
)
CITYSCAPES_NAME_TO_LABEL: dict[str, CityscapesLabel] = {lab.name: lab for lab in CITYSCAPES_LABELS}
CITYSCAPES_ID_TO_LABEL: dict[int, CityscapesLabel] = {lab.id: lab for lab in CITYSCAPES_LABELS}


def _cityscapes_spec() -> LabelSpec:
    trained = sorted((lab for lab in CITYSCAPES_LABELS if lab.train_id != 255), key=lambda x: x[2])
    return LabelSpec(
        name="cityscapes",
        class_names=tuple(lab.name for lab in trained),
        palette=tuple(lab.color for lab in trained),
        # license plate (-1) is not a pixel value; every id 0..33 is listed, ignore ones -> 255
        label_map={lab.id: lab.train_id for lab in CITYSCAPES_LABELS if lab.id >= 0},
    )


# ---------------------------------------------------------------------------------------------
# PASCAL VOC 2012 (and SBD, which uses the same 21 class indices).

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def voc_colormap(n: int = 256) -> np.ndarray:
    """(n, 3) uint8: the standard VOC colormap (VOCdevkit labelcolormap.m), index -> RGB."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def _voc_spec() -> LabelSpec:
    cmap = voc_colormap(21)
    return LabelSpec(
        name="voc",
        class_names=VOC_CLASS_NAMES,
        palette=tuple((int(r), int(g), int(b)) for r, g, b in cmap),
        label_map={i: i for i in range(21)},  # 255 (object borders) stays ignore
    )


# ---------------------------------------------------------------------------------------------
# COCO-Stuff: 182 ids (0-based as in the 164k PNG release; 1-based in the 10k .mat release with
# 0 = unlabeled). 11 thing ids were never annotated, leaving 171 classes.

COCOSTUFF_182_NAMES: tuple[str, ...] = (
    # things, 0-based ids 0..90
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window",
    "desk", "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
    # stuff, 0-based ids 91..181
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
COCOSTUFF_UNUSED_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)  # 0-based


def spread_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """A fixed, well-spread palette of n colours (for label sets that ship none for train ids)."""
    colors = []
    for i in range(n):
        # golden-ratio hue steps with three saturation/value bands keep neighbours distinguishable
        h = (i * 0.618033988749895) % 1.0
        s, v = (0.85, 0.95, 0.65)[i % 3], (0.95, 0.7, 0.85)[(i // 3) % 3]
        colors.append(tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v)))
    return tuple(colors)  # type: ignore[return-value]


def _cocostuff_spec() -> LabelSpec:
    used = [i for i in range(182) if i not in COCOSTUFF_UNUSED_IDS]
    return LabelSpec(
        name="cocostuff",
        class_names=tuple(COCOSTUFF_182_NAMES[i] for i in used),
        palette=spread_palette(len(used)),
        label_map={src: dst for dst, src in enumerate(used)},  # unused ids and 255 -> ignore
    )


# ---------------------------------------------------------------------------------------------
# ADE20K, as the SceneParse150 benchmark (ADEChallengeData2016): annotation PNGs hold 0 for
# "other" (ignored) and 1..150 for the classes, which become train ids 0..149.

ADE20K_CLASS_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip


def _ade20k_spec() -> LabelSpec:
    return LabelSpec(
        name="ade20k",
        class_names=ADE20K_CLASS_NAMES,
        palette=spread_palette(len(ADE20K_CLASS_NAMES)),
        label_map={i + 1: i for i in range(len(ADE20K_CLASS_NAMES))},  # 0 ("other") -> ignore
    )


CITYSCAPES: LabelSpec = _cityscapes_spec()
VOC: LabelSpec = _voc_spec()
COCOSTUFF: LabelSpec = _cocostuff_spec()
ADE20K: LabelSpec = _ade20k_spec()

# The label set of each dataset, by dataset name (`scenes` and `context` are synthetic sets that
# use the Cityscapes labels; both COCO-Stuff releases share one table).
LABEL_SPECS: dict[str, LabelSpec] = {
    "cityscapes": CITYSCAPES,
    "scenes": CITYSCAPES,
    "context": CITYSCAPES,
    "voc": VOC,
    "cocostuff10k": COCOSTUFF,
    "cocostuff164k": COCOSTUFF,
    "ade20k": ADE20K,
}


def get_label_spec(name: str) -> LabelSpec:
    """The label set of dataset `name`, with an error listing the known names."""
    try:
        return LABEL_SPECS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(LABEL_SPECS)}") from None
