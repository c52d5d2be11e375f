"""Stage 1: stream a part's metadata, keep the rows the spec asks for, and cut them into download shards.

Memory stays bounded by the batch size plus 16 bytes per kept row (a hash and a position), whatever
the file's size: kept rows are spilled to a local parquet file, ordered by a seeded hash of their URL
(which is at once a deterministic shuffle and a URL dedupe), and written out shard by shard.

Every row read is either kept or counted under the first condition it fails, in this order:
missing_url, minWidth, minHeight, maxPunsafe, maxPwatermark, minAesthetic, minSimilarity, languages,
sampleFraction, duplicateUrl. A null value fails the condition that reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from . import columns as cols
from .spec import PartSpec
from .storage import Store

BATCH_ROWS = 131_072
SHARDS_DIR = "_laion/shards"
MANIFEST = "_laion/filter.json"

# (counter name, spec attribute, logical field, comparison)
CONDITIONS = [
    ("minWidth", "min_width", "width", pc.greater_equal),
    ("minHeight", "min_height", "height", pc.greater_equal),
    ("maxPunsafe", "max_punsafe", "punsafe", pc.less_equal),
    ("maxPwatermark", "max_pwatermark", "pwatermark", pc.less_equal),
    ("minAesthetic", "min_aesthetic", "aesthetic", pc.greater_equal),
    ("minSimilarity", "min_similarity", "similarity", pc.greater_equal),
]


class MetadataError(ValueError):
    """A metadata file cannot be read as LAION parquet."""


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


def fingerprint(spec: PartSpec) -> str:
    """What decides the shards' content; a resumed run must see the same value."""
    data = spec.to_dict()
    key = {k: data.get(k) for k in ("source", "columns", "filter")}
    key["additional"] = data["download"]["saveAdditionalColumns"]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def open_parquet(url: str) -> pq.ParquetFile:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return pq.ParquetFile(fs.open(path, "rb"))
    except FileNotFoundError:
        raise MetadataError(f"{url}: no such metadata file") from None
    except (pa.ArrowInvalid, OSError) as err:
        raise MetadataError(f"{url}: not a readable parquet file: {err}") from None


def url_hashes(urls: pa.Array, seed: int) -> np.ndarray:
    """A seeded 64-bit hash per URL: equal URLs collide on purpose, others order at random."""
    key = f"laion-op{seed:08d}"[-16:]
    values = np.asarray(urls.to_numpy(zero_copy_only=False), dtype=object)
    return pd.util.hash_array(values, hash_key=key, categorize=False)


def _condition_masks(batch: pa.RecordBatch, mapping: dict[str, str], spec: PartSpec):
    """Yield (counter name, keep mask) for each condition the spec sets, in order."""
    flt = spec.filter
    url = batch.column(mapping["url"])
    yield "missing_url", pc.and_(pc.is_valid(url), pc.greater(pc.utf8_length(url), 0))
    for name, attr, logical, compare in CONDITIONS:
        threshold = getattr(flt, attr)
        if threshold is not None:
            yield name, compare(batch.column(mapping[logical]), threshold)
    if flt.languages is not None:
        yield "languages", pc.is_in(batch.column(mapping["language"]), pa.array(list(flt.languages)))


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
                f"its columns are: {', '.join(file_columns)}")
        out[name] = source
    return out


def _spill(spec: PartSpec, spill_path: str, result: FilterResult,
           on_batch: Callable[[FilterResult], None] | None) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1: stream all files, write kept rows to a local spill file; return their URL hashes and order."""
    needed = cols.required_fields(spec.filter)
    threshold = np.uint64(min(int(spec.filter.sample_fraction * 2**64), 2**64 - 1))
    hashes, sequence = [], []
    writer = None
    position = 0
    try:
        for url in spec.source:
            pf = open_parquet(url)
            file_columns = pf.schema_arrow.names
            mapping = cols.resolve(url, file_columns, spec.columns, needed)
            result.columns[url] = mapping
            out_cols = _output_columns(mapping, spec, file_columns, url)
            read = sorted({*out_cols.values(), *(mapping[f] for f in needed)})
            try:
                batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=read)
                for batch in batches:
                    keep = pa.array(np.ones(batch.num_rows, dtype=bool))
                    for name, mask in _condition_masks(batch, mapping, spec):
                        mask = pc.fill_null(mask, False)
                        failing = pc.and_(keep, pc.invert(mask))
                        result.dropped_by[name] = result.dropped_by.get(name, 0) + (pc.sum(failing).as_py() or 0)
                        keep = pc.and_(keep, mask)
                    result.rows_read += batch.num_rows
                    kept = batch.filter(keep)
                    h = url_hashes(kept.column(mapping["url"]), spec.filter.seed)
                    seq = np.arange(position, position + batch.num_rows, dtype=np.int64)[
                        np.asarray(keep.to_numpy(zero_copy_only=False))]
                    position += batch.num_rows
                    if spec.filter.sample_fraction < 1.0:
                        sampled = h < threshold
                        result.dropped_by["sampleFraction"] = (
                            result.dropped_by.get("sampleFraction", 0) + int((~sampled).sum()))
                        kept, h, seq = kept.filter(pa.array(sampled)), h[sampled], seq[sampled]
                    table = pa.table({name: kept.column(src) for name, src in out_cols.items()})
                    table = _normalise(table)
                    if writer is None:
                        writer = pq.ParquetWriter(spill_path, table.schema)
                    elif table.schema != writer.schema:
                        table = table.cast(writer.schema)
                    writer.write_table(table)
                    hashes.append(h)
                    sequence.append(seq)
                    if on_batch:
                        on_batch(result)
            except (pa.ArrowInvalid, OSError) as err:
                raise MetadataError(f"{url}: corrupt parquet data: {err}") from None
    finally:
        if writer is not None:
            writer.close()
    if not hashes:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    return np.concatenate(hashes), np.concatenate(sequence)


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


def _order(spec: PartSpec, hashes: np.ndarray, sequence: np.ndarray, result: FilterResult) -> np.ndarray:
    """Rank of each spilled row in the output (-1: dropped as a duplicate URL)."""
    n = len(hashes)
    rank = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return rank
    by_hash = np.lexsort((sequence, hashes))  # equal URLs adjacent, first-read first
    sorted_h = hashes[by_hash]
    first = np.ones(n, dtype=bool)
    if spec.filter.dedupe_urls:
        first[1:] = sorted_h[1:] != sorted_h[:-1]
        result.dropped_by["duplicateUrl"] = int((~first).sum())
    survivors = by_hash[first]
    if not spec.filter.shuffle:
        survivors = np.sort(survivors)  # spill order is read order
    rank[survivors] = np.arange(len(survivors))
    return rank


def _write_shards(spec: PartSpec, store: Store, spill_path: str, rank: np.ndarray, workdir: str) -> int:
    """Pass 2: route spilled rows to their shard, then write each shard in rank order."""
    per_shard = spec.filter.samples_per_shard
    kept = int((rank >= 0).sum())
    shards = -(-kept // per_shard)
    if shards == 0:
        return 0
    buckets = os.path.join(workdir, "buckets")
    spill = pq.ParquetFile(spill_path)

    def routed():
        offset = 0
        for batch in spill.iter_batches(batch_size=BATCH_ROWS):
            r = rank[offset:offset + batch.num_rows]
            offset += batch.num_rows
            keep = r >= 0
            batch = batch.filter(pa.array(keep))
            r = r[keep]
            yield batch.append_column("_rank", pa.array(r)).append_column("_shard", pa.array(r // per_shard))

    schema = spill.schema_arrow.append(pa.field("_rank", pa.int64())).append(pa.field("_shard", pa.int64()))
    ds.write_dataset(routed(), buckets, schema=schema, format="parquet",
                     partitioning=ds.partitioning(pa.schema([("_shard", pa.int64())]), flavor="hive"),
                     max_partitions=max(shards, 1024), max_open_files=256, existing_data_behavior="overwrite_or_ignore")
    for shard in range(shards):
        table = ds.dataset(os.path.join(buckets, f"_shard={shard}"), format="parquet").to_table()
        table = table.sort_by("_rank").drop_columns(["_rank"])
        with store.fs.open(store.path(SHARDS_DIR, f"{shard_name(shard)}.parquet"), "wb") as f:
            pq.write_table(table, f)
    return shards


def run_filter(spec: PartSpec, store: Store, on_batch: Callable[[FilterResult], None] | None = None) -> FilterResult:
    """Filter the part into shard files under the output, or reuse the shards of an earlier run."""
    fp = fingerprint(spec)
    done = store.read_json(MANIFEST)
    if done is not None:
        if done.get("fingerprint") != fp:
            raise MetadataError(
                f"output {store.uri} holds shards filtered from a different source, columns or filter; "
                "use a new output.uri or remove the old output first")
        return FilterResult(**done)
    result = FilterResult(fingerprint=fp)
    store.fs.makedirs(store.path(SHARDS_DIR), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="laion-filter-") as workdir:
        spill_path = os.path.join(workdir, "kept.parquet")
        hashes, sequence = _spill(spec, spill_path, result, on_batch)
        rank = _order(spec, hashes, sequence, result)
        del hashes, sequence
        result.rows_kept = int((rank >= 0).sum())
        result.shards = _write_shards(spec, store, spill_path, rank, workdir)
    # Written last: its presence means every shard file is complete.
    store.write_json(result.to_json(), MANIFEST)
    return result


def read_shard(store: Store, shard: int) -> pa.Table:
    with store.fs.open(store.path(SHARDS_DIR, f"{shard_name(shard)}.parquet"), "rb") as f:
        return pq.read_table(f)


def plan(spec: PartSpec) -> FilterResult:
    """The filter's counts without writing anything (for --dry-run)."""
    result = FilterResult(fingerprint=fingerprint(spec))
    with tempfile.TemporaryDirectory(prefix="laion-plan-") as workdir:
        spill_path = os.path.join(workdir, "kept.parquet")
        hashes, sequence = _spill(spec, spill_path, result, None)
        rank = _order(spec, hashes, sequence, result)
        result.rows_kept = int((rank >= 0).sum())
        result.shards = -(-result.rows_kept // spec.filter.samples_per_shard)
    return result
