"""A dataset on disk (`source.dataset`): webdataset tars, a `files` folder, or images and a captions
JSONL, whose shards the convert stage writes again in the part's outputFormat. Its input shards are
listed and read by `pipeline/convert.py` (the formats read their own datasets, pipeline/formats/),
which sits above the sources: the reading is to move here, beside the URL list's.
"""

from __future__ import annotations

from ...spec import PartSpec
from .base import Source


class Dataset(Source):
    name = "dataset"

    def selected(self, spec: PartSpec) -> bool:
        return spec.dataset is not None

    def describe(self, spec: PartSpec) -> str:
        if spec.dataset is None:
            raise ValueError("not a dataset source")
        return f"dataset {spec.dataset.uri}"


SOURCE = Dataset()
