"""The embeddings stage (spec.embeddings): every finished shard's CLIP image and caption embeddings in
clip-retrieval's layout under embeddings/ (pipeline/embeddings.py), a Ray task each on a GPU where the
cluster has them, as the latents stage runs its shards (stages/encoding.py); then, with
`embeddings.dedup`, the part's duplicates found over them (pipeline/dedup.py), and with
`embeddings.index` their FAISS indexes built (pipeline/index.py). Torch and the model load only
inside this stage."""

from __future__ import annotations

import functools

from ... import contract
from ...contract import Phase, Progress
from ...errors import InputError
from ...spec import PartSpec
from ...summary import EmbeddingsSummary
from ..runtime import Outcome, ensure_ray
from .base import Run
from .encoding import Counts, Encoding, encode, model_work


def wanted(run: Run) -> bool:
    return run.spec.embeddings is not None


def _embed_shard(spec: PartSpec, shard: int, report) -> Outcome:
    from ..embeddings import embed_shard

    return model_work(lambda: embed_shard(spec, shard, report=report))


def _publish(p: Progress, counts: Counts) -> None:
    p.embeddings = counts.status()


def run(run: Run) -> EmbeddingsSummary:
    from ..embeddings import EmbeddingStats, load_stats

    tracker, settings = run.tracker, run.spec.embeddings
    if settings is None:
        raise InputError("spec.embeddings: required field is missing (the model and settings of the stage)")
    shards = run.encode if run.encode is not None else sorted(tracker.finished)
    ensure_ray(run.ray_address)
    tracker.phase(Phase.EMBEDDING)
    finished = functools.partial(load_stats, settings=settings)  # by this model and these heads
    stage = Encoding("embeddings", settings, _embed_shard, finished, EmbeddingStats.from_json, _publish)
    try:
        embedded = [s for s in encode(run, shards, stage) if isinstance(s, EmbeddingStats)]
        samples = sum(s.written for s in embedded)
        if shards and not samples:
            raise InputError(
                f"spec.embeddings: output {tracker.store.uri} holds no image to embed "
                f"({sum(s.count for s in embedded)} samples in {len(shards)} shards, none with an image that decodes)"
            )
        duplicates = _dedup(run, embedded) if settings.dedup else None
        if settings.index:
            from ..index import build

            build(tracker.store, settings.model, settings.index_memory)
    except InputError as err:
        tracker.fail(str(err))
        raise
    section = EmbeddingsSummary(
        folder=tracker.store.url(contract.EMBEDDINGS_DIR),
        model=settings.model,
        samples=samples,
        skipped=sum(s.skipped for s in embedded),
        shards=len(embedded),
        dim=next((s.dim for s in embedded if s.dim), 0),
        embeddings_per_second=float(tracker.progress.embeddings.get("perSecond", 0.0)),
        shard_seconds_sum=round(sum(s.end_time - s.start_time for s in embedded), 3),
        devices=sorted({s.device for s in embedded if s.device}),
        duplicates=duplicates,
        index=tracker.store.url(contract.EMBEDDINGS_INDEX) if settings.index else "",
    )
    run.written_summary().embeddings = section
    tracker.end()
    run.write_summary()
    return section


def _dedup(run: Run, embedded) -> dict[str, int]:
    from ..dedup import dedup_part

    settings = run.spec.embeddings
    assert settings is not None and settings.dedup is not None  # wanted() and run() checked
    return dedup_part(run.spec, [s.shard for s in embedded if s.written], settings.dedup)
