"""Per-dataset readers of the original layouts (see each module for its layout)."""

from __future__ import annotations

from .base import (
    DatasetSource,
    LoadedSample,
    SampleError,
    SourceError,
    SourceSample,
    load_sample,
)
from .cityscapes import CITYSCAPES_SOURCE
from .cocostuff import COCOSTUFF10K_SOURCE, COCOSTUFF164K_SOURCE
from .voc import VOC_SOURCE

SOURCES: dict[str, DatasetSource] = {
    s.name: s for s in (CITYSCAPES_SOURCE, VOC_SOURCE, COCOSTUFF10K_SOURCE, COCOSTUFF164K_SOURCE)
}

__all__ = [
    "SOURCES",
    "DatasetSource",
    "LoadedSample",
    "SampleError",
    "SourceError",
    "SourceSample",
    "load_sample",
]
