"""One part, end to end on Ray, as a list of stages: filter → download (a Ray task per shard) →
annotate → verify → with `spec.latents`, encode (a Ray task per shard, on a GPU where the cluster has
them) → with `spec.heal`, heal (a Ray task per shard to heal).

A part whose source is a dataset (`source.dataset`) lists its input shards instead of filtering and
converts them, one Ray task per shard, through the same pool, progress and annotations.

The CLI calls `run_part` in-process on a local Ray; the operator's Ray job calls the same function
on a cluster. The shard stages run through `runtime.Pool`; `tracker.Tracker` persists the progress
to `contract.PROGRESS` as it changes, which is what the operator, its metrics and a resumed run read.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import ray

from .. import contract
from ..contract import PROGRESS, LatentStats, Phase, Progress
from ..errors import InputError
from ..spec import PartSpec
from ..storage import StorageUnavailable, Store
from .annotate import annotate
from .columns import ColumnError
from .convert import ConvertError, convert_shard
from .convert import plan as plan_conversion
from .download import download_shard
from .filter import MetadataError, run_filter
from .heal import heal
from .resume import DamagedOutput, check_no_stray_shards, finished_shard, finished_shards
from .runtime import Outcome, PartFailed, Pool, cpus, ensure_ray, enter_working_dir, store_work
from .tracker import Tracker
from .verify import verify

__all__ = ["PartFailed", "encode_part", "run_part"]

log = logging.getLogger(__name__)


# --- the work of one shard, in its Ray task ----------------------------------------------------------


def _write_shard(spec: PartSpec, shard: int, report) -> Outcome:
    """One shard's work: download its filtered rows, or convert its input shard."""
    work = convert_shard if spec.dataset else download_shard
    return store_work(spec, f"writing shard {shard}", lambda: work(spec, shard, report=report))


def _encode_shard(spec: PartSpec, shard: int, report, source=None) -> Outcome:
    from .latents import encode_shard
    from .models import ModelError

    try:
        return Outcome(encode_shard(spec, shard, report=report, source=source))
    except ModelError as err:  # a retry cannot load it either: the driver ends the part as bad input
        return Outcome(bad_input=str(err))


@ray.remote(num_cpus=1)
def _check(spec_data: dict, shard: int) -> dict:
    from .verify import check_shard

    enter_working_dir()
    spec = PartSpec.from_dict(spec_data)
    return check_shard(Store(spec.output), spec.download.output_format, shard).to_json()


# --- the stages ---------------------------------------------------------------------------------------


def _plan(spec: PartSpec, store: Store, tracker: Tracker) -> int:
    """Filter the metadata into shards, or list the input shards to convert; returns the shards."""
    tracker.phase(Phase.CONVERTING if spec.dataset else Phase.FILTERING)
    try:
        if spec.dataset:
            shards = plan_conversion(spec, store)["shards"]
            tracker.progress.shards_total = shards
        else:
            result = store.retrying("filtering", lambda: run_filter(spec, store, on_batch=tracker.filtered))
            tracker.filtered(result)
            shards = result.shards
            tracker.phase(Phase.DOWNLOADING)
    except (ColumnError, MetadataError, ConvertError) as err:
        tracker.fail(str(err))
        raise
    return shards


def _write_all(spec: PartSpec, tracker: Tracker, shards: int) -> None:
    """Download or convert the unfinished shards, a Ray task each; the part fails when any failed
    after its retries."""
    try:
        pool = _run_shards(spec, tracker, shards)
    except (StorageUnavailable, DamagedOutput) as err:
        tracker.count()
        tracker.fail(str(err), store_away=True)
        raise
    tracker.count()
    failed, errors = pool.failed, pool.errors
    if failed and all(isinstance(errors.get(s), InputError) for s in failed):
        # a shard's input that cannot be read (convert): no retry can help, the exit code says so
        tracker.fail(str(errors[min(failed)]))
        raise errors[min(failed)]
    if failed:
        first = min(failed)
        tracker.fail(
            f"{len(failed)} of {shards} shards failed after {spec.download.shard_retries} retries: "
            f"{sorted(failed)[:10]}; shard {first}: {str(errors.get(first, 'unknown error'))[:500]}; "
            "run the part again to retry them"
        )
        raise PartFailed(tracker.progress.message)
    if spec.dataset:  # a conversion reads no metadata: its rows are the samples it read
        tracker.progress.rows_read = tracker.progress.rows_kept = sum(s.count for s in tracker.finished.values())


def _run_shards(spec: PartSpec, tracker: Tracker, shards: int) -> Pool:
    """Run the unfinished shards as Ray tasks; returns the pool, whose `failed` failed after their retries."""
    store, fmt = tracker.store, spec.download.output_format
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

    pool = Pool(
        "",
        _write_shard,
        spec,
        spec.download.shard_retries,
        spec.download.parallelism or cpus(),
        on_value=tracker.finished.__setitem__,
        tick=lambda partial, moved: tracker.tick(partial, moved, len(pool.failed)),
    )
    pool.run(todo)
    return pool


def _annotate(spec: PartSpec, tracker: Tracker) -> dict:
    tracker.phase(Phase.ANNOTATING)
    tracker.end()
    return tracker.store.retrying(
        "writing the annotations",
        lambda: annotate(spec, tracker.store, list(tracker.finished.values()), tracker.progress),
    )


def _verify(spec: PartSpec, tracker: Tracker, summary: dict) -> dict:
    """Read every shard back (a Ray task each); a mismatch fails the part and un-finishes the bad
    shards, so that running the part again redoes them."""
    store = tracker.store
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
        tracker.fail(f"verify: {result.message}{redo}")
        raise PartFailed(tracker.progress.message)
    return summary


def _encode_all(
    spec: PartSpec, tracker: Tracker, shards: list[int], source=None
) -> tuple[list[LatentStats], list[int]]:
    """Encode the shards not encoded yet as Ray tasks, a GPU each when the cluster has GPUs;
    returns every encoded shard's stats and the shards that failed after their retries."""
    from .latents import load_stats

    settings = spec.latents
    p = tracker.progress
    finished: dict[int, LatentStats] = {}
    for shard in shards:
        stats = load_stats(tracker.store, shard)
        if stats is not None:
            finished[shard] = stats
    todo = [s for s in shards if s not in finished]
    if finished:
        log.info("latents: resuming, %d of %d shards already encoded", len(finished), len(shards))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    parallelism = settings.parallelism or gpus or cpus()
    log.info("latents: %d shards on %s, %d at once", len(todo), f"{gpus} GPUs" if gpus else "CPUs", parallelism)
    started, base = time.time(), sum(s.written for s in finished.values())

    def count(partial: dict[int, dict]) -> None:
        live = [LatentStats.from_json(v) for k, v in partial.items() if k not in finished]
        p.latents_shards_done = len(finished)
        p.latents_shards_failed = len(pool.failed)
        p.latents_written = sum(s.written for s in finished.values()) + sum(s.written for s in live)
        p.latents_skipped = sum(s.skipped for s in finished.values()) + sum(s.skipped for s in live)
        p.latents_per_second = round((p.latents_written - base) / max(time.time() - started, 1e-6), 2)

    def tick(partial: dict[int, dict], moved: bool) -> None:
        count(partial)
        tracker.publish(force=moved)

    # One CPU a task besides the GPU: the decode thread and the host side of the model.
    pool = Pool(
        "latents: ",
        _encode_shard,
        spec,
        settings.shard_retries,
        parallelism,
        on_value=finished.__setitem__,
        tick=tick,
        args=(source,),
        num_cpus=1,
        num_gpus=1 if gpus else 0,
    )
    p.latents_shards_total = len(shards)
    count({})
    tracker.publish(force=True)
    pool.run(todo)
    return list(finished.values()), pool.failed


def run_latents(spec: PartSpec, tracker: Tracker, shards: list[int], source=None) -> dict:
    """The latents stage over a part's finished shards (or an MDS folder's files, `source`); returns
    its summary section."""
    from .latents import merge_indexes, write_manifest

    tracker.phase(Phase.ENCODING)
    try:
        encoded, failed = _encode_all(spec, tracker, shards, source)
    except InputError as err:
        tracker.fail(str(err))
        raise
    if failed:
        tracker.fail(
            f"latents: {len(failed)} of {len(shards)} shards failed after "
            f"{spec.latents.shard_retries} retries: {sorted(failed)[:10]}; "
            "run the part again to retry them"
        )
        raise PartFailed(tracker.progress.message)
    samples = merge_indexes(tracker.store, encoded)
    manifest = write_manifest(tracker.store, spec.latents, encoded)
    p = tracker.progress
    return {
        "index": tracker.store.url(contract.LATENTS_INDEX),
        "samples": samples,
        "skipped": sum(s.skipped for s in encoded),
        "shards": len(encoded),
        "latentsPerSecond": p.latents_per_second,
        "shardSecondsSum": round(sum(s.end_time - s.start_time for s in encoded), 3),
        "devices": sorted({s.device for s in encoded if s.device}),
        "imageShape": manifest["imageShape"],
        "imageShapes": manifest["imageShapes"],
        "captionShape": manifest["captionShape"],
        "dtype": manifest["dtype"],
    }


def _latents(spec: PartSpec, tracker: Tracker, summary: dict) -> dict:
    summary["latents"] = run_latents(spec, tracker, sorted(tracker.finished))
    tracker.end()
    tracker.store.write_json(summary, contract.summary(spec.part_id))
    return summary


# --- the entry points ---------------------------------------------------------------------------------


def run_part(spec: PartSpec, on_progress: Callable[[Progress], None] | None = None, job: str = "") -> dict:
    """Every stage of one part; returns the summary written beside the dataset. `job`: the operator's
    submission id, recorded in the progress."""
    store = Store(spec.output)
    store.check_writable()
    tracker = Tracker(store, Progress(part_id=spec.part_id, job=job), on_progress)
    shards = _plan(spec, store, tracker)
    ensure_ray()
    _write_all(spec, tracker, shards)
    summary = _annotate(spec, tracker)
    if spec.verify:
        summary = _verify(spec, tracker, summary)
    if spec.latents:
        summary = _latents(spec, tracker, summary)
    tracker.finish(f"{tracker.progress.images_ok} images in {store.uri}")
    if spec.heal is not None:  # set or changed on a LaionPart: heal once the part is whole
        summary = heal(spec, tracker) or summary
    return summary


def encode_part(
    spec: PartSpec, on_progress: Callable[[Progress], None] | None = None, ray_address: str | None = None
) -> dict:
    """The latents stage alone, over an output already downloaded or converted with this spec:
    `laion-operator latents`. Returns the part's summary with its `latents` section."""
    if not spec.latents:
        raise InputError("spec.latents: required field is missing (the models and settings of the stage)")
    store = Store(spec.output)
    store.check_writable()
    shards = finished_shards(store)
    if not shards:
        raise InputError(f"output {store.uri} holds no finished shard ({contract.shard_stats(0)}, …) to encode")
    previous = store.read_json(PROGRESS) or {}
    progress = Progress.from_json({**previous, "part_id": spec.part_id, "finished_at": None})
    tracker = Tracker(store, progress, on_progress)
    ensure_ray(ray_address)  # after the checks: a bad input fails without starting Ray
    section = run_latents(spec, tracker, shards)
    summary = store.read_json(contract.summary(spec.part_id)) or {"partId": spec.part_id, "output": store.uri}
    summary["latents"] = section
    store.write_json(summary, contract.summary(spec.part_id))
    tracker.finish(f"{section['samples']} latents in {store.url(contract.LATENTS_DIR)}")
    return summary


def encode_mds(
    spec: PartSpec, source, on_progress: Callable[[Progress], None] | None = None, ray_address: str | None = None
) -> dict:
    """The latents stage over an MDS folder anyone wrote (`source`, a latents.MDSFolder), into
    <output>/latents/: `laion-operator latents --mds`. A file of its index is a shard of the stage."""
    if not spec.latents:
        raise InputError("spec.latents: required field is missing (the models and settings of the stage)")
    store = Store(spec.output)
    store.check_writable()
    shards = source.shards()
    tracker = Tracker(store, Progress(part_id=spec.part_id), on_progress)
    ensure_ray(ray_address)
    section = run_latents(spec, tracker, shards, source)
    summary = {"partId": spec.part_id, "output": store.uri, "input": source.uri, "latents": section}
    store.write_json(summary, contract.summary(spec.part_id))
    tracker.finish(f"{section['samples']} latents in {store.url(contract.LATENTS_DIR)}")
    return summary
