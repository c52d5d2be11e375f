"""The convert stage of a part whose source is a dataset on disk: its input shards listed into the
manifest (or an earlier run's list reused), then each written again in the part's outputFormat, a Ray
task each (pipeline/convert.py)."""

from __future__ import annotations

from ...contract import Phase, ShardStats
from ...spec import PartSpec
from .. import sources
from ..convert import ConvertError, convert_shard
from ..convert import plan as plan_conversion
from ..runtime import Outcome, store_work
from .base import Run, write_shards


def wanted(run: Run) -> bool:
    return sources.of(run.spec).converts


def _write_shard(spec: PartSpec, shard: int, report) -> Outcome:
    """One input shard converted, in its Ray task."""
    return store_work(spec, f"writing shard {shard}", lambda: convert_shard(spec, shard, report=report))


def run(run: Run) -> dict[int, ShardStats]:
    tracker = run.tracker
    tracker.phase(Phase.CONVERTING)
    try:
        run.shards = plan_conversion(run.spec, run.store)["shards"]
    except ConvertError as err:
        tracker.fail(str(err))
        raise
    tracker.progress.shards_total = run.shards
    finished = write_shards(run, _write_shard)
    # a conversion reads no metadata: its rows are the samples it read
    tracker.progress.rows_read = tracker.progress.rows_kept = sum(s.count for s in finished.values())
    return finished
