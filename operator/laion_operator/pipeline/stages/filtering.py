"""The filter stage of a part whose source is a URL list: its metadata filtered into shards
(pipeline/filter.py), or the shards of an earlier run with the same filter reused."""

from __future__ import annotations

from ...contract import Phase
from .. import sources
from ..columns import ColumnError
from ..filter import FilterResult, MetadataError, run_filter
from .base import Run


def wanted(run: Run) -> bool:
    return not sources.of(run.spec).converts


def run(run: Run) -> FilterResult:
    tracker, store = run.tracker, run.store
    tracker.phase(Phase.FILTERING)
    try:
        result = store.retrying("filtering", lambda: run_filter(run.spec, store, on_batch=tracker.filtered))
    except (ColumnError, MetadataError) as err:
        tracker.fail(str(err))
        raise
    tracker.filtered(result)
    run.shards = result.shards
    tracker.phase(Phase.DOWNLOADING)
    return result
