"""The verify stage: every shard read back with its format's reader, a Ray task each through the shard
pool (pipeline/verify.py). A mismatch fails the part and un-finishes the bad shards, so that running
the part again redoes them."""

from __future__ import annotations

from ... import contract
from ...contract import Phase, Verification
from ...spec import PartSpec
from ...storage import Store
from ..runtime import Outcome, PartFailed, Pool, cpus
from ..verify import ShardCheck, check_shard, verify
from .base import Run, end_if_failed


def wanted(run: Run) -> bool:
    return run.spec.verify


def _check_shard(spec: PartSpec, shard: int, report) -> Outcome:
    """One shard read back, in its Ray task."""
    return Outcome(check_shard(Store(spec.output), spec.download.output_format, shard))


def run(run: Run) -> Verification:
    spec, tracker, store = run.spec, run.tracker, run.store
    tracker.phase(Phase.VERIFYING)

    def check_all(shards: list[int]) -> list[ShardCheck]:
        checks: dict[int, ShardCheck] = {}
        pool = Pool(
            "verify: ",
            _check_shard,
            spec,
            spec.download.shard_retries,
            spec.download.parallelism or cpus(),
            on_value=checks.__setitem__,
            tick=lambda partial, moved: None,
        )
        pool.run(shards)
        end_if_failed(tracker, pool, len(shards))
        return [checks[s] for s in sorted(checks)]

    result = verify(store, spec.part_id, spec.download.output_format, check_all=check_all)
    summary = run.written_summary()
    summary.verified = result
    run.write_summary()
    tracker.progress.verified = result.to_json()
    if not result.ok:
        for shard in result.bad_shards:
            store.fs.rm(store.path(contract.shard_stats(shard)))
        redo = f"; running the part again redoes shards {result.bad_shards[:10]}" if result.bad_shards else ""
        tracker.fail(f"verify: {result.message}{redo}")
        raise PartFailed(tracker.progress.message)
    return result
