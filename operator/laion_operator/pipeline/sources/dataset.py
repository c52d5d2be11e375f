"""A dataset on disk (`source.dataset`): webdataset tars, a `files` folder, or images and a captions
JSONL, whose shards the convert stage (pipeline/convert.py) writes again in the part's outputFormat.

This module lists its input shards (what output shard N reads, kept in the manifest) and reads one;
the dataset formats themselves (`formats.DATASETS`) know their own files, as the output formats do.
"""

from __future__ import annotations

from collections.abc import Iterator

import fsspec

from ...spec import Dataset, PartSpec
from .. import formats
from ..formats import ConvertError, Sample
from .base import SampleSource


class DatasetSource(SampleSource):
    name = "dataset"

    def selected(self, spec: PartSpec) -> bool:
        return spec.dataset is not None

    def describe(self, spec: PartSpec) -> str:
        return f"dataset {_dataset(spec).uri}"

    def plan_line(self, spec: PartSpec, inputs: list[dict]) -> str:
        return f"convert {_dataset(spec).uri} ({detect(_dataset(spec))}) in {len(inputs)} shards"

    def list_inputs(self, spec: PartSpec) -> list[dict]:
        return list_inputs(spec)

    def read_input(self, spec: PartSpec, entry: dict) -> Iterator[tuple[Sample, bytes]]:
        return read_input(spec, entry)


SOURCE = DatasetSource()


def _dataset(spec: PartSpec) -> Dataset:
    if spec.dataset is None:
        raise ConvertError("spec.source.dataset: required field is missing (the dataset to convert)")
    return spec.dataset


# --- listing the input shards ------------------------------------------------------------------


def detect(dataset: Dataset) -> str:
    if dataset.format:
        return dataset.format
    readers = list(formats.DATASETS.values())
    claimed = next((fmt.name for fmt in readers if fmt.claims(dataset)), None)
    if claimed:
        return claimed
    # The input's filesystem; s3:// uses the options Store registered for the part's output.
    fs, root = fsspec.core.url_to_fs(dataset.uri.rstrip("/"))
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        raise ConvertError(f"spec.source.dataset.uri: {dataset.uri} does not exist") from None
    for fmt in readers:
        if any(fmt.is_dataset_shard(fs, f"{root.rstrip('/')}/{n}") for n in names):
            return fmt.name
    looked = ", ".join(f"no {fmt.dataset_shards}" for fmt in readers)
    raise ConvertError(
        f"spec.source.dataset: cannot tell the format of {dataset.uri} ({looked}); "
        f"found {sorted(names)[:10]}; set format"
    )


def list_inputs(spec: PartSpec) -> list[dict]:
    """The input shards, in order: what output shard N reads."""
    dataset = _dataset(spec)
    fmt = detect(dataset)
    return [
        {"format": fmt, **entry}
        for entry in formats.DATASETS[fmt].dataset_inputs(dataset, spec.filter.samples_per_shard)
    ]


# --- reading one input shard -------------------------------------------------------------------


def read_input(spec: PartSpec, entry: dict) -> Iterator[tuple[Sample, bytes]]:
    """The samples of one input shard, keyed by their base names, each with its image (ConvertError
    naming the sample otherwise)."""
    fmt = formats.DATASETS[entry["format"]]
    for sample in fmt.read_input(_dataset(spec), entry):
        key = sample.key.rsplit("/", 1)[-1]
        if sample.image is None:
            raise ConvertError(f"{sample.file}: sample {key}: no image (one of .{', .'.join(fmt.image_extensions)})")
        yield sample._replace(key=key), sample.image
