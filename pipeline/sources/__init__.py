"""Readers of the original layouts (see each module for its layout); which dataset uses which
layout is stated in pipeline.datasets."""

from __future__ import annotations

from .base import (
    DatasetSource,
    LoadedSample,
    SampleError,
    SourceError,
    SourceSample,
    load_sample,
)

__all__ = [
    "DatasetSource",
    "LoadedSample",
    "SampleError",
    "SourceError",
    "SourceSample",
    "load_sample",
]
