"""A part's progress as its stages run: kept current from the finished and running shards, published
(throttled) to `contract.PROGRESS`, which the operator, its metrics and a resumed run read."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..contract import FAILURE_REASONS, PROGRESS, Phase, Progress, ShardStats
from ..storage import StorageUnavailable, Store
from .filter import FilterResult


class Tracker:
    """Keeps a Progress current from finished and running shards, and publishes it (throttled)."""

    def __init__(
        self, store: Store, progress: Progress, on_progress: Callable[[Progress], None] | None, every: float = 2.0
    ):
        self.store, self.progress, self.on_progress, self.every = store, progress, on_progress, every
        self.finished: dict[int, ShardStats] = {}
        # Shards whose input could not be fetched (an archive: expired, too large, unreachable), by
        # the reason their last error gave: counted with the images' reasons, as a fetch is.
        self.unfetched: dict[int, str] = {}
        self._last = 0.0

    def phase(self, phase: Phase, message: str = "") -> None:
        self.progress.phase = phase
        self.progress.message = message
        self.publish(force=True)

    def end(self) -> None:
        """The part's work is over, as far as its summary's duration goes."""
        self.progress.finished_at = time.time()

    def fail(self, message: str, store_away: bool = False) -> None:
        """End the part as Failed with `message`. With `store_away` the failure may be the store's
        itself: a progress that cannot be written stays as it was (the job's exit code and log say it)."""
        self.end()
        try:
            self.phase(Phase.FAILED, message)
        except StorageUnavailable:
            if not store_away:
                raise

    def finish(self, message: str) -> None:
        """End the part as Succeeded with `message` (its end stays where a stage set it)."""
        if self.progress.finished_at is None:
            self.end()
        self.phase(Phase.SUCCEEDED, message)

    def filtered(self, result: FilterResult) -> None:
        self.progress.rows_read = result.rows_read
        self.progress.rows_kept = result.rows_kept
        self.progress.dropped_by = dict(result.dropped_by)
        self.progress.shards_total = result.shards
        self.publish()

    def count(self, running: dict[int, dict] | None = None) -> None:
        live = [ShardStats.from_json(s) for k, s in (running or {}).items() if k not in self.finished]
        self.progress.shards_done = len(self.finished)
        self.progress.count_images(list(self.finished.values()), live)
        for reason in self.unfetched.values():
            self.progress.failed_by_reason[reason] = self.progress.failed_by_reason.get(reason, 0) + 1

    def tick(
        self, partial: dict[int, dict], moved: bool, failed: int, errors: dict[int, BaseException] | None = None
    ) -> None:
        """After each wait of a shard stage: the running shards' counts so far and the failed shards
        (`errors`: their last errors, those naming a failure reason counted under it); published at
        once when a shard ended (`moved`), else throttled."""
        self.progress.shards_failed = failed
        for shard, err in (errors or {}).items():
            reason = getattr(err, "reason", None)
            if reason in FAILURE_REASONS and shard not in self.finished:
                self.unfetched[shard] = reason
        self.count(partial)
        self.publish(force=moved)

    def publish(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.every:
            return
        self._last = now
        self.progress.updated_at = now
        self.store.retrying("writing the progress", lambda: self.store.write_json(self.progress.to_json(), PROGRESS))
        if self.on_progress:
            self.on_progress(self.progress)
