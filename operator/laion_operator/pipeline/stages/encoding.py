"""Not a stage: what the two model stages (latents, embeddings) share on the driver. Their shards
are Ray tasks, a GPU each where the cluster has GPUs (else one per CPU), the finished ones resumed
from their stats files, the running ones' counts moving the progress between completions; the part
fails when some shard failed after its retries, or at once on a model that cannot load."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from ...contract import EncodeStats, Progress
from ...spec import Embeddings, Latents
from ...storage import Store
from ..runtime import Outcome, Pool, cpus
from .base import Run, end_if_failed

log = logging.getLogger(__name__)


@dataclass
class Counts:
    """A model stage's counts, as its progress fields and the part's status show them."""

    shards_total: int = 0
    shards_done: int = 0
    shards_failed: int = 0
    written: int = 0
    skipped: int = 0
    per_second: float = 0.0

    def status(self) -> dict:
        """The CR status's section (control/status.py's `latents` and `embeddings`)."""
        return {
            "shards": {"total": self.shards_total, "done": self.shards_done, "failed": self.shards_failed},
            "written": self.written,
            "skipped": self.skipped,
            "perSecond": self.per_second,
        }


@dataclass
class Encoding:
    """One model stage, as `encode` runs it."""

    name: str  # the log's prefix
    settings: Latents | Embeddings
    work: Callable[..., Outcome]  # the Ray task's work: (spec, shard, report, *args)
    load_stats: Callable[[Store, int], EncodeStats | None]  # a finished shard's, or None
    stats: Callable[[dict], EncodeStats]  # a running shard's reported counts
    publish: Callable[[Progress, Counts], None]  # the counts into the part's progress
    args: tuple = ()


def model_work(work: Callable[[], Any]) -> Outcome:
    """A model stage's shard: `work()`'s value, or the bad input no retry can help (a model that does not load)."""
    from ..models import ModelError

    try:
        return Outcome(work())
    except ModelError as err:  # the driver ends the part as bad input
        return Outcome(bad_input=str(err))


def encode(run: Run, shards: list[int], stage: Encoding) -> list[EncodeStats]:
    """Encode the shards not encoded yet; returns every shard's stats."""
    tracker, settings = run.tracker, stage.settings
    finished: dict[int, EncodeStats] = {}
    for shard in shards:
        stats = stage.load_stats(tracker.store, shard)
        if stats is not None:
            finished[shard] = stats
    todo = [s for s in shards if s not in finished]
    if finished:
        log.info("%s: resuming, %d of %d shards already encoded", stage.name, len(finished), len(shards))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    parallelism = settings.parallelism or gpus or cpus()
    log.info("%s: %d shards on %s, %d at once", stage.name, len(todo), f"{gpus} GPUs" if gpus else "CPUs", parallelism)
    started, base = time.time(), sum(s.written for s in finished.values())
    counts = Counts(shards_total=len(shards))

    def count(partial: dict[int, dict]) -> None:
        live = [stage.stats(v) for k, v in partial.items() if k not in finished]
        counts.shards_done, counts.shards_failed = len(finished), len(pool.failed)
        counts.written = sum(s.written for s in finished.values()) + sum(s.written for s in live)
        counts.skipped = sum(s.skipped for s in finished.values()) + sum(s.skipped for s in live)
        counts.per_second = round((counts.written - base) / max(time.time() - started, 1e-6), 2)
        stage.publish(tracker.progress, counts)

    def tick(partial: dict[int, dict], moved: bool) -> None:
        count(partial)
        tracker.publish(force=moved)

    # One CPU a task besides the GPU: the decode thread and the host side of the model.
    pool = Pool(
        f"{stage.name}: ",
        stage.work,
        run.spec,
        settings.shard_retries,
        parallelism,
        on_value=finished.__setitem__,
        tick=tick,
        args=stage.args,
        num_cpus=1,
        num_gpus=1 if gpus else 0,
    )
    count({})
    tracker.publish(force=True)
    pool.run(todo)
    end_if_failed(tracker, pool, len(shards))
    return [finished[s] for s in shards if s in finished]
