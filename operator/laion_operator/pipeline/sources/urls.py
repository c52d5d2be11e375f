"""The URL list (`source.urls`): metadata files, each a local path, `http(s)://` or `s3://` URL, read
by the reader of its file format (`READERS`): `source.format` when set, else told by the file's name
less its compression suffix (x.tsv.gz is tsv), parquet when no name matches, as LAION's metadata is.
A new list format is one module beside this one and one line in `READERS`.
"""

from __future__ import annotations

from ...spec import PartSpec
from . import delimited, json_array, jsonl, parquet
from .base import ListFile, ListReader, Source
from .text import bare_name

READERS: dict[str, ListReader] = {
    r.name: r for r in (parquet.READER, delimited.CSV, delimited.TSV, delimited.TXT, jsonl.READER, json_array.READER)
}
DEFAULT = parquet.READER


def reader_for(url: str, name: str | None = None) -> ListReader:
    """`name` (source.format) when given, else the reader the file's name says."""
    if name is not None:
        return READERS[name]
    bare = bare_name(url)
    return next((r for r in READERS.values() if bare.endswith(r.suffixes)), DEFAULT)


def open_list(spec: PartSpec, url: str) -> ListFile:
    """One file of the spec's URL list, open."""
    return reader_for(url, spec.source_format).open(url, spec.source_header)


class Urls(Source):
    name = "urls"

    def selected(self, spec: PartSpec) -> bool:
        return bool(spec.source)

    def describe(self, spec: PartSpec) -> str:
        return f"{len(spec.source)} metadata file{'s' if len(spec.source) > 1 else ''}"


SOURCE = Urls()
