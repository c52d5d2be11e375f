"""URL lists as JSON lines (one object a line), read by Arrow's streaming JSON reader block by block.

The columns and their types are the first block's (a field null throughout it is read as text); a
field that first appears later is not read, as a parquet file's rows cannot add a column either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.json as pjson

from .base import ListFile, ListReader
from .text import BLOCK_BYTES, TextList


class JsonLinesList(TextList):
    format = "jsonl"

    def __init__(self, url: str):
        super().__init__(url)
        with self._reader(None, threads=False) as reader:  # the first block only, no read-ahead
            self.schema = pa.schema(
                [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in reader.schema]
            )

    @contextlib.contextmanager
    def _reader(self, schema: pa.Schema | None, threads: bool = True) -> Iterator[pjson.JSONStreamingReader]:
        """Arrow's reader over the decompressed stream; with `threads`, it reads ahead on its own."""
        parse = (
            pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
            if schema is not None
            else pjson.ParseOptions()
        )
        options = pjson.ReadOptions(block_size=BLOCK_BYTES, use_threads=threads)
        with self.arrow_reader(
            lambda stream: pjson.open_json(stream, read_options=options, parse_options=parse)
        ) as reader:
            yield reader

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    def rows_in(self, sample: bytes, ended: bool) -> int:
        return sum(1 for line in sample.splitlines() if line.strip())

    def read(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        with self._reader(pa.schema([self.schema.field(c) for c in columns])) as reader:
            yield from reader


class JsonLines(ListReader):
    name = "jsonl"
    suffixes = (".jsonl", ".ndjson")

    def open(self, url: str, header: tuple[str, ...] | None = None) -> ListFile:
        self.no_header(url, header)
        return JsonLinesList(url)


READER = JsonLines()
