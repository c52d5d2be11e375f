"""Stage 4 (spec.latents): VAE image latents and text-encoder embeddings of one shard's samples.

What micro_diffusion's precompute script does with `accelerate launch` on 8 GPUs, as one Ray task
per download shard (or per file of an MDS folder anyone wrote, `formats.mds.MDSFolder`): its images are read
back by the shard's output format (any of them: pipeline/formats/), decoded once and prepared at
every resolution as torchvision's Resize + CenterCrop prepare them, by threads that fill a short
queue of batches while the models run; each batch's latents are copied back and written while the
device computes the next (the shard loop the embeddings stage shares: pipeline/encoding.py). The
shard's samples go to an MDS folder (`contract.latents_shard`), written with mosaicml-streaming's own
`MDSWriter` into a local folder and then copied to the output through the same store as the images;
`latents/<shard>_stats.json` is written last, so that a shard cut short is redone whole and every
sample is written exactly once. The driver merges the shards' indexes into `latents/index.json`,
which StreamingDataset reads (see `laion_operator.latents_loader`)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .. import contract
from ..contract import LatentStats, latents_shard, latents_stats, shard_name
from ..errors import InputError
from ..spec import Latents, PartSpec
from ..storage import Store
from . import models as model_loading  # `models` names the loaded (device, vae, text encoder) below
from . import selection
from .encoding import (  # the shared decode, re-exported: the tests and the bench read them here
    PREFETCH,
    Batch,
    center_box,
    clear,
    copied,
    decode_threads,
    decoded_batches,
    preprocess,
    preprocess_all,
    read_samples,
    resized_size,
    run_batches,
    to_host,
    to_uint8,
)
from .formats import Sample
from .formats.mds import MDSFolder, merge, streaming
from .models import normalize

__all__ = [
    "PREFETCH",
    "Batch",
    "center_box",
    "decode_threads",
    "decoded_batches",
    "encode_shard",
    "preprocess",
    "preprocess_all",
    "read_samples",
    "resized_size",
    "to_pixels",
    "to_uint8",
]

MDS_SIZE_LIMIT = 1 << 28  # 256 MiB a file, as micro_diffusion's precompute script writes them


# --- preparing a batch for the VAE ---------------------------------------------------------------


def to_pixels(images: list[np.ndarray]):
    """uint8 (N, H, W, 3) to the VAE's input: float (N, 3, H, W) in [-1, 1]."""
    return normalize(to_uint8(images))


# --- one shard ----------------------------------------------------------------------------------


def columns(settings: Latents) -> dict[str, str]:
    """The MDS columns, as micro_diffusion's precompute script writes them."""
    cols = {"key": "str", "caption": "str"}
    cols.update({contract.image_latents_column(r): "bytes" for r in settings.sizes})
    cols[contract.CAPTION_LATENTS] = "bytes"
    if settings.save_images:
        cols[contract.LATENTS_IMAGE] = "bytes"
    return cols


def load_stats(store: Store, shard: int) -> LatentStats | None:
    data = store.read_json(latents_stats(shard))
    return LatentStats.from_json(data) if data else None


class Encoder:
    """A batch's latents: one VAE pass per resolution and one text pass, cast to saveDtype on the
    device and copied back without waiting (`launch`), so that the previous batch is written
    (`rows`) while the accelerator computes this one."""

    def __init__(self, settings: Latents, models):
        import torch

        self.settings = settings
        self.device, self.vae, self.text = models
        self.scale = model_loading.LatentScale.of(self.vae)
        self.save = getattr(torch, settings.save_dtype)
        self.encode_images = model_loading.encode_images
        self.cuda = str(self.device).startswith("cuda")

    def launch(self, batch: Batch) -> tuple[Batch, dict, object, object]:
        s = self.settings
        z = {
            r: to_host(
                self.encode_images(self.vae, batch.pixels[r], batch.keys, s.latent_mode, s.seed, self.scale),
                self.save,
                self.cuda,
            )
            for r in s.sizes
        }
        e = to_host(self.text(batch.captions), self.save, self.cuda)
        return batch, z, e, copied(self.cuda)

    def rows(self, pending) -> tuple[list[dict], dict[int, list[int]], list[int]]:
        """The MDS rows of a launched batch, with each resolution's latent shape and the caption's."""
        batch, z, e, done = pending
        if done is not None:
            done.synchronize()
        z = {r: v.numpy() for r, v in z.items()}
        e = e.numpy()
        rows = []
        for i, key in enumerate(batch.keys):
            row = {"key": key, "caption": batch.captions[i]}
            for r, latents in z.items():
                row[contract.image_latents_column(r)] = latents[i].tobytes()
            row[contract.CAPTION_LATENTS] = e[i].tobytes()
            if self.settings.save_images:
                row[contract.LATENTS_IMAGE] = batch.data[i]
            rows.append(row)
        return rows, {r: list(v.shape[1:]) for r, v in z.items()}, list(e.shape[1:])


def encode_shard(
    spec: PartSpec,
    shard: int,
    report: Callable[[LatentStats], None] | None = None,
    report_every: float = 2.0,
    models=None,
    source: MDSFolder | None = None,
) -> LatentStats:
    """Encode one shard into latents/<shard>/; returns its stats (also persisted, last). The shard is
    one of the part's download shards, or with `source` one file of an MDS folder."""
    settings = spec.latents
    if settings is None:
        raise InputError("spec.latents: required field is missing (the models and settings of the stage)")
    store = Store(spec.output)
    clear(store, latents_stats(shard), latents_shard(shard))
    encoder = Encoder(settings, models or model_loading.load(settings))
    stats = LatentStats(
        shard=shard,
        start_time=time.time(),
        device=encoder.device,
        scaling_factor=encoder.scale.scale,
        shift_factor=encoder.scale.shift,
    )
    samples = kept(
        source.samples(shard) if source else read_samples(store, shard, spec),
        selection.load(store, settings.drop_duplicates, settings.scores, "spec.latents", None if source else shard),
        stats,
    )
    mds = streaming()
    with tempfile.TemporaryDirectory(prefix=f"latents-{shard_name(shard)}-") as local:
        with mds.MDSWriter(out=local, columns=columns(settings), compression=None, size_limit=MDS_SIZE_LIMIT) as writer:

            def write(pending) -> int:
                rows, shapes, stats.caption_shape = encoder.rows(pending)
                stats.image_shapes = {str(r): shape for r, shape in shapes.items()}
                stats.image_shape = shapes[settings.sizes[0]]
                for row in rows:
                    writer.write(row)
                return len(rows)

            batches = decoded_batches(
                samples,
                settings.sizes,
                settings.batch_size,
                reduced=settings.reduced_decode,
                threads=decode_threads(settings, encoder.device),
            )
            run_batches(batches, encoder, write, stats, report, report_every)
        if stats.written:
            store.fs.makedirs(store.path(latents_shard(shard)), exist_ok=True)
            for path in sorted(Path(local).iterdir()):
                store.fs.put_file(str(path), store.path(latents_shard(shard), path.name))
    stats.end_time = time.time()
    store.write_json(stats.to_json(), latents_stats(shard))
    return stats


def kept(samples: Iterator[Sample], selected: selection.Selection | None, stats: LatentStats) -> Iterator[Sample]:
    """The samples latents.dropDuplicates and latents.scores keep; the others counted in `stats.dropped`."""
    for sample in samples:
        if selected is None or selected.why(sample.key) is None:
            yield sample
        else:
            stats.dropped = dict(selected.counts)


# --- the part's index and manifest --------------------------------------------------------------


def merge_indexes(store: Store, shards: list[LatentStats]) -> int:
    """latents/index.json over every shard's MDS files (what streaming's merge_index writes: each
    shard entry with its folder prefixed), so that one StreamingDataset reads the whole part."""
    indexes = {}
    for stats in shards:
        if not stats.written:
            continue  # no sample, no MDS folder
        index = store.read_json(latents_shard(stats.shard), "index.json")
        if index is None:
            raise RuntimeError(f"{store.url(latents_shard(stats.shard), 'index.json')} is missing")
        indexes[stats.shard] = index
    merged = merge(indexes)
    store.write_json(merged, contract.LATENTS_INDEX)
    return sum(entry["samples"] for entry in merged["shards"])


def write_manifest(store: Store, settings: Latents, shards: list[LatentStats]) -> dict:
    """latents/_latents.json: what a reader needs to turn the bytes back into tensors."""
    found = next((s for s in shards if s.written), LatentStats(shard=-1))
    manifest = manifest_of(settings, found)
    store.write_json(manifest, contract.LATENTS_MANIFEST)
    return manifest


def manifest_of(settings: Latents, found: LatentStats) -> dict:
    shapes = found.image_shapes or ({str(settings.sizes[0]): found.image_shape} if found.image_shape else {})
    shared = contract.dataset_latents(settings)
    shared.pop("manifest")
    return {
        **shared,
        # `image`, `imageShape` and `resolution`: the smallest resolution's, as before there were several.
        "columns": {**shared["columns"], "image": contract.image_latents_column(settings.sizes[0])},
        "imageShape": found.image_shape,
        "imageShapes": shapes,
        "captionShape": found.caption_shape,
        "resolution": settings.sizes[0],
        "scalingFactor": found.scaling_factor,
        "shiftFactor": found.shift_factor,
    }
