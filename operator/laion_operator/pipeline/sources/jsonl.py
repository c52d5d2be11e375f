"""URL lists as JSON lines (one object a line), read by Arrow's streaming JSON reader block by block.

The columns and their types are the first block's (a field null throughout it is read as text); a
field that first appears later is not read, as a parquet file's rows cannot add a column either.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.json as pjson

from .base import ListFile, ListReader
from .text import BLOCK_BYTES, READ_ERRORS, TextList, open_stream


class JsonLinesList(TextList):
    format = "jsonl"

    def __init__(self, url: str):
        super().__init__(url)
        reader = self._reader(None)
        reader.close()
        self.schema = pa.schema(
            [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in reader.schema]
        )

    def _reader(self, schema: pa.Schema | None) -> pjson.JSONStreamingReader:
        stream = open_stream(self.url)[0]
        parse = (
            pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
            if schema is not None
            else pjson.ParseOptions()
        )
        try:
            return pjson.open_json(stream, read_options=pjson.ReadOptions(block_size=BLOCK_BYTES), parse_options=parse)
        except READ_ERRORS as err:
            stream.close()
            raise self.fail(err) from None

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    def rows_in(self, sample: bytes, ended: bool) -> int:
        return sum(1 for line in sample.splitlines() if line.strip())

    def read(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        reader = self._reader(pa.schema([self.schema.field(c) for c in columns]))
        try:
            yield from reader
        finally:
            reader.close()


class JsonLines(ListReader):
    name = "jsonl"
    suffixes = (".jsonl", ".ndjson")

    def open(self, url: str, header: tuple[str, ...] | None = None) -> ListFile:
        self.no_header(url, header)
        return JsonLinesList(url)


READER = JsonLines()
