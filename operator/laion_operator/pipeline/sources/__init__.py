"""Where a part's input comes from, one module per kind, behind `base.Source` as the output formats
are behind `formats.base.Format`: `urls` (a URL list: metadata files the filter reads, each through
its file format's `ListReader`: `parquet`, `delimited` (csv, tsv, txt), `jsonl`, `json_array`, the
text ones over `text`'s decompressed streams) and `dataset` (a dataset on disk, converted).

A new kind is one module here and one line in `SOURCES`; a new URL-list file format is one module
here and one line in `urls.READERS`.
"""

from __future__ import annotations

from ...spec import PartSpec
from . import dataset, urls
from .base import ListFile, ListReader, MetadataError, Source
from .urls import open_list

SOURCES: dict[str, Source] = {m.SOURCE.name: m.SOURCE for m in (urls, dataset)}

__all__ = ["SOURCES", "ListFile", "ListReader", "MetadataError", "Source", "of", "open_list"]


def of(spec: PartSpec) -> Source:
    """The kind of input the spec reads."""
    found = [s for s in SOURCES.values() if s.selected(spec)]
    if len(found) != 1:
        raise ValueError(f"spec.source: expected one kind of input, found {[s.name for s in found]}")
    return found[0]
