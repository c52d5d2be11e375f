"""A dataset on disk (`source.dataset`): webdataset tars, a `files` folder, or images and a captions
JSONL, whose shards convert writes again in the part's outputFormat. Its input shards are listed and
read by `convert` (the formats read their own datasets, pipeline/formats/).
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

    def plan(self, spec: PartSpec) -> str:
        """What converting it would do, for --dry-run."""
        from ..convert import detect, list_inputs

        if spec.dataset is None:
            raise ValueError("not a dataset source")
        return f"convert {spec.dataset.uri} ({detect(spec.dataset)}) in {len(list_inputs(spec))} shards"


SOURCE = Dataset()
