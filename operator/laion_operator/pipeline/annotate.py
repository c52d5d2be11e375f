"""Stage 3: the files trainers read beside the dataset, and the part's summary.

- the annotation file, whose rows the format gives (`Format.annotation_rows`): webdataset, parquet,
  tfrecord: `part_<id>_stats.csv`, a row per shard file and its sample count; mds: the same, a row
  per MDS file (`00000/shard.00000.mds`, …), and the merged `index.json` at the root that a
  StreamingDataset reads the whole part from; files: `part_<id>.csv`, a row per image with its caption;
- all formats: `part_<id>_summary.json` — counts by status and failure reason, bytes, rate, durations.
"""

from __future__ import annotations

from .. import contract
from ..contract import Progress, ShardStats
from ..spec import PartSpec
from ..storage import Store
from . import formats
from .formats.base import csv_text


def annotate(spec: PartSpec, store: Store, shards: list[ShardStats], progress: Progress) -> dict:
    """Write the annotation files and the summary; returns the summary."""
    fmt = formats.get(spec.download.output_format)
    shards = sorted(shards, key=lambda s: s.shard)
    index = contract.annotations(spec.part_id, fmt.name)
    store.write_text(csv_text(*fmt.annotation_rows(store, spec.download, shards)), index)
    fmt.annotate(store, shards)
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
        "metadata": {
            "rowsRead": progress.rows_read,
            "rowsKept": progress.rows_kept,
            "droppedBy": dict(progress.dropped_by),
        },
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
