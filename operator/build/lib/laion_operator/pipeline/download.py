"""Stage 2: download, resize and write one shard, with img2dataset's resizing and sample writers.

The shard loop is ours rather than img2dataset's `Downloader` for what that class cannot do: fetch
many URLs at once on one event loop under deadlines, size caps, an address guard and per-host limits
(`fetch`), turn off TLS verification without patching the library, classify every failure into a
bounded set of reasons, report progress while a shard runs, and keep the shard's input so that a
re-run can redo it. A shard is finished when its `<shard>_stats.json` exists; it is written after
every other file of the shard, so a shard interrupted at any point is redone whole and each sample
lands exactly once. Samples are written in the order their downloads finish, as img2dataset does.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections import Counter
from typing import Callable

import pyarrow as pa
from img2dataset.writer import (
    FilesSampleWriter,
    ParquetSampleWriter,
    WebDatasetSampleWriter,
)

from ..contract import SHARD_DIGITS, ShardStats, sample_key, shard_files, shard_stats
from ..spec import Download, PartSpec
from ..storage import Store
from . import fetch
from .fetch import FetchError
from .filter import read_shard
from .resize import Resizer
from .writers import MDSSampleWriter, TFRecordSampleWriter  # img2dataset's TFRecord one needs tensorflow

WRITERS = {
    "webdataset": WebDatasetSampleWriter,
    "files": FilesSampleWriter,
    "parquet": ParquetSampleWriter,
    "tfrecord": TFRecordSampleWriter,
    "mds": MDSSampleWriter,
}


def make_writer(opts: Download, shard: int, output: str, save_caption: bool, schema: pa.Schema):
    """The outputFormat's sample writer for one shard (img2dataset's constructor, plus MDS's size)."""
    extra = {"size_limit": opts.mds_shard_size_limit} if opts.output_format == "mds" else {}
    return WRITERS[opts.output_format](shard, output, save_caption, SHARD_DIGITS, schema, opts.encode_format,
                                       **extra)


_REUSED = object()  # a row whose earlier sample is written again (download_shard's `reuse`)


def resize_reason(message: str) -> str:
    if message == "image too small":
        return "too_small"
    if message == "aspect ratio too large":
        return "aspect_ratio"
    return "decode"


def task_cpus() -> int:
    """CPUs this shard task may use: its Ray resources inside a Ray task, else this process's CPUs."""
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(int(round(cpus)), 1)
    except Exception:  # noqa: BLE001 - not in a task: the process's own CPUs
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_resizer(opts: Download) -> Resizer:
    return Resizer(
        image_size=opts.image_size, resize_mode=opts.resize_mode, resize_only_if_bigger=opts.resize_only_if_bigger,
        downscale_interpolation=opts.downscale_interpolation, upscale_interpolation=opts.upscale_interpolation,
        encode_quality=opts.encode_quality, encode_format=opts.encode_format, skip_reencode=opts.skip_reencode,
        min_image_size=opts.min_image_size, max_aspect_ratio=opts.max_aspect_ratio or float("inf"),
        reduced_decode=opts.reduced_decode,
    )


def load_stats(store: Store, shard: int) -> ShardStats | None:
    data = store.read_json(shard_stats(shard))
    return ShardStats.from_json(data) if data else None


def _schema(table: pa.Table, opts: Download) -> pa.Schema:
    schema = table.schema
    for name, kind in [("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
                       ("failure_reason", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                       ("original_width", pa.int32()), ("original_height", pa.int32())]:
        schema = schema.append(pa.field(name, kind))
    if opts.compute_hash != "none":
        schema = schema.append(pa.field(opts.compute_hash, pa.string()))
    return schema


def download_shard(spec: PartSpec, shard: int,
                   report: Callable[[ShardStats], None] | None = None, report_every: float = 2.0,
                   reuse: dict[str, tuple[bytes | None, dict]] | None = None, threads: int | None = None) -> ShardStats:
    """Download one shard into the output; returns its stats (also persisted: contract.shard_stats).

    Decoding and resizing run on `threads` threads (default: the task's CPUs). `reuse` (a heal,
    pipeline/heal.py): key → the sample's earlier image bytes (None if it failed) and metadata row,
    written again as they were instead of fetched; the other rows are fetched."""
    opts = spec.download
    store = Store(spec.output)
    clear_shard(store, shard)
    table = read_shard(store, shard)
    stats = ShardStats(shard=shard, count=table.num_rows, start_time=time.time())
    reasons: Counter[str] = Counter()
    columns = table.column_names
    rows = table.to_pylist()
    resizer = make_resizer(opts)
    writer = make_writer(opts, shard, store.uri, "caption" in columns, _schema(table, opts))
    lock = threading.Lock()
    last_report = [time.monotonic()]

    def blank(index: int) -> dict:
        row = rows[index]
        meta = {**row, "key": sample_key(shard, index, spec.filter.samples_per_shard), "status": None,
                "error_message": None, "failure_reason": None,
                "width": None, "height": None, "original_width": None, "original_height": None}
        if opts.compute_hash != "none":
            meta[opts.compute_hash] = None
        return meta

    def write(index: int, image: bytes | None, meta: dict) -> None:
        """One sample into the shard's one writer, counted (under the lock: decode threads call it)."""
        with lock:
            writer.write(image, meta["key"], rows[index].get("caption"), meta)
            if meta["status"] == "success":
                stats.successes += 1
            else:
                stats.failed_to_resize += meta["status"] == "failed_to_resize"
                stats.failed_to_download += meta["status"] != "failed_to_resize"
                reasons[meta["failure_reason"] or "other"] += 1
            if report and time.monotonic() - last_report[0] >= report_every:
                stats.failed_by_reason = dict(reasons)
                report(stats)
                last_report[0] = time.monotonic()

    def handle(index: int, data: bytes | None, err: FetchError | None) -> None:
        """One URL's outcome, on a decode thread: resize, then write."""
        meta = blank(index)
        image = None
        if err is not None:
            meta.update(status="failed_to_download", error_message=str(err), failure_reason=err.reason)
        else:
            image, width, height, orig_w, orig_h, message = resizer(io.BytesIO(data))
            if message is not None:
                image = None
                meta.update(status="failed_to_resize", error_message=message, failure_reason=resize_reason(message))
            else:
                meta.update(status="success", width=width, height=height, original_width=orig_w,
                            original_height=orig_h)
                if opts.compute_hash != "none":
                    meta[opts.compute_hash] = getattr(hashlib, opts.compute_hash)(data).hexdigest()
        write(index, image, meta)

    fetched = []
    for index in range(len(rows)):
        if reuse and sample_key(shard, index, spec.filter.samples_per_shard) in reuse:
            meta = blank(index)
            image, earlier = reuse[meta["key"]]
            meta.update({k: earlier.get(k) for k in meta if k in earlier})
            write(index, image, meta)
        else:
            fetched.append(index)
    fetch.run([rows[i]["url"] for i in fetched], opts, lambda j, data, err: handle(fetched[j], data, err),
              threads or task_cpus())
    writer.close()
    return finish_shard(store, stats, reasons)


def clear_shard(store: Store, shard: int) -> None:
    """Remove whatever an earlier attempt at the shard wrote: a redone shard must not leave samples behind."""
    for stale in shard_files(shard):
        if store.fs.exists(store.path(stale)):
            store.fs.rm(store.path(stale), recursive=True)


def finish_shard(store: Store, stats: ShardStats, reasons: dict[str, int]) -> ShardStats:
    """Count what the shard wrote and mark it finished: its stats file goes last, after every other file."""
    stats.failed_by_reason = dict(reasons)
    stats.bytes_written = sum(_size(store, store.path(path)) for path in shard_files(stats.shard))
    stats.end_time = time.time()
    store.write_json(stats.to_json(), shard_stats(stats.shard))
    return stats


def _size(store: Store, path: str) -> int:
    if not store.fs.exists(path):
        return 0
    if store.fs.isdir(path):
        return sum(store.fs.du(path, total=False).values())
    return int(store.fs.size(path) or 0)
