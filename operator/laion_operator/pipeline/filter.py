"""Stage 1: stream a part's metadata, keep the rows the spec asks for, and cut them into download shards.

Kept rows are ordered by a seeded hash of their URL (at once a deterministic shuffle and a URL dedupe:
equal URLs hash alike and the first one read is kept), or left in read order with `shuffle: false`.
How the rows reach their shards depends on what the order needs, and memory stays bounded by the batch
size whatever the file's size:

- no shuffle, no dedupe: one pass; rows go straight from the metadata to shard files;
- shuffle: kept rows are spilled to local files by hash range (a bucket holds at most
  `BUCKET_ROWS` rows read), then each bucket is sorted by hash in memory and cut into shards in turn;
- dedupe without shuffle: kept rows are spilled in read order, their URL hashes (8 bytes a row) find
  the first of each URL, and the spill is cut into shards.

The metadata files are read by their source (`sources.urls`: parquet row groups read and filtered by a
few threads at once, in file order; csv, tsv, json, jsonl and txt lists streamed block by block), and
shard files are written by background threads while the next rows are read.

Every row read is either kept or counted under the first condition it fails, in this order:
missing_url, minWidth, minHeight, maxPunsafe, maxPwatermark, minAesthetic, minSimilarity, languages,
excluded, sampleFraction, duplicateUrl. A null value fails the condition that reads it. `excluded` (the
removal lists of `filter.exclude`, read once before the metadata: see `exclude`) comes after the column
conditions so that only their survivors' URLs are hashed; a listed URL is dropped whatever came first,
and `droppedBy.excluded` counts the listed rows that the other conditions would have kept.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..contract import MANIFEST, SHARDS_DIR, fingerprint, shard_input
from ..names import camel
from ..spec import PartSpec
from ..storage import Store
from . import columns as cols
from .exclude import Exclusions
from .exclude import load as load_exclusions
from .sources import MetadataError, open_list

__all__ = ["FilterResult", "MetadataError", "plan", "read_shard", "run_filter", "url_hashes"]

WRITE_THREADS = 2  # shard files written at once
BUCKET_ROWS = 1_000_000  # rows read per spill bucket of the shuffle: bounds the rows sorted in memory at once
MAX_BUCKET_BITS = 9  # at most 512 bucket files open at once


@dataclass
class FilterResult:
    rows_read: int = 0
    rows_kept: int = 0
    dropped_by: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    columns: dict[str, dict[str, str]] = field(default_factory=dict)
    fingerprint: str = ""

    def to_json(self) -> dict:
        return self.__dict__.copy()


def url_hashes(urls: pa.Array, seed: int) -> np.ndarray:
    """A seeded 64-bit hash per URL: equal URLs collide on purpose, others order at random."""
    key = f"laion-op{seed:08d}"[-16:]
    values = np.asarray(urls.to_numpy(zero_copy_only=False), dtype=object)
    return pd.util.hash_array(values, hash_key=key, categorize=False)


def _condition_masks(batch: pa.RecordBatch, mapping: dict[str, str], spec: PartSpec):
    """Yield (counter name, keep mask) for each condition the spec sets, in order."""
    flt = spec.filter
    url = batch.column(mapping["url"])
    yield "missing_url", pc.and_(pc.is_valid(url), pc.greater(pc.binary_length(url), 0))  # bytes: no scan
    for name, attr, logical, compare in cols.CONDITIONS:
        threshold = getattr(flt, attr)
        if threshold is not None:
            yield name, compare(batch.column(mapping[logical]), threshold)
    if flt.languages is not None:
        yield "languages", pc.is_in(batch.column(mapping[cols.LANGUAGE_FIELD]), pa.array(list(flt.languages)))


def _output_columns(mapping: dict[str, str], spec: PartSpec, file_columns: list[str], url: str) -> dict[str, str]:
    """Output column name -> file column: url, caption, and the additional columns to save."""
    out = {"url": mapping["url"]}
    if "caption" in mapping:
        out["caption"] = mapping["caption"]
    for name in spec.download.save_additional_columns:
        source = mapping.get(name, name)
        if source not in file_columns:
            raise cols.ColumnError(
                f"{url}: column {name!r} (spec.download.saveAdditionalColumns) is not in the file; "
                f"its columns are: {', '.join(file_columns)}"
            )
        out[name] = source
    return out


def _normalise(table: pa.Table) -> pa.Table:
    """Same types whatever the file: strings as large_string would split schemas between files."""
    fields = []
    for f in table.schema:
        if pa.types.is_large_string(f.type) or pa.types.is_string(f.type):
            fields.append(pa.field(f.name, pa.string()))
        elif pa.types.is_floating(f.type):
            fields.append(pa.field(f.name, pa.float64()))
        elif pa.types.is_integer(f.type):
            fields.append(pa.field(f.name, pa.int64()))
        else:
            fields.append(f)
    return table.cast(pa.schema(fields))


@dataclass
class Kept:
    """One batch's kept rows, their URL hashes and their positions among all rows read."""

    table: pa.Table
    hashes: np.ndarray | None
    positions: np.ndarray | None

    @property
    def url_keys(self) -> np.ndarray:
        """The URL hashes, which only a shuffle or a dedupe has the batches read with."""
        if self.hashes is None:
            raise ValueError("kept rows read without their URL hashes")
        return self.hashes


@dataclass
class _Filtered:
    """One batch filtered: its kept rows (output columns), how many rows it had, the rows each
    condition dropped (in condition order) and, when asked, the kept rows' offsets in the batch."""

    table: pa.Table
    rows: int
    dropped: list[tuple[str, int]]
    offsets: np.ndarray | None


def _filter_batch(
    batch: pa.RecordBatch,
    mapping: dict[str, str],
    spec: PartSpec,
    out_cols: dict[str, str],
    with_offsets: bool,
    exclusions: Exclusions | None = None,
) -> _Filtered:
    keep = None
    dropped = []
    remaining = batch.num_rows
    for name, mask in _condition_masks(batch, mapping, spec):
        mask = pc.fill_null(mask, False)
        keep = mask if keep is None else pc.and_(keep, mask)
        left = keep.true_count
        dropped.append((name, remaining - left))
        remaining = left
    # Only the output columns are taken: the condition columns are done with. A take by index copies
    # the kept strings about twice as fast as a filter by mask.
    offsets = pc.indices_nonzero(keep)
    if exclusions is not None:
        listed = exclusions.matches(batch.column(mapping["url"]).take(offsets))
        dropped.append(("excluded", int(listed.sum())))
        if listed.any():
            offsets = pa.array(offsets.to_numpy()[~listed])
    table = _normalise(
        pa.Table.from_arrays([batch.column(src) for src in out_cols.values()], names=list(out_cols)).take(offsets)
    )
    return _Filtered(table, batch.num_rows, dropped, offsets.to_numpy().astype(np.int64) if with_offsets else None)


def _not_numeric(url: str, schema: pa.Schema, mapping: dict[str, str], spec: PartSpec) -> cols.ColumnError | None:
    """The error of a file whose column a threshold compares holds something else than numbers."""
    bad = [
        f"{mapping[logical]!r} ({logical}, spec.filter.{camel(attr)}) is {schema.field(mapping[logical]).type}"
        for _name, attr, logical, _compare in cols.CONDITIONS
        if getattr(spec.filter, attr) is not None
        and not pa.types.is_integer(schema.field(mapping[logical]).type)
        and not pa.types.is_floating(schema.field(mapping[logical]).type)
    ]
    return (
        cols.ColumnError(f"{url}: not numbers, so no threshold applies: column {'; column '.join(bad)}")
        if bad
        else None
    )


def _kept_batches(
    spec: PartSpec,
    result: FilterResult,
    on_batch: Callable[[FilterResult], None] | None,
    with_hashes: bool,
    with_positions: bool,
) -> Iterator[Kept]:
    """Pass 1: stream all files and yield each batch's kept rows, counting the rows dropped."""
    needed = cols.required_fields(spec.filter)
    sampling = spec.filter.sample_fraction < 1.0
    threshold = np.uint64(min(int(spec.filter.sample_fraction * 2**64), 2**64 - 1))
    schema = None
    position = 0
    # Read before any metadata: a bad list fails the run at once, and every batch matches against it.
    exclusions = load_exclusions(spec.filter.exclude) if spec.filter.exclude else None
    if exclusions is not None:
        result.dropped_by["excluded"] = 0
    for url in spec.source:
        listed = open_list(spec, url)
        mapping = cols.resolve(url, listed.columns, spec.columns, needed)
        result.columns[url] = mapping
        out_cols = _output_columns(mapping, spec, listed.columns, url)
        read = sorted({*out_cols.values(), *(mapping[f] for f in needed)})

        def filter_batch(batch: pa.RecordBatch, mapping=mapping, out_cols=out_cols, url=url) -> _Filtered:
            try:
                return _filter_batch(batch, mapping, spec, out_cols, with_positions, exclusions)
            except pa.ArrowNotImplementedError:  # a threshold against a column of text?
                not_numeric = _not_numeric(url, batch.schema, mapping, spec)
                if not_numeric is None:
                    raise
                raise not_numeric from None

        for filtered in listed.batches(read, filter_batch):
            for name, count in filtered.dropped:
                result.dropped_by[name] = result.dropped_by.get(name, 0) + count
            result.rows_read += filtered.rows
            table = filtered.table
            h = url_hashes(table.column("url"), spec.filter.seed) if with_hashes or sampling else None
            seq = filtered.offsets + position if filtered.offsets is not None else None
            position += filtered.rows
            if h is not None and sampling:
                sampled = h < threshold
                result.dropped_by["sampleFraction"] = result.dropped_by.get("sampleFraction", 0) + int((~sampled).sum())
                table, h = table.filter(pa.array(sampled)), h[sampled]
                seq = seq[sampled] if seq is not None else None
            if schema is None:
                schema = table.schema
            elif table.schema != schema:
                table = table.cast(schema)
            yield Kept(table, h if with_hashes else None, seq)
            if on_batch:
                on_batch(result)


class ShardWriter:
    """Cuts a stream of tables into shards of exactly samples_per_shard rows (the last one fewer),
    written by a background thread while the caller produces the next rows."""

    def __init__(self, store: Store, per_shard: int):
        self.store, self.per_shard = store, per_shard
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.shards = 0
        self.rows = 0
        self._pool = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="shard-writer")
        self._writing: deque[Future] = deque()

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= self.per_shard:
            rows = pa.concat_tables(self.pending)
            start = 0
            while rows.num_rows - start >= self.per_shard:
                self._write(rows.slice(start, self.per_shard))
                start += self.per_shard
            self.pending = [rows.slice(start)]
            self.pending_rows = rows.num_rows - start

    def _write(self, table: pa.Table) -> None:
        while len(self._writing) >= 2 * WRITE_THREADS:  # a few shards in memory waiting to be written
            self._writing.popleft().result()
        self._writing.append(self._pool.submit(self._put, self.shards, table))
        self.shards += 1

    def _put(self, shard: int, table: pa.Table) -> None:
        path = self.store.path(shard_input(shard))
        # URLs and captions are nearly all distinct, and nothing reads a shard by statistics. Shards are
        # scratch for the download tasks, read once: compressing them would cost a third of the writing.
        options = {"use_dictionary": False, "write_statistics": False, "compression": "none"}
        sink = (
            pa.OSFile(path, "wb")
            if isinstance(self.store.fs, fsspec.implementations.local.LocalFileSystem)
            else self.store.fs.open(path, "wb")
        )  # Arrow's own file locally: no Python call per write
        with sink:
            pq.write_table(table, sink, **options)

    def close(self) -> int:
        """Write the last, partial shard and wait for every write; returns the number of shards."""
        try:
            if self.pending_rows:
                self._write(pa.concat_tables(self.pending))
            self.pending, self.pending_rows = [], 0
            while self._writing:
                self._writing.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        return self.shards

    def abort(self) -> None:
        self.pending, self.pending_rows = [], 0
        self._pool.shutdown(wait=True, cancel_futures=True)


def _rows_in(spec: PartSpec) -> int:
    return sum(open_list(spec, url).rows for url in spec.source)


def _shuffled(spec: PartSpec, batches: Iterator[Kept], workdir: str, result: FilterResult) -> Iterator[pa.Table]:
    """Kept rows in (URL hash, read position) order, first of each URL only when deduping.

    Rows are spilled to 2**bits files by the top bits of their hash, so that each file's rows come
    before the next file's; each file is then sorted in memory on its own."""
    bits = min(MAX_BUCKET_BITS, int(np.ceil(np.log2(max(_rows_in(spec) / BUCKET_ROWS, 1)))))
    buckets = 1 << bits
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    paths = [os.path.join(workdir, f"bucket-{b:05d}.arrow") for b in range(buckets)]
    try:
        for kept in batches:
            table = kept.table.append_column("_hash", pa.array(kept.hashes)).append_column(
                "_pos", pa.array(kept.positions)
            )
            bucket = (
                (kept.hashes >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(table.num_rows, np.int64)
            )
            order = np.argsort(bucket, kind="stable")
            table, bucket = table.take(pa.array(order)), bucket[order]
            bounds = np.searchsorted(bucket, np.arange(buckets + 1))
            for b in np.unique(bucket):
                if b not in writers:
                    writers[b] = pa.ipc.new_stream(paths[b], table.schema)
                writers[b].write_table(table.slice(bounds[b], bounds[b + 1] - bounds[b]))
    finally:
        for w in writers.values():
            w.close()
    duplicates = 0
    for b in sorted(writers):
        with pa.OSFile(paths[b]) as source:
            table = pa.ipc.open_stream(source).read_all()
        os.remove(paths[b])
        hashes = table.column("_hash").to_numpy()
        order = np.lexsort((table.column("_pos").to_numpy(), hashes))
        if spec.filter.dedupe_urls:
            first = _run_heads(hashes[order])
            duplicates += int((~first).sum())
            order = order[first]
        yield table.drop_columns(["_hash", "_pos"]).take(pa.array(order))
    if spec.filter.dedupe_urls:
        result.dropped_by["duplicateUrl"] = duplicates


def _deduped_in_read_order(batches: Iterator[Kept], workdir: str, result: FilterResult) -> Iterator[pa.Table]:
    """Kept rows in read order, the first of each URL only."""
    path = os.path.join(workdir, "kept.arrow")
    hashes = []
    writer = None
    try:
        for kept in batches:
            if writer is None:
                writer = pa.ipc.new_stream(path, kept.table.schema)
            writer.write_table(kept.table)
            hashes.append(kept.url_keys)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        result.dropped_by["duplicateUrl"] = 0
        return
    first = _first_of_each(np.concatenate(hashes))
    del hashes
    result.dropped_by["duplicateUrl"] = int((~first).sum())
    offset = 0
    with pa.OSFile(path) as source:
        for batch in pa.ipc.open_stream(source):
            keep = first[offset : offset + batch.num_rows]
            offset += batch.num_rows
            yield pa.Table.from_batches([batch.filter(pa.array(keep))])


def _run_heads(sorted_hashes: np.ndarray) -> np.ndarray:
    """True where a run of equal hashes starts: the first row of each URL, once the rows are in
    (hash, read position) order."""
    head = np.ones(len(sorted_hashes), dtype=bool)
    head[1:] = sorted_hashes[1:] != sorted_hashes[:-1]
    return head


def _first_of_each(hashes: np.ndarray) -> np.ndarray:
    """True at the first occurrence of each hash, in read order."""
    first = np.zeros(len(hashes), dtype=bool)
    order = np.argsort(hashes, kind="stable")  # equal hashes adjacent, first read first
    first[order[_run_heads(hashes[order])]] = True
    return first


def _ordered(spec: PartSpec, result: FilterResult, on_batch, workdir: str) -> Iterator[pa.Table]:
    """The kept rows, in output order."""
    flt = spec.filter
    batches = _kept_batches(
        spec, result, on_batch, with_hashes=flt.shuffle or flt.dedupe_urls, with_positions=flt.shuffle
    )
    if flt.shuffle:
        return _shuffled(spec, batches, workdir, result)
    if flt.dedupe_urls:
        return _deduped_in_read_order(batches, workdir, result)
    return (kept.table for kept in batches)


def run_filter(spec: PartSpec, store: Store, on_batch: Callable[[FilterResult], None] | None = None) -> FilterResult:
    """Filter the part into shard files under the output, or reuse the shards of an earlier run."""
    fp = fingerprint(spec)
    done = store.read_json(MANIFEST)
    if done is not None:
        if done.get("fingerprint") != fp:
            raise MetadataError(
                f"output {store.uri} holds shards filtered from a different source, columns or filter; "
                "use a new output.uri or remove the old output first"
            )
        return FilterResult(**done)
    result = FilterResult(fingerprint=fp)
    store.fs.makedirs(store.path(SHARDS_DIR), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="laion-filter-") as workdir:
        writer = ShardWriter(store, spec.filter.samples_per_shard)
        try:
            for table in _ordered(spec, result, on_batch, workdir):
                writer.add(table)
        except BaseException:
            writer.abort()
            raise
        result.shards = writer.close()
        result.rows_kept = writer.rows
    # Written last: its presence means every shard file is complete.
    store.write_json(result.to_json(), MANIFEST)
    return result


def read_shard(store: Store, shard: int) -> pa.Table:
    with store.fs.open(store.path(shard_input(shard)), "rb") as f:
        return pq.read_table(f)


def plan(spec: PartSpec) -> FilterResult:
    """The filter's counts without writing anything (for --dry-run)."""
    result = FilterResult(fingerprint=fingerprint(spec))
    hashes = []
    for kept in _kept_batches(spec, result, None, with_hashes=spec.filter.dedupe_urls, with_positions=False):
        result.rows_kept += kept.table.num_rows
        if spec.filter.dedupe_urls:
            hashes.append(kept.url_keys)
    if spec.filter.dedupe_urls:
        unique = int(_first_of_each(np.concatenate(hashes)).sum()) if hashes else 0
        result.dropped_by["duplicateUrl"] = result.rows_kept - unique
        result.rows_kept = unique
    result.shards = -(-result.rows_kept // spec.filter.samples_per_shard)
    return result
