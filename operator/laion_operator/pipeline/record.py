"""One shard's samples recorded, for download and convert alike: each resized, given its metadata row,
counted, written by the format's sample writer and reported while the shard runs.

Every sample's metadata row (the shard's `.parquet`, and each writer's per-sample metadata) is the
stage's own leading columns (download: the filtered row and `key`; convert: `key` and where the
sample came from) followed by `OUTCOME`, the columns defined here once. A shard is finished when its
`<shard>_stats.json` exists: `Recorder.finish` writes it after every other file of the shard, so a
shard interrupted at any point is redone whole (`clear_shard` first) and each sample lands once.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import Counter
from collections.abc import Callable

import pyarrow as pa

from ..contract import ShardStats, shard_stats
from ..spec import Download
from ..storage import Store
from . import formats
from .formats import shard_files
from .resize import Resizer

# What became of a sample, after the columns it came with.
OUTCOME: list[tuple[str, pa.DataType]] = [
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("failure_reason", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
]
KEY = pa.field("key", pa.string())


def schema(leading: pa.Schema, compute_hash: str = "none") -> pa.Schema:
    """The metadata rows' schema: the leading columns, the outcome, the image's hash if one is computed."""
    for name, kind in OUTCOME:
        leading = leading.append(pa.field(name, kind))
    if compute_hash != "none":
        leading = leading.append(pa.field(compute_hash, pa.string()))
    return leading


def make_resizer(opts: Download) -> Resizer:
    return Resizer(
        image_size=opts.image_size,
        resize_mode=opts.resize_mode,
        resize_only_if_bigger=opts.resize_only_if_bigger,
        downscale_interpolation=opts.downscale_interpolation,
        upscale_interpolation=opts.upscale_interpolation,
        encode_quality=opts.encode_quality,
        encode_format=opts.encode_format,
        skip_reencode=opts.skip_reencode,
        min_image_size=opts.min_image_size,
        max_aspect_ratio=opts.max_aspect_ratio or float("inf"),
        reduced_decode=opts.reduced_decode,
    )


def resize_reason(message: str) -> str:
    if message == "image too small":
        return "too_small"
    if message == "aspect ratio too large":
        return "aspect_ratio"
    return "decode"


class Recorder:
    """The samples of one shard into the shard's writer, counted into `stats`. Thread-safe: the
    download's decode threads record at once (resizing in parallel, writing one at a time)."""

    def __init__(
        self,
        opts: Download,
        store: Store,
        stats: ShardStats,
        save_caption: bool,
        leading: pa.Schema,
        compute_hash: str = "none",
        report: Callable[[ShardStats], None] | None = None,
        report_every: float = 2.0,
    ):
        self.store, self.stats, self.compute_hash = store, stats, compute_hash
        self.report, self.report_every = report, report_every
        self.resizer = make_resizer(opts)
        self.writer = formats.get(opts.output_format).writer(
            opts, stats.shard, store.uri, save_caption, schema(leading, compute_hash)
        )
        self.reasons: Counter[str] = Counter()
        self.opted_out: Counter[str] = Counter()  # `opt_out` by rule
        self._lock = threading.Lock()
        self._last_report = time.monotonic()

    def row(self, leading: dict) -> dict:
        """A sample's metadata row before anything became of it."""
        row = {**leading, **dict.fromkeys(name for name, _ in OUTCOME)}
        if self.compute_hash != "none":
            row[self.compute_hash] = None
        return row

    def image(self, leading: dict, caption: str | None, data: bytes, where: str = "") -> None:
        """A sample whose image arrived: resized, then written; `where` prefixes a failure's message."""
        meta = self.row(leading)
        image, width, height, orig_w, orig_h, message = self.resizer(io.BytesIO(data))
        if message is not None:
            image = None
            meta.update(status="failed_to_resize", error_message=where + message, failure_reason=resize_reason(message))
        else:
            meta.update(status="success", width=width, height=height, original_width=orig_w, original_height=orig_h)
            if self.compute_hash != "none":
                meta[self.compute_hash] = getattr(hashlib, self.compute_hash)(data).hexdigest()
        self.write(image, caption, meta)

    def failed(self, leading: dict, caption: str | None, message: str, reason: str, rule: str | None = None) -> None:
        """A sample whose image never arrived; `rule`: the opt-out that refused it (contract.OPT_OUT_RULES)."""
        meta = self.row(leading)
        meta.update(status="failed_to_download", error_message=message, failure_reason=reason)
        if rule:
            with self._lock:
                self.opted_out[rule] += 1
        self.write(None, caption, meta)

    def write(self, image: bytes | None, caption: str | None, meta: dict) -> None:
        """A sample as it is into the writer, counted, and the counts reported every `report_every` s."""
        with self._lock:
            self.writer.write(image, meta["key"], caption, meta)
            if meta["status"] == "success":
                self.stats.successes += 1
            else:
                self.stats.failed_to_resize += meta["status"] == "failed_to_resize"
                self.stats.failed_to_download += meta["status"] != "failed_to_resize"
                self.reasons[meta["failure_reason"] or "other"] += 1
            if self.report and time.monotonic() - self._last_report >= self.report_every:
                self.stats.failed_by_reason = dict(self.reasons)
                self.stats.opted_out_by = dict(self.opted_out)
                self.report(self.stats)
                self._last_report = time.monotonic()

    def close(self) -> None:
        self.writer.close()

    def finish(self) -> ShardStats:
        """Close the writer, count what the shard wrote and mark it finished: its stats file goes last."""
        self.close()
        self.stats.opted_out_by = dict(self.opted_out)
        return finish_shard(self.store, self.stats, self.reasons)


def clear_shard(store: Store, shard: int) -> None:
    """Remove whatever an earlier attempt at the shard wrote: a redone shard must not leave samples behind."""
    for stale in shard_files(shard):
        if store.fs.exists(store.path(stale)):
            store.fs.rm(store.path(stale), recursive=True)


def finish_shard(store: Store, stats: ShardStats, reasons: dict[str, int]) -> ShardStats:
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
