"""The files trainers read beside the dataset, and the part's summary.

- the annotation file, whose rows the format gives (`Format.annotation_rows`): webdataset, parquet,
  tfrecord: `part_<id>_stats.csv`, a row per shard file and its sample count; mds: the same, a row
  per MDS file (`00000/shard.00000.mds`, …), and the merged `index.json` at the root that a
  StreamingDataset reads the whole part from; files: `part_<id>.csv`, a row per image with its caption;
- all formats: `part_<id>_summary.json` — counts by status and failure reason, bytes, rate, durations.
"""

from __future__ import annotations

from collections import Counter

from .. import contract
from ..contract import Progress, ShardStats
from ..spec import PartSpec
from ..storage import Store
from ..summary import Summary, Written
from . import formats
from .formats.base import csv_text


def annotate(spec: PartSpec, store: Store, shards: list[ShardStats], progress: Progress) -> Summary:
    """Write the annotation files and the summary; returns the summary."""
    fmt = formats.get(spec.download.output_format)
    shards = sorted(shards, key=lambda s: s.shard)
    index = contract.annotations(spec.part_id, fmt.name)
    store.write_text(csv_text(*fmt.annotation_rows(store, spec.download, shards)), index)
    fmt.annotate(store, shards)
    summary = Summary(spec.part_id, store.uri, written(spec, shards, progress), annotations=store.url(index))
    store.write_json(summary.to_json(), contract.summary(spec.part_id))
    return summary


def written(spec: PartSpec, shards: list[ShardStats], progress: Progress) -> Written:
    """The summary's counts: the part's progress and its finished shards' stats."""
    return Written(
        **{**progress.part_counts(), "bytes_written": sum(s.bytes_written for s in shards)},
        output_format=spec.download.output_format,
        attempted=sum(s.count for s in shards),
        ok=sum(s.successes for s in shards),
        failed_to_download=sum(s.failed_to_download for s in shards),
        failed_to_resize=sum(s.failed_to_resize for s in shards),
        opted_out_by=dict(sum((Counter(s.opted_out_by) for s in shards), Counter())),
        left_out_by=dict(sum((Counter(s.left_out_by) for s in shards), Counter())),
        slowed_down=sum(s.slowed_down for s in shards),
        success_rate=progress.success_rate,
        total_seconds=round((progress.finished_at or progress.updated_at) - progress.started_at, 3),
        shard_seconds_sum=round(sum(s.end_time - s.start_time for s in shards), 3),
    )
