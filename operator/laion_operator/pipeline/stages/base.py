"""What every stage is, and what the stages of one run share.

A stage is a module with `wanted(run) -> bool` (does this run take it) and `run(run) -> its result`,
the one entry the driver calls; `stages.PART` lists a part's stages in order. The shard stages
(download, convert, verify, latents, heal) run their shards through `runtime.Pool`, their progress
kept by the run's `Tracker`; what they share is here: resuming the shards already finished, running
the others, and ending the part when some failed after their retries.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ...contract import ShardStats
from ...errors import InputError
from ...spec import PartSpec
from ...storage import StorageUnavailable, Store
from ...summary import Summary
from ..formats.mds import MDSFolder
from ..resume import DamagedOutput, check_no_stray_shards, finished_shard
from ..runtime import PartFailed, Pool, Work, cpus, ensure_ray
from ..tracker import Tracker

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One run of a list of stages over a part: what a stage reads and leaves for the next ones."""

    spec: PartSpec
    tracker: Tracker
    ray_address: str | None = None
    shards: int = 0  # the part's shards, once planned (filter, convert)
    wrote: bool = False  # a stage of this run wrote the part's shards (download, convert)
    summary: Summary | None = None  # annotate's, then each later stage's section in it
    # latents: the shards to encode (None: the part's finished ones) and an MDS folder to read them
    # from instead of the part's output (`laion-operator latents --mds`, a formats.mds.MDSFolder)
    encode: list[int] | None = None
    mds: MDSFolder | None = None
    # heal: the failure reasons to fetch again (None: spec.heal's), and whether to heal again a heal
    # already done
    heal_reasons: list[str] | None = None
    heal_force: bool = False
    heal_asked: bool = False  # heal whatever spec.heal says (`laion-operator heal`)

    @property
    def store(self) -> Store:
        return self.tracker.store

    def written_summary(self) -> Summary:
        """The summary a stage after annotate adds its section to."""
        if self.summary is None:
            raise RuntimeError("no summary yet: annotate runs before the stages that add to it")
        return self.summary

    def write_summary(self) -> None:
        from ... import contract

        summary = self.written_summary()
        self.store.write_json(summary.to_json(), contract.summary(self.spec.part_id))


class Stage(Protocol):
    """A stage module."""

    def wanted(self, run: Run) -> bool: ...

    def run(self, run: Run) -> object: ...


def end_if_failed(tracker: Tracker, pool: Pool, total: int, again: str = "run the part again to retry them") -> None:
    """End the part when shards of the stage failed after their retries, naming them and the first's error."""
    if pool.failed:
        tracker.fail(pool.failure(total, again))
        raise PartFailed(tracker.progress.message)


def write_shards(run: Run, work: Work) -> dict[int, ShardStats]:
    """The download or convert stage's shards: the unfinished ones written (`work`, a Ray task each),
    the finished ones resumed; the part fails when any failed after its retries."""
    tracker = run.tracker
    ensure_ray(run.ray_address)
    try:
        pool = _write_unfinished(run, work)
    except (StorageUnavailable, DamagedOutput) as err:
        tracker.count()
        tracker.fail(str(err), store_away=True)
        raise
    tracker.count()
    run.wrote = True
    failed, errors = pool.failed, pool.errors
    if failed and all(isinstance(errors.get(s), InputError) for s in failed):
        # a shard's input that cannot be read (convert): no retry can help, the exit code says so
        tracker.fail(str(errors[min(failed)]))
        raise errors[min(failed)]
    end_if_failed(tracker, pool, run.shards)
    return tracker.finished


def _write_unfinished(run: Run, work: Work) -> Pool:
    spec, tracker, store, shards = run.spec, run.tracker, run.store, run.shards
    fmt = spec.download.output_format
    store.retrying("checking the output for stray shards", lambda: check_no_stray_shards(store, shards))
    for shard in range(shards):
        stats = store.retrying(f"reading shard {shard}'s stats", functools.partial(finished_shard, store, shard, fmt))
        if stats is not None:
            tracker.finished[shard] = stats
    todo = [s for s in range(shards) if s not in tracker.finished]
    if tracker.finished:
        log.info("resuming: %d of %d shards already finished", len(tracker.finished), shards)
    tracker.count()
    tracker.publish(force=True)
    pool = shard_pool(run, "", work, on_value=tracker.finished.__setitem__)
    pool.run(todo)
    return pool


def shard_pool(
    run: Run, stage: str, work: Work, on_value: Callable[[int, Any], None], args: tuple = (), **resources: Any
) -> Pool:
    """A pool over the part's shards at the download's retries and parallelism, its ticks moving the
    tracker's image counts (download, convert, heal)."""
    spec, tracker = run.spec, run.tracker
    pool = Pool(
        stage,
        work,
        spec,
        spec.download.shard_retries,
        spec.download.parallelism or cpus(),
        on_value=on_value,
        tick=lambda partial, moved: tracker.tick(partial, moved, len(pool.failed), pool.errors),
        args=args,
        **resources,
    )
    return pool
