"""mds: MosaicML streaming's format, written by streaming's own `MDSWriter`. `<shard>/` holds the
shard's MDS files (index.json, shard.00000.mds, …) and `<shard>.parquet` the metadata of every
sample, as img2dataset's writers do; the root `index.json` merges every shard's index.

Columns: the image (`jpg`/`png`/`webp`, encoded bytes), `key` and `caption` (str), and every other
metadata field as `json` (MDS's scalar encodings cannot hold a missing value; json keeps None, ints
and floats as they were). The MDS files are written to a local folder and, for an s3:// output, put
into the bucket through the process's fsspec options, so they travel with the same credentials,
endpoint and addressing as every other file of the part (streaming's own uploader reads only boto3's
environment).

Each shard's own index keeps shards independent for resume. A trainer wants one dataset:
`StreamingDataset(remote=<output>)` reads the root `index.json`, whose entries name their files
relative to the root. That is what streaming's `merge_index` writes (basenames prefixed with their
folder; tests/pipeline/test_mds.py compares), done here because `merge_index(<output>)` takes every `.json`
below the root for an index (the shards' `_stats.json` and `_laion/` too), and through the part's
Store so that S3 is reached with the part's credentials and endpoint rather than boto3's environment.

The one MDS reader, `read_file`, reads the part's own shards and, as `MDSFolder`, an MDS dataset
anyone wrote (the latents stage's input with `laion-operator latents --mds`); `streaming()` gives
mosaicml-streaming to the latents stage's writer and to the latents loader.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec

from ... import contract
from ...contract import SHARD_DIGITS, ShardStats, sample_key, shard_name
from ...errors import InputError
from ...spec import MDS_SHARD_SIZE, Download, output_of
from ...storage import Store
from .base import BrokenShard, Format, Sample, local_copy

_FILE_KEYS = ("raw_data", "zip_data", "raw_meta", "zip_meta")


def streaming():
    """mosaicml-streaming, imported when used. Its package imports its vision datasets, and so
    torchvision, even for the writer and the reader: the `latents` extra carries torchvision for that."""
    import streaming as mds

    return mds


class MDSSampleWriter:
    """streaming's MDSWriter in img2dataset's writer shape (its constructor, write and close)."""

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format, size_limit=None):
        from img2dataset.writer import BufferedParquetWriter
        from streaming import MDSWriter  # torch and streaming: only for parts that write MDS

        self.shard_name = f"{shard_id:0{oom_shard_count}d}"
        self.output_folder = output_folder
        self.remote = "://" in output_folder
        self.local = tempfile.mkdtemp(prefix="laion-mds-") if self.remote else f"{output_folder}/{self.shard_name}"
        self.encode_format = encode_format
        self.save_caption = save_caption
        self.columns = {encode_format: "bytes", "key": "str"}
        if save_caption:
            self.columns["caption"] = "str"
        for name in schema.names:
            self.columns.setdefault(name, "json")
        self.buffered_parquet_writer = BufferedParquetWriter(
            output_folder + "/" + self.shard_name + ".parquet", schema, 100
        )
        self.mds = MDSWriter(
            columns=self.columns, out=self.local, size_limit=size_limit or MDS_SHARD_SIZE, exist_ok=True
        )

    def write(self, img_str, key, caption, meta):
        if img_str is not None:
            sample = {name: meta.get(name) for name, kind in self.columns.items() if kind == "json"}
            sample.update({self.encode_format: bytes(img_str), "key": key})
            if self.save_caption:
                sample["caption"] = str(caption) if caption is not None else ""
            self.mds.write(sample)
        self.buffered_parquet_writer.write(meta)

    def close(self):
        try:
            self.buffered_parquet_writer.close()
            self.mds.finish()
            if self.remote:
                fs, root = fsspec.core.url_to_fs(f"{self.output_folder}/{self.shard_name}")
                for name in sorted(os.listdir(self.local)):
                    fs.put_file(os.path.join(self.local, name), f"{root}/{name}")
        finally:
            if self.remote:
                shutil.rmtree(self.local, ignore_errors=True)


class MDS(Format):
    name = "mds"  # a shard is the folder of its number (no suffix): MDSWriter's files and index.json
    writer_imports = ("streaming",)  # 2 s of imports after torch's: once a worker, off the shards' path

    def sample_writer(self) -> type:
        return MDSSampleWriter

    def writer(self, opts: Download, shard: int, output: str, save_caption: bool, schema):
        return MDSSampleWriter(
            shard, output, save_caption, SHARD_DIGITS, schema, opts.encode_format, size_limit=opts.mds_shard_size_limit
        )

    def read_samples(self, store: Store, shard: int) -> Iterator[Sample]:
        index = read_index(store, shard)
        with local_copy(store, shard_name(shard)) as folder:
            for entry in index["shards"]:
                name = f"{shard_name(shard)}/{entry['raw_data']['basename']}"
                for fields in read_file(folder, entry, name):
                    meta = {k: v for k, v in fields.items() if entry_kind(entry, k) == "json"}
                    yield Sample(
                        key=fields.get("key", ""),
                        caption=fields.get("caption"),
                        image=self.image_of(fields),
                        meta=meta,
                        file=name,
                    )

    def annotation_rows(self, store: Store, opts: Download, shards: list[ShardStats]):
        """A row an MDS file, with the samples its shard's index gives it."""
        indexes = {s.shard: read_index(store, s.shard) for s in shards}
        return ["path", "num_samples"], (
            (store.url(shard_name(shard), entry["raw_data"]["basename"]), entry["samples"])
            for shard, index in sorted(indexes.items())
            for entry in index["shards"]
        )

    def annotate(self, store: Store, shards: list[ShardStats]) -> None:
        # streaming reads it with json.load; sorted keys keep the file stable across identical runs
        merged = merge({s.shard: read_index(store, s.shard) for s in shards})
        store.write_text(json.dumps(merged, sort_keys=True), contract.mds_index())


def read_file(folder: str, entry: dict, name: str) -> Iterator[dict]:
    """The samples (column → value) of the MDS file an index `entry` describes, in the local `folder`
    its basename is relative to; `name` is what errors call the file."""
    from streaming.base.format import reader_from_json

    check_size(os.path.join(folder, entry["raw_data"]["basename"]), name, entry)
    reader = reader_from_json(folder, None, entry)
    for i in range(reader.samples):
        yield reader.get_item(i)


@dataclass(frozen=True)
class MDSFolder:
    """An MDS dataset anyone wrote (`index.json` and the shard files it lists, as MDSWriter or
    streaming's merge_index leave them), read as the latents stage's input: each file the index lists
    is one shard of the stage. Its image and caption columns are named by the caller; a sample without
    a `key` column is keyed by its file and place, as img2dataset keys a shard's samples."""

    uri: str
    image_column: str = "jpg"
    caption_column: str = "caption"

    def store(self) -> Store:
        return Store(output_of({"uri": self.uri}))

    def index(self) -> dict:
        try:
            index = self.store().read_json(contract.MDS_INDEX)
        except ValueError as err:
            raise InputError(f"{self.uri}/{contract.MDS_INDEX}: not JSON, as streaming's index is: {err}") from None
        if index is None:
            raise InputError(f"{self.uri}/{contract.MDS_INDEX}: missing (an MDS folder holds its index.json)")
        entries = index.get("shards") or []
        if not entries:
            raise InputError(f"{self.uri}/{contract.MDS_INDEX}: lists no shard file")
        for column in (self.image_column, self.caption_column):
            if column not in entries[0].get("column_names", []):
                raise InputError(
                    f"{self.uri}: no column {column!r} (its columns: "
                    f"{', '.join(entries[0].get('column_names', []))}); name it with "
                    f"--image-column / --caption-column"
                )
        return index

    def shards(self) -> list[int]:
        return list(range(len(self.index()["shards"])))

    def samples(self, shard: int) -> Iterator[Sample]:
        """The samples with an image of the index's file number `shard`."""
        entry = self.index()["shards"][shard]
        store = self.store()
        name = entry["raw_data"]["basename"]
        with tempfile.TemporaryDirectory(prefix="latents-input-") as local:
            # Its basename may name a folder (a merged index): the reader finds it below `local` the same way.
            target = Path(local, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            store.fs.get_file(store.path(name), str(target))
            where = f"{self.uri}/{name}"
            for i, fields in enumerate(read_file(local, entry, where)):
                image = fields.get(self.image_column)
                if image is None:
                    continue
                if not isinstance(image, (bytes, bytearray)):  # a `pil` column: encode it back for the decoder
                    buf = io.BytesIO()
                    image.save(buf, "PNG")
                    image = buf.getvalue()
                key = fields.get("key") or sample_key(shard, i, entry["samples"])
                caption = str(fields.get(self.caption_column) or "")
                yield Sample(key=str(key), caption=caption, image=bytes(image), meta={}, file=where)


def entry_kind(entry: dict, column: str) -> str | None:
    kinds = dict(zip(entry.get("column_names", []), entry.get("column_encodings", [])))
    return kinds.get(column)


def check_size(path: str, name: str, entry: dict) -> None:
    """An MDS file as long as its index says: streaming's reader trusts the index's offsets."""
    expected = entry["raw_data"]["bytes"]
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BrokenShard(f"{name}: missing; its index lists {entry['samples']} samples in {expected} bytes") from None
    if size < expected:
        raise BrokenShard(
            f"{name}: cut short: {size} of {expected} bytes (its index.json lists "
            f"{entry['samples']} samples in {expected} bytes)"
        )
    if size > expected:
        raise BrokenShard(f"{name}: {size} bytes, its index.json says {expected}: not the file the index describes")


def read_index(store: Store, shard: int) -> dict:
    name = contract.mds_index(shard)
    try:
        data = store.read_json(name)
    except ValueError as err:
        raise BrokenShard(f"{name}: not JSON, as streaming's index is: {err}") from None
    if data is None:
        raise BrokenShard(f"{store.url(name)}: the shard's MDS index is missing")
    return data


def merge(indexes: dict[int, dict]) -> dict:
    """One index over the shards' indexes, their files named from the root (streaming's merge_index)."""
    shards = []
    for shard, index in sorted(indexes.items()):
        for entry in index["shards"]:
            entry = copy.deepcopy(entry)
            for key in _FILE_KEYS:
                if entry.get(key):
                    entry[key]["basename"] = f"{shard_name(shard)}/{entry[key]['basename']}"
            shards.append(entry)
    return {"version": 2, "shards": shards}


FORMAT = MDS()
