"""URL lists as one JSON array of objects (what img2dataset's `json` input is), streamed: the array is
decoded object by object from a window of the text, never parsed whole, and the objects become record
batches of BATCH_ROWS.

The columns and their types are the first batch's (a field null throughout it is read as text); a
field that first appears later is not read. A single value may take up to MAX_VALUE_CHARS of text.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator

import pyarrow as pa

from .base import ListFile, ListReader
from .text import READ_ERRORS, TextList, open_stream

BATCH_ROWS = 65_536
CHUNK_BYTES = 1 << 20
MAX_VALUE_CHARS = 64 << 20  # longer than any row of metadata: past it, a value that fails to decode is broken
_WHITESPACE = " \t\n\r"


class JsonArrayList(TextList):
    format = "json"

    def __init__(self, url: str):
        super().__init__(url)
        first = next(self._batches(None), None)
        if first is None:
            self.schema = pa.schema([])
        else:
            self.schema = pa.schema(
                [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in first.schema]
            )

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    def rows_in(self, sample: bytes, ended: bool) -> int:
        count = 0
        try:
            for _ in self._objects(iter([sample]), complete=ended):
                count += 1
        except (ValueError, UnicodeDecodeError):  # the sample ends inside a value or a character
            pass
        return count

    def read(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        return self._batches(pa.schema([self.schema.field(c) for c in columns]))

    def _batches(self, schema: pa.Schema | None) -> Iterator[pa.RecordBatch]:
        stream = open_stream(self.url)[0]
        try:
            chunks = iter(lambda: stream.read(CHUNK_BYTES), b"")
            rows: list[dict] = []
            first = 0
            for number, row in enumerate(self._objects(chunks), 1):
                if not isinstance(row, dict):
                    raise self.fail(ValueError(f"item {number} of the array is not an object: {row!r:.80}"))
                rows.append(row)
                if len(rows) == BATCH_ROWS:
                    yield self._batch(rows, schema, first)
                    first, rows = number, []
            if rows:
                yield self._batch(rows, schema, first)
        finally:
            stream.close()

    def _batch(self, rows: list[dict], schema: pa.Schema | None, first: int) -> pa.RecordBatch:
        try:
            return pa.RecordBatch.from_pylist(rows, schema=schema)
        except READ_ERRORS as err:
            raise self.fail(err, f" (items {first + 1}-{first + len(rows)})") from None

    def _objects(self, chunks: Iterator[bytes], complete: bool = True) -> Iterator[object]:
        """The array's items in order, from its text in chunks. A malformed file raises MetadataError
        with the line and column; a sample cut short (`complete` false) ValueError where it ends."""
        decoder = json.JSONDecoder()
        text = codecs.getincrementaldecoder("utf-8")()
        buf, pos, line_base, ended = "", 0, 1, False
        state = "start"  # start: before '['; item: before an item or ']'; sep: before ',' or ']'

        def more() -> bool:
            nonlocal buf, pos, line_base, ended
            if ended:
                return False
            chunk = next(chunks, None)
            if chunk is None:
                ended = True
                tail = text.decode(b"", final=True)
            else:
                tail = text.decode(chunk)
            line_base += buf.count("\n", 0, pos)
            buf, pos = buf[pos:] + tail, 0
            return True

        def broken(message: str, at: int) -> Exception:
            if not complete and ended:
                return ValueError(message)
            line = line_base + buf.count("\n", 0, at)
            column = at - buf.rfind("\n", 0, at)
            return self.fail(ValueError(message), f" at line {line} column {column}")

        while True:
            while pos < len(buf) and buf[pos] in _WHITESPACE:
                pos += 1
            if pos == len(buf):
                if more():
                    continue
                if state == "start" and not buf:
                    return  # an empty file: no rows
                raise broken("the file ends inside the array (no closing ])", pos)
            char = buf[pos]
            if state == "start":
                if char != "[":
                    raise broken("expected a JSON array ([) of objects", pos)
                pos, state = pos + 1, "item"
            elif state == "sep" and char == ",":
                pos, state = pos + 1, "value"
            elif state in ("sep", "item") and char == "]":
                pos += 1
                while True:  # nothing but whitespace may follow
                    while pos < len(buf) and buf[pos] in _WHITESPACE:
                        pos += 1
                    if pos < len(buf):
                        raise broken("text after the array's closing ]", pos)
                    if not more():
                        return
            elif state in ("item", "value"):
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    # Cut short by the window's end, or broken: more text tells, up to one value's worth.
                    if len(buf) - pos < MAX_VALUE_CHARS and more():
                        continue
                    raise broken(err.msg, err.pos) from None
                yield value
                pos, state = end, "sep"
            else:
                raise broken("expected , or ] between the array's items", pos)


class JsonArray(ListReader):
    name = "json"
    suffixes = (".json",)

    def open(self, url: str, header: tuple[str, ...] | None = None) -> ListFile:
        self.no_header(url, header)
        return JsonArrayList(url)


READER = JsonArray()
