"""Stage 4 (spec.latents): VAE image latents and text-encoder embeddings of one shard's samples.

What micro_diffusion's precompute script does with `accelerate launch` on 8 GPUs, as one Ray task
per download shard: its images are read back by the shard's output format (any of them:
pipeline/formats/) and decoded by a thread that fills a short queue of batches
while the models run, so that neither the accelerator nor the CPU waits for the other. The shard's
samples go to an MDS folder (`contract.latents_shard`), written with mosaicml-streaming's own
`MDSWriter` into a local folder and then copied to the output through the same store as the images;
`latents/<shard>_stats.json` is written last, so that a shard cut short is redone whole and every
sample is written exactly once. The driver merges the shards' indexes into `latents/index.json`,
which StreamingDataset reads (see `laion_operator.latents_loader`).
"""

from __future__ import annotations

import io
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from .. import contract
from ..contract import LatentStats, latents_shard, latents_stats, shard_name
from ..spec import Latents, PartSpec
from ..storage import Store
from . import formats
from .formats.mds import merge
# Batches decoded ahead of the model: enough to hide a slow decode, little memory.
PREFETCH = 2
MDS_SIZE_LIMIT = 1 << 28  # 256 MiB a file, as micro_diffusion's precompute script writes them


def streaming():
    """mosaicml-streaming, imported when used. Its package imports its vision datasets, and so
    torchvision, even for the writer and the reader: the `latents` extra carries torchvision for that."""
    import streaming as mds

    return mds


# --- reading a shard's samples ------------------------------------------------------------------

Sample = tuple[str, str, bytes]  # key, caption, encoded image


def read_samples(store: Store, shard: int, spec: PartSpec) -> Iterator[Sample]:
    """The shard's samples with an image, whatever its outputFormat, as the format reads them back."""
    for sample in formats.get(spec.download.output_format).read_samples(store, shard):
        if sample.image is not None:
            yield sample.key, sample.caption or "", sample.image


# --- decoding, in a thread beside the model -----------------------------------------------------

def preprocess(data: bytes, resolution: int) -> np.ndarray:
    """An encoded image as (resolution, resolution, 3) uint8: the shorter side resized to the
    resolution (bicubic, antialiased), then the center square, as micro_diffusion prepares its images."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (resolution, resolution))  # JPEG: decode at the smallest scale still large enough
        image = image.convert("RGB")
        w, h = image.size
        s = resolution / min(w, h)
        size = (max(resolution, round(w * s)), max(resolution, round(h * s)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        return np.asarray(image.crop((left, top, left + resolution, top + resolution)))


def to_pixels(images: list[np.ndarray]):
    """uint8 (N, H, W, 3) to the VAE's input: float (N, 3, H, W) in [-1, 1]."""
    import torch

    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return batch.div_(127.5).sub_(1.0)


class Batch:
    def __init__(self):
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.images: list[np.ndarray] = []
        self.pixels = None
        self.skipped = 0


_END = object()


def decoded_batches(samples: Iterator[Sample], resolution: int, batch_size: int,
                    prefetch: int = PREFETCH) -> Iterator[Batch]:
    """Batches of decoded images, made by a thread while the caller encodes the previous ones. An image
    that does not decode is counted in its batch's `skipped` and left out."""
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        batch = Batch()
        try:
            for key, caption, data in samples:
                try:
                    image = preprocess(data, resolution)
                except (OSError, ValueError, Image.DecompressionBombError):
                    batch.skipped += 1
                    continue
                batch.keys.append(key)
                batch.captions.append(caption)
                batch.images.append(image)
                if len(batch.keys) == batch_size:
                    batch.pixels = to_pixels(batch.images)
                    if not put(batch):
                        return
                    batch = Batch()
            if batch.keys or batch.skipped:
                batch.pixels = to_pixels(batch.images) if batch.images else None
                put(batch)
            put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            put(err)

    thread = threading.Thread(target=work, name="latents-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


# --- one shard ----------------------------------------------------------------------------------

def columns(settings: Latents) -> dict[str, str]:
    return {"key": "str", "caption": "str", contract.image_latents_column(settings.resolution): "bytes",
            contract.CAPTION_LATENTS: "bytes"}


def load_stats(store: Store, shard: int) -> LatentStats | None:
    data = store.read_json(latents_stats(shard))
    return LatentStats.from_json(data) if data else None


def encode_shard(spec: PartSpec, shard: int, report: Callable[[LatentStats], None] | None = None,
                 report_every: float = 2.0, models=None) -> LatentStats:
    """Encode one download shard into latents/<shard>/; returns its stats (also persisted, last)."""
    import torch

    from . import models as model_loading

    settings = spec.latents
    store = Store(spec.output)
    for stale in (latents_stats(shard), latents_shard(shard)):  # an earlier attempt's partial output
        if store.exists(stale):
            store.fs.rm(store.path(stale), recursive=True)
    device, vae, text = models or model_loading.load(settings)
    scale = model_loading.LatentScale.of(vae)
    save = getattr(torch, settings.save_dtype)
    stats = LatentStats(shard=shard, start_time=time.time(), device=device, scaling_factor=scale.scale,
                        shift_factor=scale.shift)
    last = time.monotonic()
    mds = streaming()
    with tempfile.TemporaryDirectory(prefix=f"latents-{shard_name(shard)}-") as local:
        with mds.MDSWriter(out=local, columns=columns(settings), compression=None,
                           size_limit=MDS_SIZE_LIMIT) as writer:
            for batch in decoded_batches(read_samples(store, shard, spec), settings.resolution, settings.batch_size):
                stats.skipped += batch.skipped
                stats.count += batch.skipped + len(batch.keys)
                if not batch.keys:
                    continue
                z = model_loading.encode_images(vae, batch.pixels, batch.keys, settings.latent_mode, settings.seed,
                                                scale).to("cpu", save).numpy()
                e = text(batch.captions).to("cpu", save).numpy()
                stats.image_shape, stats.caption_shape = list(z.shape[1:]), list(e.shape[1:])
                for i, key in enumerate(batch.keys):
                    writer.write({"key": key, "caption": batch.captions[i],
                                  contract.image_latents_column(settings.resolution): z[i].tobytes(),
                                  contract.CAPTION_LATENTS: e[i].tobytes()})
                stats.written += len(batch.keys)
                if report and time.monotonic() - last >= report_every:
                    last = time.monotonic()
                    report(stats)
        if stats.written:
            store.fs.makedirs(store.path(latents_shard(shard)), exist_ok=True)
            for path in sorted(Path(local).iterdir()):
                store.fs.put_file(str(path), store.path(latents_shard(shard), path.name))
    stats.end_time = time.time()
    store.write_json(stats.to_json(), latents_stats(shard))
    return stats


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
    manifest = {
        "columns": {"image": contract.image_latents_column(settings.resolution),
                    "caption": contract.CAPTION_LATENTS},
        "dtype": settings.save_dtype,
        "imageShape": found.image_shape,
        "captionShape": found.caption_shape,
        "resolution": settings.resolution,
        "latentMode": settings.latent_mode,
        "seed": settings.seed,
        "scalingFactor": found.scaling_factor,
        "shiftFactor": found.shift_factor,
        "vae": settings.vae,
        "vaeSubfolder": settings.vae_subfolder,
        "textEncoder": settings.text_encoder,
    }
    store.write_json(manifest, contract.LATENTS_MANIFEST)
    return manifest
