"""The output formats, one module each, the way mosaicml-streaming keeps a format's reader and writer
side by side: `webdataset`, `files`, `parquet`, `tfrecord`, `mds` (`base` holds what they share).

Each module's `FORMAT` has its shard's data file, its sample writer, `read_samples(store, shard)`
giving the shard's (key, caption, image bytes, metadata) back, its annotation rows, its image
extensions and whether convert reads datasets in it. Download, convert, annotate, verify, heal,
latents, resume and the tests ask the format; a new format is one module here, named after it, and
its line in contract.OUTPUT_FORMATS (the registry the operator and the CRD's enum read too).
`images` (image files and a captions JSONL) is a dataset convert reads and nothing writes.
"""

from __future__ import annotations

from importlib import import_module

from ...contract import OUTPUT_FORMATS, STATS_SUFFIX, shard_metadata
from . import images
from .base import BrokenShard, ConvertError, Format, Sample, numbered, read_metadata

# Each name of the contract's registry is the module here that holds the format.
FORMATS: dict[str, Format] = {name: import_module(f"{__name__}.{name}").FORMAT for name in OUTPUT_FORMATS}
# What convert reads (spec.source.dataset.format): the formats that read datasets, and images.
DATASETS: dict[str, Format] = {f.name: f for f in (*FORMATS.values(), images.FORMAT) if f.reads_datasets}

__all__ = [
    "DATASETS",
    "FORMATS",
    "BrokenShard",
    "ConvertError",
    "Format",
    "Sample",
    "get",
    "read_metadata",
    "shard_data",
    "shard_files",
    "shard_of_file",
]


def get(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"no output format {name!r}; the formats are {', '.join(FORMATS)}")
    return FORMATS[name]


def shard_data(shard: int, output_format: str) -> str:
    """The file (or folder) of the output that holds the shard's samples in `output_format`."""
    return get(output_format).data_file(shard)


def shard_files(shard: int) -> list[str]:
    """Everything a shard may have written, whatever the format: removed before it is redone."""
    return sorted({f.data_file(shard) for f in FORMATS.values()} | {shard_metadata(shard)})


def shard_of_file(file_name: str) -> int | None:
    """The shard an entry of the output folder belongs to (its data in any format, its metadata or its
    stats), or None for any other file."""
    for suffix in (STATS_SUFFIX, ".parquet", *(f.suffix for f in FORMATS.values())):
        shard = numbered(file_name, suffix)
        if shard is not None:
            return shard
    return None
