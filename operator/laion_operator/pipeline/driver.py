"""One part, end to end on Ray: filter → download (a Ray task per shard) → annotate → verify.

A part whose source is a dataset (`source.dataset`) lists its input shards instead of filtering and
converts them, one Ray task per shard, through the same loop, progress and annotations.

The CLI calls `run_part` in-process on a local Ray; the operator's Ray job calls the same function
on a cluster. Progress is persisted to `contract.PROGRESS` in the output as it changes, which is
what the operator, its metrics and a resumed run read.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Callable

import ray

from .. import credentials
from .. import contract
from ..contract import PROGRESS, InputError, Phase, Progress, ShardStats
from ..spec import PartSpec
from ..storage import Store
from .annotate import annotate
from .columns import ColumnError
from .convert import ConvertError, convert_shard
from .convert import plan as plan_conversion
from .download import download_shard, load_stats
from .filter import FilterResult, MetadataError, run_filter
from .verify import verify

log = logging.getLogger(__name__)


class PartFailed(RuntimeError):
    """The part ended with shards that failed after all their retries."""


def ensure_ray(address: str | None = None) -> None:
    """Join the Ray cluster of a Ray job, or the given address, or start a local one on loopback."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_JOB_ID") or (not address and os.environ.get("RAY_ADDRESS")):
        ray.init(log_to_driver=False)  # inside a Ray job: the job's runtime env already carries everything
    elif address:
        # Workers of an existing cluster do not share this process's environment: ship the credentials.
        folder = credentials.working_dir(credentials.from_environment())
        try:
            ray.init(address=address, log_to_driver=False, runtime_env={"working_dir": folder})
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # uploaded to the cluster; no copy stays behind
    else:
        # A private cluster on loopback for this run: Ray's notice that it turned token authentication
        # on would be the first thing the user reads, about a cluster they never see.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 configure_logging=False)


@ray.remote(num_cpus=0)
class Board:
    """Counts of the shards still running, so that progress moves between shard completions."""

    def __init__(self):
        self.partial: dict[int, dict] = {}

    def report(self, shard: int, stats: dict) -> None:
        self.partial[shard] = stats

    def forget(self, shard: int) -> None:
        self.partial.pop(shard, None)

    def snapshot(self) -> dict[int, dict]:
        return dict(self.partial)


@ray.remote(num_cpus=1)
def _shard(spec_data: dict, shard: int, board) -> dict:
    """One shard's work: download its filtered rows, or convert its input shard."""
    spec = PartSpec.from_dict(spec_data)
    work = convert_shard if spec.dataset else download_shard
    stats = work(spec, shard, report=lambda s: board.report.remote(shard, s.to_json()))
    return stats.to_json()


@ray.remote(num_cpus=1)
def _check(spec_data: dict, shard: int) -> dict:
    from .verify import check_shard

    spec = PartSpec.from_dict(spec_data)
    return check_shard(Store(spec.output), spec.download.output_format, shard).to_json()


class Tracker:
    """Keeps a Progress current from finished and running shards, and publishes it (throttled)."""

    def __init__(self, store: Store, progress: Progress, on_progress: Callable[[Progress], None] | None,
                 every: float = 2.0):
        self.store, self.progress, self.on_progress, self.every = store, progress, on_progress, every
        self.finished: dict[int, ShardStats] = {}
        self.errors: dict[int, BaseException] = {}  # the last error of each failed shard
        self._last = 0.0

    def phase(self, phase: Phase, message: str = "") -> None:
        self.progress.phase = phase.value
        self.progress.message = message
        self.publish(force=True)

    def filtered(self, result: FilterResult) -> None:
        self.progress.rows_read = result.rows_read
        self.progress.rows_kept = result.rows_kept
        self.progress.dropped_by = dict(result.dropped_by)
        self.progress.shards_total = result.shards
        self.publish()

    def count(self, running: dict[int, dict] | None = None) -> None:
        shards = list(self.finished.values())
        shards += [ShardStats.from_json(s) for k, s in (running or {}).items() if k not in self.finished]
        p = self.progress
        p.shards_done = len(self.finished)
        p.images_ok = sum(s.successes for s in shards)
        p.images_failed = sum(s.failed for s in shards)
        reasons: dict[str, int] = {}
        for s in shards:
            for reason, n in s.failed_by_reason.items():
                reasons[reason] = reasons.get(reason, 0) + n
        p.failed_by_reason = reasons
        p.bytes_written = sum(s.bytes_written for s in self.finished.values())

    def publish(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.every:
            return
        self._last = now
        self.progress.updated_at = now
        self.store.write_json(self.progress.to_json(), PROGRESS)
        if self.on_progress:
            self.on_progress(self.progress)


def _download_all(spec: PartSpec, tracker: Tracker, shards: int) -> list[int]:
    """Run the unfinished shards as Ray tasks; returns the shards that failed after their retries."""
    for shard in range(shards):
        stats = load_stats(tracker.store, shard)
        if stats is not None:
            tracker.finished[shard] = stats
    todo = [s for s in range(shards) if s not in tracker.finished]
    if tracker.finished:
        log.info("resuming: %d of %d shards already finished", len(tracker.finished), shards)
    tracker.count()
    tracker.publish(force=True)
    parallelism = spec.download.parallelism or max(int(ray.cluster_resources().get("CPU", 1)), 1)
    board = Board.remote()
    task = _shard.options(max_retries=spec.download.shard_retries, retry_exceptions=True)
    spec_data = spec.to_dict()
    running: dict = {}
    failed: list[int] = []
    errors: dict[int, str] = {}
    while todo or running:
        while todo and len(running) < parallelism:
            shard = todo.pop(0)
            running[task.remote(spec_data, shard, board)] = shard
        ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        for ref in ready:
            shard = running.pop(ref)
            try:
                tracker.finished[shard] = ShardStats.from_json(ray.get(ref))
            except Exception as err:  # noqa: BLE001 - a shard's failure is recorded, the part goes on
                log.error("shard %d failed after %d retries: %s", shard, spec.download.shard_retries, err)
                failed.append(shard)
                errors[shard] = getattr(err, "cause", None) or err  # Ray wraps the task's exception
            board.forget.remote(shard)
        tracker.progress.shards_failed = len(failed)
        tracker.count(ray.get(board.snapshot.remote()))
        tracker.publish(force=bool(ready))
    ray.kill(board)
    tracker.errors = errors
    return failed


def run_part(spec: PartSpec, on_progress: Callable[[Progress], None] | None = None) -> dict:
    """Filter, download and annotate one part; returns the summary written beside the dataset."""
    store = Store(spec.output)
    store.check_writable()
    tracker = Tracker(store, Progress(part_id=spec.part_id), on_progress)
    tracker.phase(Phase.CONVERTING if spec.dataset else Phase.FILTERING)
    try:
        if spec.dataset:
            shards = plan_conversion(spec, store)["shards"]
            tracker.progress.shards_total = shards
        else:
            result = run_filter(spec, store, on_batch=tracker.filtered)
            tracker.filtered(result)
            shards = result.shards
            tracker.phase(Phase.DOWNLOADING)
    except (ColumnError, MetadataError, ConvertError) as err:
        tracker.progress.finished_at = time.time()
        tracker.phase(Phase.FAILED, str(err))
        raise
    ensure_ray()
    failed = _download_all(spec, tracker, shards)
    tracker.count()
    if failed and all(isinstance(tracker.errors.get(s), InputError) for s in failed):
        # a shard's input that cannot be read (convert): no retry can help, the exit code says so
        tracker.progress.finished_at = time.time()
        tracker.phase(Phase.FAILED, str(tracker.errors[min(failed)]))
        raise tracker.errors[min(failed)]
    if failed:
        tracker.progress.finished_at = time.time()
        first = min(failed)
        tracker.phase(Phase.FAILED, f"{len(failed)} of {shards} shards failed after "
                                f"{spec.download.shard_retries} retries: {sorted(failed)[:10]}; "
                                f"shard {first}: {str(tracker.errors.get(first, 'unknown error'))[:500]}; "
                                "run the part again to retry them")
        raise PartFailed(tracker.progress.message)
    if spec.dataset:  # a conversion reads no metadata: its rows are the samples it read
        tracker.progress.rows_read = tracker.progress.rows_kept = sum(s.count for s in tracker.finished.values())
    tracker.phase(Phase.ANNOTATING)
    tracker.progress.finished_at = time.time()
    summary = annotate(spec, store, list(tracker.finished.values()), tracker.progress)
    if spec.verify:
        summary = _verify(spec, store, tracker, summary)
    tracker.phase(Phase.SUCCEEDED, f"{tracker.progress.images_ok} images in {store.uri}")
    return summary


def _verify(spec: PartSpec, store: Store, tracker: Tracker, summary: dict) -> dict:
    """Read every shard back (a Ray task each); a mismatch fails the part and un-finishes the bad
    shards, so that running the part again redoes them."""
    tracker.phase(Phase.VERIFYING)
    spec_data = spec.to_dict()

    def check_all(shards):
        from .verify import ShardCheck

        refs = [_check.remote(spec_data, shard) for shard in shards]
        return [ShardCheck.from_json(ray.get(ref)) for ref in refs]

    result = verify(store, spec.part_id, spec.download.output_format, check_all=check_all)
    summary["verified"] = result.to_json()
    store.write_json(summary, contract.summary(spec.part_id))
    tracker.progress.verified = result.to_json()
    if not result.ok:
        for shard in result.bad_shards:
            store.fs.rm(store.path(contract.shard_stats(shard)))
        redo = f"; running the part again redoes shards {result.bad_shards[:10]}" if result.bad_shards else ""
        tracker.progress.finished_at = time.time()
        tracker.phase(Phase.FAILED, f"verify: {result.message}{redo}")
        raise PartFailed(tracker.progress.message)
    return summary
