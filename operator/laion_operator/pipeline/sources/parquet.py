"""A URL list in parquet, LAION's own metadata format, read row group by row group.

Row groups of at most PARALLEL_ROW_GROUP_ROWS are read and turned whole, READ_THREADS at once, each by
a thread of its own with a file handle of its own (one decode thread a row group: Arrow's own column
threads cost more CPU for the same work). Larger row groups are streamed batch by batch, Arrow
decoding the next batch while this one is turned.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .base import ListFile, ListReader, MetadataError, T, in_order

BATCH_ROWS = 131_072
PARALLEL_ROW_GROUP_ROWS = 1 << 20  # row groups up to this size are read whole, several at once
READ_THREADS = max(2, min(4, os.cpu_count() or 2))  # row groups read and turned at once


def open_parquet(url: str, metadata=None, memory_map: bool = False) -> pq.ParquetFile:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        # pre_buffer would cache every row group read so far: memory would grow with the file.
        if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
            # Arrow's own reads: no Python call per read
            return pq.ParquetFile(path, pre_buffer=False, metadata=metadata, memory_map=memory_map)
        return pq.ParquetFile(fs.open(path, "rb"), pre_buffer=False, metadata=metadata)
    except FileNotFoundError:
        raise MetadataError(f"{url}: no such metadata file") from None
    except (pa.ArrowInvalid, OSError) as err:
        raise MetadataError(f"{url}: not a readable parquet file: {err}") from None


class ParquetList(ListFile):
    def __init__(self, url: str):
        super().__init__(url)
        self.file = open_parquet(url)

    @property
    def columns(self) -> list[str]:
        return self.file.schema_arrow.names

    @property
    def rows(self) -> int:
        return self.file.metadata.num_rows

    def batches(self, columns: list[str], each: Callable[[pa.RecordBatch], T]) -> Iterator[T]:
        try:
            yield from self._batches(columns, each)
        except (pa.ArrowInvalid, OSError) as err:
            raise MetadataError(f"{self.url}: corrupt parquet data: {err}") from None

    def _batches(self, columns: list[str], each: Callable[[pa.RecordBatch], T]) -> Iterator[T]:
        url, meta = self.url, self.file.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if READ_THREADS > 1 and sizes and max(sizes) <= PARALLEL_ROW_GROUP_ROWS:
            local = isinstance(fsspec.core.url_to_fs(url)[0], fsspec.implementations.local.LocalFileSystem)
            handles = threading.local()
            opened: list[pq.ParquetFile] = []

            def handle() -> pq.ParquetFile:
                if local:
                    # Mapped for one row group only: the mapped pages do not add up over the file.
                    return open_parquet(url, metadata=meta, memory_map=True)
                own = getattr(handles, "pf", None)
                if own is None:  # a remote file: one handle a thread, kept
                    own = handles.pf = open_parquet(url, metadata=meta)
                    opened.append(own)
                return own

            def row_group(i: int) -> list[T]:
                own = handle()
                try:
                    return [
                        each(batch)
                        for batch in own.iter_batches(
                            batch_size=BATCH_ROWS, row_groups=[i], columns=columns, use_threads=False
                        )
                    ]
                finally:
                    if local:
                        own.close()

            try:
                for turned in in_order((functools.partial(row_group, i) for i in range(len(sizes))), READ_THREADS):
                    yield from turned
            finally:
                for own in opened:
                    own.close()
            return
        # One reader thread a batch ahead: Arrow decodes the next batch without the GIL while this one
        # is turned. One worker runs the tasks in turn, so `next` is never called concurrently.
        batches, end = self.file.iter_batches(batch_size=BATCH_ROWS, columns=columns), object()
        for batch in in_order((lambda: next(batches, end) for _ in itertools.count()), 1):
            if batch is end:
                return
            yield each(batch)


class Parquet(ListReader):
    name = "parquet"
    suffixes = (".parquet",)

    def open(self, url: str, header: tuple[str, ...] | None = None) -> ListFile:
        self.no_header(url, header)
        return ParquetList(url)


READER = Parquet()
