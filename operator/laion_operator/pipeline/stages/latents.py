"""The latents stage (spec.latents): every shard's images encoded by the VAE and its captions by the
text encoder, a Ray task each on a GPU where the cluster has them (pipeline/latents.py), then their MDS
indexes merged and the manifest written. Over the part's finished shards, or over an MDS folder anyone
wrote (`Run.mds`, whose files are the shards). Torch and the models load only inside this stage."""

from __future__ import annotations

import logging
import time

import ray

from ... import contract
from ...contract import LatentStats, Phase
from ...errors import InputError
from ...spec import PartSpec
from ...summary import LatentsSummary
from ..runtime import Outcome, Pool, cpus, ensure_ray
from .base import Run, end_if_failed

log = logging.getLogger(__name__)


def wanted(run: Run) -> bool:
    return run.spec.latents is not None


def _encode_shard(spec: PartSpec, shard: int, report, source=None) -> Outcome:
    from ..latents import encode_shard
    from ..models import ModelError

    try:
        return Outcome(encode_shard(spec, shard, report=report, source=source))
    except ModelError as err:  # a retry cannot load it either: the driver ends the part as bad input
        return Outcome(bad_input=str(err))


def _encode(run: Run, shards: list[int]) -> list[LatentStats]:
    """Encode the shards not encoded yet as Ray tasks, a GPU each when the cluster has GPUs; returns
    every shard's stats. The part fails when some failed after their retries."""
    from ..latents import load_stats

    spec, tracker = run.spec, run.tracker
    if spec.latents is None:
        raise InputError("spec.latents: required field is missing (the models and settings of the stage)")
    settings, p = spec.latents, tracker.progress
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
        args=(run.mds,),
        num_cpus=1,
        num_gpus=1 if gpus else 0,
    )
    p.latents_shards_total = len(shards)
    count({})
    tracker.publish(force=True)
    pool.run(todo)
    end_if_failed(tracker, pool, len(shards))
    return list(finished.values())


def run(run: Run) -> LatentsSummary:
    from ..latents import merge_indexes, write_manifest

    tracker = run.tracker
    if run.spec.latents is None:
        raise InputError("spec.latents: required field is missing (the models and settings of the stage)")
    shards = run.encode if run.encode is not None else sorted(tracker.finished)
    ensure_ray(run.ray_address)
    tracker.phase(Phase.ENCODING)
    try:
        encoded = _encode(run, shards)
    except InputError as err:
        tracker.fail(str(err))
        raise
    samples = merge_indexes(tracker.store, encoded)
    manifest = write_manifest(tracker.store, run.spec.latents, encoded)
    section = LatentsSummary(
        index=tracker.store.url(contract.LATENTS_INDEX),
        samples=samples,
        skipped=sum(s.skipped for s in encoded),
        shards=len(encoded),
        latents_per_second=tracker.progress.latents_per_second,
        shard_seconds_sum=round(sum(s.end_time - s.start_time for s in encoded), 3),
        devices=sorted({s.device for s in encoded if s.device}),
        image_shape=manifest["imageShape"],
        image_shapes=manifest["imageShapes"],
        caption_shape=manifest["captionShape"],
        dtype=manifest["dtype"],
    )
    run.written_summary().latents = section
    tracker.end()
    run.write_summary()
    return section
