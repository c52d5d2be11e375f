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
import math
import os
import threading
import time
from collections import Counter
from typing import Callable

import pyarrow as pa
from img2dataset.downloader import compute_key
from img2dataset.writer import (
    FilesSampleWriter,
    ParquetSampleWriter,
    WebDatasetSampleWriter,
)

from ..contract import SHARD_DIGITS, ShardStats, shard_files, shard_stats
from ..spec import Download, PartSpec
from ..storage import Store
from . import fetch
from .fetch import FetchError
from .filter import read_shard
from .resize import Resizer
from .writers import TFRecordSampleWriter  # img2dataset's needs tensorflow; ours writes the same files

WRITERS = {
    "webdataset": WebDatasetSampleWriter,
    "files": FilesSampleWriter,
    "parquet": ParquetSampleWriter,
    "tfrecord": TFRecordSampleWriter,
}


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


def download_shard(spec: PartSpec, shard: int, report: Callable[[ShardStats], None] | None = None,
                   report_every: float = 2.0, threads: int | None = None) -> ShardStats:
    """Download one shard into the output; returns its stats (also persisted as <shard>_stats.json).
    Decoding and resizing run on `threads` threads (default: the task's CPUs)."""
    opts = spec.download
    store = Store(spec.output)
    for stale in shard_files(shard):  # a partial earlier attempt must not leave samples behind
        if store.fs.exists(store.path(stale)):
            store.fs.rm(store.path(stale), recursive=True)
    table = read_shard(store, shard)
    stats = ShardStats(shard=shard, count=table.num_rows, start_time=time.time())
    reasons: Counter[str] = Counter()
    columns = table.column_names
    rows = table.to_pylist()
    resizer = make_resizer(opts)
    writer = WRITERS[opts.output_format](
        shard, store.uri, "caption" in columns, SHARD_DIGITS, _schema(table, opts), opts.encode_format)
    oom_samples = math.ceil(math.log10(max(spec.filter.samples_per_shard, 2)))
    lock = threading.Lock()
    last_report = [time.monotonic()]

    def handle(index: int, data: bytes | None, err: FetchError | None) -> None:
        """One URL's outcome, on a decode thread: resize, then write (one writer, under the lock)."""
        row = rows[index]
        key = compute_key(index, shard, oom_samples, SHARD_DIGITS)
        meta = {**row, "key": key, "status": None, "error_message": None, "failure_reason": None,
                "width": None, "height": None, "original_width": None, "original_height": None}
        if opts.compute_hash != "none":
            meta[opts.compute_hash] = None
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
        with lock:
            writer.write(image, key, row.get("caption"), meta)
            if meta["status"] == "success":
                stats.successes += 1
            else:
                stats.failed_to_download += meta["status"] == "failed_to_download"
                stats.failed_to_resize += meta["status"] == "failed_to_resize"
                reasons[meta["failure_reason"]] += 1
            if report and time.monotonic() - last_report[0] >= report_every:
                stats.failed_by_reason = dict(reasons)
                report(stats)
                last_report[0] = time.monotonic()

    fetch.run([row["url"] for row in rows], opts, handle, threads or task_cpus())
    writer.close()
    stats.failed_by_reason = dict(reasons)
    stats.bytes_written = sum(_size(store, store.path(path)) for path in shard_files(shard))
    stats.end_time = time.time()
    store.write_json(stats.to_json(), shard_stats(shard))
    return stats


def _size(store: Store, path: str) -> int:
    if not store.fs.exists(path):
        return 0
    if store.fs.isdir(path):
        return sum(store.fs.du(path, total=False).values())
    return int(store.fs.size(path) or 0)
