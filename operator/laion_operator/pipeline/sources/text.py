"""What the text formats of a URL list share (csv, tsv, txt, jsonl, json): the file opened as a byte
stream, decompressed by its suffix as it is read, and the row count the shuffle asks for, estimated.

A text file's rows are known only by reading it whole, and `rows` only sizes the shuffle's spill: the
number of bucket files is the power of two above rows / BUCKET_ROWS, so an estimate off by less than
2× moves it by one power at most (buckets half or twice as large). A count pass would read and
decompress the file twice for that. The estimate: the rows in the first SAMPLE_BYTES of decompressed
text (exact when the file ends there), times the file's size over the stored bytes that text took (a
server that does not tell the size has the text read through once, only counted).
"""

from __future__ import annotations

import contextlib
import lzma
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import fsspec
import pyarrow as pa

from .base import ListFile, MetadataError, T

SAMPLE_BYTES = 1 << 20
MAX_RATIO_BYTES = 1 << 26  # text decompressed at most to tell a compressed file's ratio
RATIO_PIECE = 1 << 16
# Decompressed text per batch read (Arrow's readers' block_size). Arrow's CSV and JSON readers read a
# few dozen blocks ahead on their own thread: a list file holds that much text in memory, not more.
BLOCK_BYTES = 1 << 20
# By suffix; Arrow decompresses gzip, bz2 and zstd in C++ (no zstandard module needed), Python's
# lzma does xz.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": "xz"}
# What a broken stream raises, by the layer that notices: Arrow's parsers and codecs, lzma, a short
# read, text that is not UTF-8.
READ_ERRORS: tuple[type[Exception], ...] = (
    pa.ArrowInvalid,
    pa.ArrowTypeError,
    OSError,
    lzma.LZMAError,
    EOFError,
    UnicodeDecodeError,
)


def bare_name(url: str) -> str:
    """The file's name without its query and compression suffix, lower case: what tells its format."""
    name = url.split("?", 1)[0].lower()
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def compression(url: str) -> str | None:
    name = url.split("?", 1)[0].lower()
    return next((codec for suffix, codec in COMPRESSIONS.items() if name.endswith(suffix)), None)


def _raw(url: str) -> tuple[pa.NativeFile, int | None]:
    """The stored file, not decompressed, and its size (None: a server that does not say)."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
            raw: pa.NativeFile = pa.OSFile(path)  # Arrow's own reads: no Python call per read
            return raw, raw.size()
        f = fs.open(path, "rb")
        return pa.PythonFile(f, mode="r"), getattr(f, "size", None)
    except FileNotFoundError:
        raise MetadataError(f"{url}: no such metadata file") from None
    except OSError as err:
        raise MetadataError(f"{url}: cannot open: {err}") from None


def open_stream(url: str) -> tuple[pa.NativeFile, pa.NativeFile, int | None]:
    """(the decompressed stream, the stored file under it, the stored file's size)."""
    raw, size = _raw(url)
    codec = compression(url)
    if codec is None:
        return raw, raw, size
    if codec == "xz":
        return pa.PythonFile(lzma.LZMAFile(raw), mode="r"), raw, size
    return pa.CompressedInputStream(raw, codec), raw, size


def _text_size(stream: pa.NativeFile, raw: pa.NativeFile, size: int, read: int) -> int:
    """A compressed file's decompressed size, from the `read` bytes of text taken so far: the
    decompressor takes the stored bytes a block at a time (bz2's are 900 kB), so read on until it takes
    the next one, and scale the file's size by the text the stored bytes taken so far gave."""
    mark = raw.tell()
    while read < MAX_RATIO_BYTES:
        piece = stream.read(RATIO_PIECE)
        if not piece:
            return read  # the whole file decompressed
        if raw.tell() != mark:
            break
        read += len(piece)
    return round(size * read / max(mark, 1))


class Closing(Protocol):
    def close(self) -> Any: ...


R = TypeVar("R", bound=Closing)


class TextList(ListFile):
    """A text file of a URL list, read as a stream: never whole, never seeked."""

    format = ""

    def __init__(self, url: str):
        super().__init__(url)
        self._rows: int | None = None

    def fail(self, err: Exception, where: str = "") -> MetadataError:
        return MetadataError(f"{self.url}: not readable as {self.format}{where}: {err}")

    @property
    def rows(self) -> int:
        if self._rows is None:
            self._rows = self._estimate()
        return self._rows

    def _estimate(self) -> int:
        stream, raw, size = open_stream(self.url)
        try:
            sample = stream.read(SAMPLE_BYTES)
            if len(sample) < SAMPLE_BYTES:
                return self.rows_in(sample, ended=True)  # the whole file: counted
            if size is None:  # nothing to scale by: the text is counted, read through once
                total = len(sample) + sum(len(piece) for piece in iter(lambda: stream.read(SAMPLE_BYTES), b""))
            else:
                total = size if raw is stream else _text_size(stream, raw, size, len(sample))
        except READ_ERRORS as err:
            raise self.fail(err) from None
        finally:
            stream.close()
        return max(1, round(self.rows_in(sample, ended=False) * total / len(sample)))

    def rows_in(self, sample: bytes, ended: bool) -> int:
        """The rows the first bytes of the file hold (all of it when `ended`); one a line unless a
        format says otherwise."""
        lines = sample.count(b"\n") + (1 if ended and sample and not sample.endswith(b"\n") else 0)
        return max(lines - self.header_lines, 0)

    header_lines = 0

    @contextlib.contextmanager
    def arrow_reader(self, open_reader: Callable[[pa.NativeFile], R]) -> Iterator[R]:
        """Arrow's streaming reader (`open_reader`) over the decompressed stream, closed with it; one that
        cannot start reading raises this file's MetadataError."""
        stream = open_stream(self.url)[0]
        try:
            try:
                reader = open_reader(stream)
            except READ_ERRORS as err:
                raise self.fail(err) from None
            try:
                yield reader
            finally:
                reader.close()
        finally:
            stream.close()

    def batches(self, columns: list[str], each: Callable[[pa.RecordBatch], T]) -> Iterator[T]:
        read = self.read(columns)
        while True:
            try:
                batch = next(read, None)
            except READ_ERRORS as err:
                raise self.fail(err) from None
            if batch is None:
                return
            if batch.num_rows:
                yield each(batch)

    @abstractmethod
    def read(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The file's `columns`, batch by batch, as decompressed and parsed."""
