"""The latents stage (spec.latents): every shard's images encoded by the VAE and its captions by the
text encoder, a Ray task each on a GPU where the cluster has them (pipeline/latents.py), then their MDS
indexes merged and the manifest written. Over the part's finished shards, or over an MDS folder anyone
wrote (`Run.mds`, whose files are the shards). Torch and the models load only inside this stage."""

from __future__ import annotations

from collections import Counter

from ... import contract
from ...contract import LatentStats, Phase, Progress
from ...errors import InputError
from ...spec import PartSpec
from ...summary import LatentsSummary
from .. import selection
from ..runtime import Outcome, ensure_ray
from .base import Run
from .encoding import Counts, Encoding, encode, model_work


def wanted(run: Run) -> bool:
    return run.spec.latents is not None


def _encode_shard(spec: PartSpec, shard: int, report, source=None) -> Outcome:
    from ..latents import encode_shard

    return model_work(lambda: encode_shard(spec, shard, report=report, source=source))


def _publish(p: Progress, counts: Counts) -> None:
    p.latents = counts.status()


def _encode(run: Run, shards: list[int]) -> list[LatentStats]:
    """Encode the shards not encoded yet as Ray tasks (stages/encoding.py); returns every shard's stats."""
    from ..latents import load_stats

    if run.spec.latents is None:
        raise InputError("spec.latents: required field is missing (the models and settings of the stage)")
    settings, stats = run.spec.latents, LatentStats.from_json
    stage = Encoding("latents", settings, _encode_shard, load_stats, stats, _publish, (run.mds,))
    return [s for s in encode(run, shards, stage) if isinstance(s, LatentStats)]


def run(run: Run) -> LatentsSummary:
    from ..latents import merge_indexes, write_manifest

    tracker = run.tracker
    if run.spec.latents is None:
        raise InputError("spec.latents: required field is missing (the models and settings of the stage)")
    shards = run.encode if run.encode is not None else sorted(tracker.finished)
    ensure_ray(run.ray_address)
    tracker.phase(Phase.ENCODING)
    try:  # a threshold on a column the embeddings lack fails the part before any shard runs
        selection.load(tracker.store, run.spec.latents.drop_duplicates, run.spec.latents.scores, "spec.latents")
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
        latents_per_second=tracker.progress.latents.get("perSecond", 0.0),
        shard_seconds_sum=round(sum(s.end_time - s.start_time for s in encoded), 3),
        devices=sorted({s.device for s in encoded if s.device}),
        image_shape=manifest["imageShape"],
        image_shapes=manifest["imageShapes"],
        caption_shape=manifest["captionShape"],
        dtype=manifest["dtype"],
        dropped=dict(sum((Counter(s.dropped) for s in encoded), Counter())),
    )
    run.written_summary().latents = section
    tracker.end()
    run.write_summary()
    return section
