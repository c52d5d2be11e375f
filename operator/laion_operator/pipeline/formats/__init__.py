"""The output formats, one module each, the way mosaicml-streaming keeps a format's reader and writer
side by side: `webdataset`, `files`, `parquet`, `tfrecord`, `mds` (`base` holds what they share).

Each module's `FORMAT` has its sample writer, `read_samples(store, shard)` giving the shard's
(key, caption, image bytes, metadata) back, its annotation rows, its image extensions and whether
convert reads datasets in it. Download, convert, annotate, verify, heal and latents ask the format;
a new format is one module here, listed below and in spec.OUTPUT_FORMATS.
"""

from __future__ import annotations

from . import files, mds, parquet, tfrecord, webdataset
from .base import BrokenShard, Format, Sample, read_metadata

FORMATS: dict[str, Format] = {m.FORMAT.name: m.FORMAT for m in (webdataset, files, parquet, tfrecord, mds)}

__all__ = ["FORMATS", "BrokenShard", "Format", "Sample", "get", "read_metadata"]


def get(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"no output format {name!r}; the formats are {', '.join(FORMATS)}")
    return FORMATS[name]
