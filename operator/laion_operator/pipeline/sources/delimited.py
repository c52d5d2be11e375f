"""URL lists as delimited text: csv, tsv (CC12M's, header-less: `source.header` names its columns) and
txt (one URL a line, column `url`), read by Arrow's streaming CSV reader block by block.

Arrow infers each column's type from the first block and holds the file to it; a column empty
throughout that block (null) is read as text instead, so that a later value does not fail the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.csv as pcsv

from .base import ListFile, ListReader
from .text import BLOCK_BYTES, TextList

TXT_COLUMN = "url"


class DelimitedList(TextList):
    def __init__(self, url: str, name: str, delimiter: str, header: tuple[str, ...] | None, txt: bool = False):
        super().__init__(url)
        self.format = name
        self.header_lines = 0 if header or txt else 1
        self.column_names = [TXT_COLUMN] if txt else list(header) if header else None
        # txt: no delimiter, quote or escape character a URL could hold; the line is the URL
        self.parse_options = (
            pcsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False)
            if txt
            else pcsv.ParseOptions(delimiter=delimiter)
        )
        self.types = self._types(pcsv.ConvertOptions(column_types={TXT_COLUMN: pa.string()} if txt else None))

    @contextlib.contextmanager
    def _reader(self, convert: pcsv.ConvertOptions, threads: bool = True) -> Iterator[pcsv.CSVStreamingReader]:
        """Arrow's reader over the decompressed stream; with `threads`, it reads ahead on its own."""
        options = pcsv.ReadOptions(block_size=BLOCK_BYTES, column_names=self.column_names, use_threads=threads)
        with self.arrow_reader(
            lambda stream: pcsv.open_csv(
                stream, read_options=options, parse_options=self.parse_options, convert_options=convert
            )
        ) as reader:
            yield reader

    def _types(self, convert: pcsv.ConvertOptions) -> dict[str, pa.DataType]:
        with self._reader(convert, threads=False) as reader:  # the first block only, no read-ahead
            return {f.name: pa.string() if pa.types.is_null(f.type) else f.type for f in reader.schema}

    @property
    def columns(self) -> list[str]:
        return list(self.types)

    def read(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        # An empty field is a missing value, text included, as img2dataset's pandas reads it.
        convert = pcsv.ConvertOptions(
            include_columns=columns, column_types={c: self.types[c] for c in columns}, strings_can_be_null=True
        )
        with self._reader(convert) as reader:
            yield from reader


class Delimited(ListReader):
    def __init__(self, name: str, delimiter: str):
        self.name, self.delimiter = name, delimiter
        self.suffixes = (f".{name}",)

    def open(self, url: str, header: tuple[str, ...] | None = None) -> ListFile:
        return DelimitedList(url, self.name, self.delimiter, header)


class Txt(ListReader):
    name = "txt"
    suffixes = (".txt",)

    def open(self, url: str, header: tuple[str, ...] | None = None) -> ListFile:
        self.no_header(url, header)
        return DelimitedList(url, self.name, "\x1f", None, txt=True)


CSV = Delimited("csv", ",")
TSV = Delimited("tsv", "\t")
TXT = Txt()
