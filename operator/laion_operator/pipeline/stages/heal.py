"""The heal stage (spec.heal, or `laion-operator heal`): the shards holding samples that failed for
the chosen reasons rewritten, a Ray task each, then the annotations, the summary and the progress
made again from every shard's stats (pipeline/heal.py). A heal already done (its reasons and round)
is not done again unless forced."""

from __future__ import annotations

import logging

from ...contract import HEAL, Phase
from ...spec import PartSpec
from ...storage import StorageUnavailable
from ...summary import HealSummary
from ..annotate import annotate
from ..heal import HealedShard, finished_stats, heal_shard, plan
from ..runtime import Outcome, ensure_ray, store_work
from .base import Run, end_if_failed, shard_pool

log = logging.getLogger(__name__)


def wanted(run: Run) -> bool:
    # set or changed on a LaionPart: heal once the part is whole; or asked for (`laion-operator heal`)
    return run.spec.heal is not None or run.heal_asked


def _heal_shard(spec: PartSpec, shard: int, report, reasons: list[str]) -> Outcome:
    """`heal_shard` in its Ray task: the whole shard again while the storage is away, as a download's."""
    return store_work(spec, f"healing shard {shard}", lambda: heal_shard(spec, shard, set(reasons), report))


def run(run: Run) -> HealSummary | None:
    """Heal the part; None when this heal was done already (the part's summary stays as it was)."""
    spec, tracker, store = run.spec, run.tracker, run.store
    planned = plan(spec, store, run.heal_reasons, run.heal_force)
    if planned is None:
        return None
    heal, manifest = planned
    ensure_ray(run.ray_address)  # after the plan: a part that cannot heal starts no Ray
    shards = manifest["shards"]
    todo = [s for s in heal["shards"] if s not in heal["done"]]
    reasons = ", ".join(heal["reasons"])
    tracker.progress.finished_at = None
    tracker.phase(Phase.DOWNLOADING, f"healing {len(heal['shards'])} shards: fetching again what failed for {reasons}")
    log.info(
        "healing %s: %d of %d shards hold samples that failed for %s", store.uri, len(heal["shards"]), shards, reasons
    )
    tracker.finished = {s.shard: s for s in finished_stats(store, shards, skip=set(todo))}
    refetched = 0

    def healed(shard: int, result: HealedShard) -> None:
        nonlocal refetched
        tracker.finished[shard] = result.stats
        refetched += result.refetched
        heal["done"].append(shard)
        store.write_json(heal, HEAL)

    pool = shard_pool(run, "heal: ", _heal_shard, on_value=healed, args=(heal["reasons"],))
    try:
        pool.run(todo)
    except StorageUnavailable as err:
        tracker.fail(str(err), store_away=True)
        raise
    end_if_failed(tracker, pool, len(todo), again="heal again to retry them")

    stats = finished_stats(store, shards)
    progress = tracker.progress
    tracker.finished = {s.shard: s for s in stats}
    progress.shards_total, progress.shards_failed = shards, 0
    tracker.count()
    progress.rows_kept = manifest.get("rows_kept", progress.rows_kept)
    progress.rows_read = manifest.get("rows_read", progress.rows_read)
    progress.dropped_by = manifest.get("dropped_by", progress.dropped_by)
    tracker.end()
    run.summary = annotate(spec, store, stats, progress)
    section = run.summary.heal = HealSummary(reasons=heal["reasons"], shards=len(heal["shards"]), refetched=refetched)
    run.write_summary()
    tracker.finish(f"healed {len(heal['shards'])} shards ({reasons}): {progress.images_ok} images in {store.uri}")
    heal["finished"] = True
    store.write_json(heal, HEAL)
    return section
