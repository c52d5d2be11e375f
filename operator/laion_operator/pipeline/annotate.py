"""Stage 3: the files trainers read beside the dataset, and the part's summary.

- webdataset, parquet, tfrecord: `part_<id>_stats.csv` — one row per shard file and its sample count;
- mds: `part_<id>_stats.csv` — one row per MDS shard file (`00000/shard.00000.mds`, …), and the merged
  `index.json` at the root that a StreamingDataset reads the whole part from;
- files: `part_<id>.csv` — one row per image with its caption;
- all formats: `part_<id>_summary.json` — counts by status and failure reason, bytes, rate, durations.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

import pyarrow.parquet as pq

from .. import contract
from ..contract import Progress, ShardStats, shard_name
from ..spec import PartSpec
from ..storage import Store
from . import mds


def _csv(header: list[str], rows) -> str:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(header)
    out.writerows(rows)
    return buf.getvalue()


def _successful_keys(store: Store, shard: int) -> list[tuple[str, str]]:
    with store.fs.open(store.path(contract.shard_metadata(shard)), "rb") as f:
        table = pq.read_table(f)
    captions = table.column("caption").to_pylist() if "caption" in table.column_names else [""] * table.num_rows
    return [(key, caption or "") for key, status, caption in
            zip(table.column("key").to_pylist(), table.column("status").to_pylist(), captions)
            if status == "success"]


def annotate(spec: PartSpec, store: Store, shards: list[ShardStats], progress: Progress) -> dict:
    """Write the annotation files and the summary; returns the summary."""
    fmt = spec.download.output_format
    shards = sorted(shards, key=lambda s: s.shard)
    index = contract.annotations(spec.part_id, fmt)
    if fmt == "files":
        ext = spec.download.encode_format
        rows: Iterable[tuple[str, str | int]] = ((store.url(shard_name(s.shard), f"{key}.{ext}"), caption)
                for s in shards for key, caption in _successful_keys(store, s.shard))
        store.write_text(_csv(["image_path", "caption"], rows), index)
    elif fmt == "mds":
        indexes = {s.shard: mds.read_index(store, s.shard) for s in shards}
        rows = ((store.url(shard_name(shard), name), samples)
                for shard, entry in sorted(indexes.items()) for name, samples in mds.shard_files(entry))
        store.write_text(_csv(["path", "num_samples"], rows), index)
        mds.write_merged_index(store, indexes)
    else:
        rows = ((store.url(contract.shard_data(s.shard, fmt)), s.successes) for s in shards)
        store.write_text(_csv(["path", "num_samples"], rows), index)
    summary = summarize(spec, store, shards, progress)
    summary["annotations"] = store.url(index)
    store.write_json(summary, contract.summary(spec.part_id))
    return summary


def summarize(spec: PartSpec, store: Store, shards: list[ShardStats], progress: Progress) -> dict:
    download_seconds = sum(s.end_time - s.start_time for s in shards)
    return {
        "partId": spec.part_id,
        "output": store.uri,
        "outputFormat": spec.download.output_format,
        "metadata": {"rowsRead": progress.rows_read, "rowsKept": progress.rows_kept,
                     "droppedBy": dict(progress.dropped_by)},
        "shards": {"total": progress.shards_total, "done": progress.shards_done, "failed": progress.shards_failed},
        "images": {
            "attempted": sum(s.count for s in shards),
            "ok": sum(s.successes for s in shards),
            "failedToDownload": sum(s.failed_to_download for s in shards),
            "failedToResize": sum(s.failed_to_resize for s in shards),
            "failedByReason": dict(progress.failed_by_reason),
        },
        "successRate": progress.success_rate,
        "bytesWritten": sum(s.bytes_written for s in shards),
        "durations": {
            "totalSeconds": round((progress.finished_at or progress.updated_at) - progress.started_at, 3),
            "shardSecondsSum": round(download_seconds, 3),
        },
    }
