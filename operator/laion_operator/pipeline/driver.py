"""One part on Ray, as a list of stages (`stages.PART`): filter → download (a Ray task per shard) →
annotate → verify → with `spec.latents`, latents (a Ray task per shard, on a GPU where the cluster has
them) → with `spec.heal`, heal (a Ray task per shard to heal). A part whose source is a dataset
(`source.dataset`) converts its input shards instead of filtering and downloading.

The CLI calls `run_part` in-process on a local Ray; the operator's Ray job calls the same function
on a cluster. `encode_part` and `encode_mds` run the latents stage alone (`laion-operator latents`),
`heal_part` the heal stage alone (`laion-operator heal`). `tracker.Tracker` persists the progress to
`contract.PROGRESS` as it changes, which is what the operator, its metrics and a resumed run read.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import contract
from ..contract import PROGRESS, Progress
from ..errors import InputError
from ..spec import PartSpec
from ..storage import Store
from ..summary import Summary
from .resume import finished_shards
from .runtime import PartFailed
from .stages import EMBED, HEAL, LATENTS, PART, Run, Stage
from .tracker import Tracker

__all__ = ["PartFailed", "embed_part", "encode_mds", "encode_part", "heal_part", "run_part", "run_stages"]

OnProgress = Callable[[Progress], None]


def run_stages(stages: tuple[Stage, ...], run: Run) -> Summary | None:
    """Run the stages the part wants, in order; returns the part's summary as the last one left it."""
    for stage in stages:
        if stage.wanted(run):
            stage.run(run)
    return run.summary


def _summary(summary: Summary | None) -> dict:
    if summary is None:
        raise RuntimeError("the stages ended without a summary")
    return summary.to_json()


def run_part(spec: PartSpec, on_progress: OnProgress | None = None, job: str = "") -> dict:
    """Every stage of one part; returns the summary written beside the dataset. `job`: the operator's
    submission id, recorded in the progress."""
    store = Store(spec.output)
    store.check_writable()
    return _summary(run_stages(PART, Run(spec, Tracker(store, Progress(part_id=spec.part_id, job=job), on_progress))))


def _latents_store(spec: PartSpec) -> Store:
    if not spec.latents:
        raise InputError("spec.latents: required field is missing (the models and settings of the stage)")
    store = Store(spec.output)
    store.check_writable()
    return store


def encode_part(spec: PartSpec, on_progress: OnProgress | None = None, ray_address: str | None = None) -> dict:
    """The latents stage alone, over an output already downloaded or converted with this spec:
    `laion-operator latents`. Returns the part's summary with its `latents` section."""
    return _over_finished(LATENTS, spec, _latents_store(spec), on_progress, ray_address)


def embed_part(spec: PartSpec, on_progress: OnProgress | None = None, ray_address: str | None = None) -> dict:
    """The embeddings stage alone, over an output already downloaded or converted in any format:
    `laion-operator embed`. Returns the part's summary with its `embeddings` section."""
    if not spec.embeddings:
        raise InputError("spec.embeddings: required field is missing (the model and settings of the stage)")
    store = Store(spec.output)
    store.check_writable()
    return _over_finished(EMBED, spec, store, on_progress, ray_address)


def _over_finished(
    stages: tuple[Stage, ...], spec: PartSpec, store: Store, on_progress: OnProgress | None, ray_address: str | None
) -> dict:
    """A model stage alone over the part's finished shards, its summary added to the part's."""
    shards = finished_shards(store)
    if not shards:
        raise InputError(f"output {store.uri} holds no finished shard ({contract.shard_stats(0)}, …) to encode")
    previous = store.read_json(PROGRESS) or {}
    tracker = Tracker(
        store, Progress.from_json({**previous, "part_id": spec.part_id, "finished_at": None}), on_progress
    )
    found = store.read_json(contract.summary(spec.part_id))
    summary = Summary.from_json(found) if found else Summary(spec.part_id, store.uri)
    return _summary(run_stages(stages, Run(spec, tracker, ray_address, summary=summary, encode=shards)))


def encode_mds(spec: PartSpec, source, on_progress: OnProgress | None = None, ray_address: str | None = None) -> dict:
    """The latents stage over an MDS folder anyone wrote (`source`, a formats.mds.MDSFolder), into
    <output>/latents/: `laion-operator latents --mds`. A file of its index is a shard of the stage."""
    store = _latents_store(spec)
    tracker = Tracker(store, Progress(part_id=spec.part_id), on_progress)
    summary = Summary(spec.part_id, store.uri, input=source.uri)
    run = Run(spec, tracker, ray_address, summary=summary, encode=source.shards(), mds=source)
    return _summary(run_stages(LATENTS, run))


def heal_part(
    spec: PartSpec,
    reasons: list[str] | None = None,
    force: bool = False,
    on_progress: OnProgress | None = None,
    ray_address: str | None = None,
) -> dict | None:
    """Heal the finished part in spec.output on its own (`laion-operator heal`); returns its new summary,
    or None when this heal (spec.heal's reasons and round) was done already and `force` is not set."""
    store = Store(spec.output)
    previous = store.read_json(PROGRESS) or {}
    tracker = Tracker(store, Progress.from_json({**previous, "part_id": spec.part_id}), on_progress)
    summary = run_stages(HEAL, Run(spec, tracker, ray_address, heal_reasons=reasons, heal_force=force, heal_asked=True))
    return None if summary is None else summary.to_json()
