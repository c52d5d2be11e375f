"""The download stage: every filtered shard's images fetched, resized and written, a Ray task each
(pipeline/download.py); shards finished by an earlier run are kept."""

from __future__ import annotations

from ...contract import ShardStats
from ...spec import PartSpec
from .. import sources
from ..download import download_shard
from ..runtime import Outcome, store_work
from .base import Run, write_shards


def wanted(run: Run) -> bool:
    return not sources.of(run.spec).converts


def _write_shard(spec: PartSpec, shard: int, report) -> Outcome:
    """One shard's download, in its Ray task (whose process the fault tests find by this name)."""
    return store_work(spec, f"writing shard {shard}", lambda: download_shard(spec, shard, report=report))


def run(run: Run) -> dict[int, ShardStats]:
    return write_shards(run, _write_shard)
