"""Stage 2: download, resize and write one shard, with img2dataset's resizing and sample writers.

The shard loop is ours rather than img2dataset's `Downloader` for what that class cannot do: turn off
TLS verification without patching the library, classify every failure into a bounded set of
reasons, report progress while a shard runs, and keep the shard's input so that a re-run can redo it.
A shard is finished when its `<shard>_stats.json` exists; it is written after every other file of the
shard, so a shard interrupted at any point is redone whole and each sample lands exactly once.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import math
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections import Counter
from multiprocessing.pool import ThreadPool
from typing import Callable

import pyarrow as pa
from img2dataset.downloader import compute_key, is_disallowed
from img2dataset.writer import (
    FilesSampleWriter,
    ParquetSampleWriter,
    WebDatasetSampleWriter,
)

from ..contract import SHARD_DIGITS, ShardStats, shard_files, shard_stats
from ..spec import Download, PartSpec
from ..storage import Store
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


class FetchError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def classify(err: BaseException) -> str:
    """One of contract.FAILURE_REASONS for an exception raised while fetching."""
    if isinstance(err, urllib.error.HTTPError):
        return "http_4xx" if 400 <= err.code < 500 else "http_5xx" if err.code >= 500 else "other"
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
        return "timeout"
    if isinstance(reason, ssl.SSLError):
        return "tls"
    if isinstance(reason, socket.gaierror):
        return "dns"
    if isinstance(reason, http.client.IncompleteRead):
        return "decode"  # a truncated body is a corrupt image
    if isinstance(reason, (ConnectionError, http.client.HTTPException)):
        return "connection"
    return "other"


def resize_reason(message: str) -> str:
    if message == "image too small":
        return "too_small"
    if message == "aspect ratio too large":
        return "aspect_ratio"
    return "decode"


class Fetcher:
    """HTTP GET of one image the way img2dataset does it, with optional TLS verification."""

    def __init__(self, opts: Download):
        self.timeout = opts.timeout
        self.retries = opts.retries
        self.token = opts.user_agent_token.strip().lower() if opts.user_agent_token else None
        self.directives = {d.strip().lower() for d in opts.disallowed_header_directives} or None
        agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
        if self.token:
            agent += f" (compatible; {self.token}; +https://github.com/rom1504/img2dataset)"
        self.headers = {"User-Agent": agent}
        self.context = None
        if not opts.verify_tls:
            self.context = ssl.create_default_context()
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE

    def once(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as r:
                if self.directives and is_disallowed(r.headers, self.token, self.directives):
                    raise FetchError("opt_out", "Use of image disallowed by X-Robots-Tag directive")
                return r.read()
        except FetchError:
            raise
        except Exception as err:  # noqa: BLE001 - every network failure is a sample's failure, not the shard's
            raise FetchError(classify(err), str(err) or type(err).__name__) from None

    def __call__(self, url: str) -> bytes:
        for attempt in range(self.retries + 1):
            try:
                return self.once(url)
            except FetchError as err:
                if attempt == self.retries or err.reason in ("opt_out", "http_4xx"):
                    raise
        raise AssertionError("unreachable")


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
                   reuse: dict[str, tuple[bytes | None, dict]] | None = None) -> ShardStats:
    """Download one shard into the output; returns its stats (also persisted: contract.shard_stats).

    `reuse` (a heal, pipeline/heal.py): key → the sample's earlier image bytes (None if it failed) and
    metadata row, written again as they were instead of fetched; the other rows are fetched."""
    opts = spec.download
    store = Store(spec.output)
    clear_shard(store, shard)
    table = read_shard(store, shard)
    stats = ShardStats(shard=shard, count=table.num_rows, start_time=time.time())
    reasons: Counter[str] = Counter()
    columns = table.column_names
    rows = table.to_pylist()
    fetch = Fetcher(opts)
    resizer = make_resizer(opts)
    writer = make_writer(opts, shard, store.uri, "caption" in columns, _schema(table, opts))
    oom_samples = math.ceil(math.log10(max(spec.filter.samples_per_shard, 2)))

    def get(index: int):
        if reuse and compute_key(index, shard, oom_samples, SHARD_DIGITS) in reuse:
            return index, _REUSED, None
        try:
            return index, fetch(rows[index]["url"]), None
        except FetchError as err:
            return index, None, err

    last_report = time.monotonic()
    with ThreadPool(opts.threads_per_task) as pool:
        for index, data, err in pool.imap_unordered(get, range(len(rows))):
            row = rows[index]
            key = compute_key(index, shard, oom_samples, SHARD_DIGITS)
            meta = {**row, "key": key, "status": None, "error_message": None, "failure_reason": None,
                    "width": None, "height": None, "original_width": None, "original_height": None}
            if opts.compute_hash != "none":
                meta[opts.compute_hash] = None
            image = None
            if data is _REUSED:
                image, earlier = reuse[key]
                meta.update({k: earlier.get(k) for k in meta if k in earlier})
                if meta["status"] == "success":
                    stats.successes += 1
                else:
                    reason = meta["failure_reason"] or "other"
                    reasons[reason] += 1
                    if meta["status"] == "failed_to_resize":
                        stats.failed_to_resize += 1
                    else:
                        stats.failed_to_download += 1
            elif err is not None:
                stats.failed_to_download += 1
                meta.update(status="failed_to_download", error_message=str(err), failure_reason=err.reason)
                reasons[err.reason] += 1
            else:
                image, width, height, orig_w, orig_h, message = resizer(io.BytesIO(data))
                if message is not None:
                    image = None
                    reason = resize_reason(message)
                    stats.failed_to_resize += 1
                    meta.update(status="failed_to_resize", error_message=message, failure_reason=reason)
                    reasons[reason] += 1
                else:
                    stats.successes += 1
                    meta.update(status="success", width=width, height=height,
                                original_width=orig_w, original_height=orig_h)
                    if opts.compute_hash != "none":
                        meta[opts.compute_hash] = getattr(hashlib, opts.compute_hash)(data).hexdigest()
            writer.write(image, key, row.get("caption"), meta)
            if report and time.monotonic() - last_report >= report_every:
                stats.failed_by_reason = dict(reasons)
                report(stats)
                last_report = time.monotonic()
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
