"""The URL list (`source.urls`): metadata files, each a local path, `http(s)://` or `s3://` URL, read
by the reader of its file format (`READERS`, by the file's name; parquet when no name matches, as
LAION's metadata is). A new list format is one module beside this one and one line in `READERS`.
"""

from __future__ import annotations

from ...spec import PartSpec
from . import parquet
from .base import ListFile, ListReader, Source

READERS: dict[str, ListReader] = {m.READER.name: m.READER for m in (parquet,)}
DEFAULT = parquet.READER


def reader_for(url: str) -> ListReader:
    name = url.split("?", 1)[0].lower()
    return next((r for r in READERS.values() if name.endswith(r.suffixes)), DEFAULT)


def open_list(url: str) -> ListFile:
    return reader_for(url).open(url)


class Urls(Source):
    name = "urls"

    def selected(self, spec: PartSpec) -> bool:
        return spec.dataset is None

    def describe(self, spec: PartSpec) -> str:
        return f"{len(spec.source)} metadata file{'s' if len(spec.source) > 1 else ''}"


SOURCE = Urls()
