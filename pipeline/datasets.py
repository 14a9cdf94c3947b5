"""One spec per dataset: everything the pipeline, the generator and training know about it.

    DATASETS["ade20k"].source       # the original layout and its lister (pipeline.sources)
    DATASETS["ade20k"].labels       # class names, palette, id map, class count (cdgcnet.labels)
    DATASETS["ade20k"].generate(out)   # a small look-alike in the original layout (pipeline.synth)
    DATASETS["ade20k"].recipe       # the published training setting (launch/config.py presets)

The name is the same everywhere: the `pipeline.pack` and `pipeline.synth` argument, the shard set
folder (``shards/<name>``), the manifest's ``dataset`` field, the preset and ``TrainConfig.dataset``.
The labels live in cdgcnet.labels (keyed by this name) because the model must not import the
pipeline; all else is stated here. Adding a dataset: its label table, its source module, its
generator, and one DatasetSpec below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cdgcnet.labels import LABEL_SPECS, LabelSpec

from . import synth
from .sources import DatasetSource
from .sources.ade20k import ADE20K_SOURCE
from .sources.cityscapes import CITYSCAPES_SOURCE
from .sources.cocostuff import COCOSTUFF10K_SOURCE, COCOSTUFF164K_SOURCE
from .sources.voc import VOC_SOURCE


@dataclass(frozen=True)
class Recipe:
    """A dataset's published training setting (SGD momentum 0.9, poly power 0.9 for all)."""

    crop_size: int
    batch_size: int  # per rank per micro-step
    global_batch_size: int  # per optimizer step, the papers' batch
    lr: float
    weight_decay: float
    iterations: int
    eval_mode: str  # "whole" | "slide"
    eval_stride: int  # sliding-window stride (the window is crop_size)
    eval_every: int


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its layout, the splits trained and validated on, its generator, its recipe."""

    name: str
    source: DatasetSource
    train_split: str
    val_split: str
    recipe: Recipe | None  # None: no paper setting (the synthetic demo sets its own preset)
    about: str

    def __post_init__(self) -> None:
        for split in (self.train_split, self.val_split):
            if split not in self.source.known_splits:
                raise ValueError(f"{self.name}: split {split!r} is not one of the layout's")
        if self.name not in LABEL_SPECS:
            raise ValueError(f"{self.name}: no label table in cdgcnet.labels.LABEL_SPECS")
        if self.name not in synth.DEFAULTS:
            raise ValueError(f"{self.name}: no generator in pipeline.synth")

    @property
    def labels(self) -> LabelSpec:
        return LABEL_SPECS[self.name]

    @property
    def num_classes(self) -> int:
        return self.labels.num_classes

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits packed by default."""
        return (self.train_split, self.val_split)

    @property
    def shards(self) -> str:
        """The default shard set folder."""
        return f"shards/{self.name}"

    def generate(self, out: str | os.PathLike, **kwargs) -> Path:
        """A small dataset in this dataset's original layout (pipeline.synth.generate)."""
        return synth.generate(self.name, out, **kwargs)


_SETTING = "paper section 4.2"
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "cityscapes", CITYSCAPES_SOURCE, "train", "val",
            Recipe(769, 2, 8, 0.01, 5e-4, 30_000, "slide", 513, 5000),
            f"Cityscapes fine, 19 classes ({_SETTING})",
        ),
        DatasetSpec(
            "voc", VOC_SOURCE, "train_aug", "val",
            Recipe(513, 4, 16, 0.001, 1e-4, 30_000, "whole", 342, 5000),
            f"PASCAL VOC 2012 + SBD, 21 classes ({_SETTING})",
        ),
        DatasetSpec(
            "cocostuff10k", COCOSTUFF10K_SOURCE, "train", "test",
            Recipe(520, 4, 16, 0.001, 1e-4, 60_000, "whole", 347, 10_000),
            f"COCO-Stuff 10k, 171 classes ({_SETTING})",
        ),
        DatasetSpec(
            "cocostuff164k", COCOSTUFF164K_SOURCE, "train", "val",
            Recipe(520, 4, 16, 0.001, 1e-4, 60_000, "whole", 347, 10_000),
            f"COCO-Stuff 164k, 171 classes ({_SETTING})",
        ),
        DatasetSpec(
            "scenes", CITYSCAPES_SOURCE, "train", "val", None,
            "synthetic street scenes in the Cityscapes layout (the CPU demo)",
        ),
        DatasetSpec(
            "context", CITYSCAPES_SOURCE, "train", "val", None,
            "synthetic scenes whose regions need same-class context from the whole image",
        ),
        DatasetSpec(
            "ade20k", ADE20K_SOURCE, "training", "validation",
            # the common 512x512, 160k-iteration ADE20K setting (mmsegmentation's schedule)
            Recipe(512, 4, 16, 0.01, 5e-4, 160_000, "whole", 341, 16_000),
            "ADE20K SceneParse150, 150 classes (512x512, 160k iterations)",
        ),
    )
}  # fmt: skip


def get_dataset(name: str) -> DatasetSpec:
    """The spec of dataset `name`, with an error listing the known names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None
