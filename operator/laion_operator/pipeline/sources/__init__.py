"""Where a part's input comes from, one module per kind, behind `base.Source` as the output formats
are behind `formats.base.Format`: `urls` (a URL list: metadata files the filter reads, each through
its file format's `ListReader`: `parquet`, `delimited` (csv, tsv, txt), `jsonl`, `json_array`, the
text ones over `text`'s decompressed streams) and the sources of samples (`base.SampleSource`, which
the convert stage writes in the output format): `dataset` (a dataset on disk), `archives` (tar and
zip archives of images, through `archive_files` and `annotation_files`), `embedded` (parquet with the
images inside).

A new kind is one module here and one line in `SOURCES`; a new URL-list file format is one module
here and one line in `urls.READERS`.
"""

from __future__ import annotations

from ...spec import PartSpec
from . import archives, dataset, embedded, urls
from .base import ListFile, ListReader, MetadataError, Refused, SampleSource, Source
from .urls import open_list

SOURCES: dict[str, Source] = {m.SOURCE.name: m.SOURCE for m in (urls, dataset, archives, embedded)}

__all__ = [
    "SOURCES",
    "ListFile",
    "ListReader",
    "MetadataError",
    "Refused",
    "SampleSource",
    "Source",
    "of",
    "open_list",
    "samples_of",
]


def of(spec: PartSpec) -> Source:
    """The kind of input the spec reads."""
    found = [s for s in SOURCES.values() if s.selected(spec)]
    if len(found) != 1:
        raise ValueError(f"spec.source: expected one kind of input, found {[s.name for s in found]}")
    return found[0]


def samples_of(spec: PartSpec) -> SampleSource:
    """The spec's source of samples (the convert stage's input)."""
    source = of(spec)
    if not isinstance(source, SampleSource):
        raise ValueError(f"spec.source: {source.name} is fetched from URLs, not converted")
    return source
