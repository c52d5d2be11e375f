"""Stage 4 (spec.latents): VAE image latents and text-encoder embeddings of one shard's samples.

What micro_diffusion's precompute script does with `accelerate launch` on 8 GPUs, as one Ray task
per download shard (or per file of an MDS folder anyone wrote, `formats.mds.MDSFolder`): its images are read
back by the shard's output format (any of them: pipeline/formats/), decoded once and prepared at
every resolution as torchvision's Resize + CenterCrop prepare them, by threads that fill a short
queue of batches while the models run; each batch's latents are copied back and written while the
device computes the next, so that neither the accelerator nor the CPU waits for the other. The
shard's samples go to an MDS folder (`contract.latents_shard`), written with mosaicml-streaming's own
`MDSWriter` into a local folder and then copied to the output through the same store as the images;
`latents/<shard>_stats.json` is written last, so that a shard cut short is redone whole and every
sample is written exactly once. The driver merges the shards' indexes into `latents/index.json`,
which StreamingDataset reads (see `laion_operator.latents_loader`)."""

from __future__ import annotations

import io
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .. import contract
from ..contract import LatentStats, latents_shard, latents_stats, shard_name
from ..errors import InputError
from ..spec import Latents, PartSpec
from ..storage import Store
from . import formats
from . import models as model_loading  # `models` names the loaded (device, vae, text encoder) below
from .formats import Sample
from .formats.mds import MDSFolder, merge, streaming
from .models import normalize

# Batches decoded ahead of the model: enough to hide a slow decode, little memory.
PREFETCH = 2
MDS_SIZE_LIMIT = 1 << 28  # 256 MiB a file, as micro_diffusion's precompute script writes them


# --- reading a shard's samples ------------------------------------------------------------------


def read_samples(store: Store, shard: int, spec: PartSpec) -> Iterator[Sample]:
    """The shard's samples with an image, whatever its outputFormat, as the format reads them back."""
    for sample in formats.get(spec.download.output_format).read_samples(store, shard):
        if sample.image is not None:
            yield sample


# --- decoding, in a thread beside the model -----------------------------------------------------


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """torchvision's Resize(resolution) on a (width, height) image: the shorter side to the resolution,
    the longer one scaled and truncated (`int(r * long / short)`, its `_compute_resized_output_size`)."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def center_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """torchvision's CenterCrop(resolution) box: offsets rounded as it rounds them (`int(round(d / 2.0))`)."""
    left, top = round((width - resolution) / 2.0), round((height - resolution) / 2.0)  # half to even, as there
    return left, top, left + resolution, top + resolution


def preprocess_all(data: bytes, resolutions: tuple[int, ...], reduced: bool = False) -> dict[int, np.ndarray]:
    """An encoded image as (r, r, 3) uint8 for every resolution, from one decode: torchvision's
    `Resize(r, BICUBIC)` then `CenterCrop(r)` on the RGB image, as micro_diffusion prepares its images.
    `reduced` (latents.reducedDecode) lets libjpeg decode at the smallest DCT scale still at least the
    largest resolution on both sides, first: faster, and within spec.REDUCED_DECODE_PSNR of the whole decode."""
    with Image.open(io.BytesIO(data)) as image:
        whole: tuple[int, int] = image.size  # sizes and offsets from the image's own size, however it was decoded
        box = None
        if reduced:
            # A side that is not a multiple of the DCT scale decodes to a partly covered last pixel:
            # `box` (the whole image in the reduced one's coordinates) keeps the geometry exact.
            drafted = image.draft("RGB", (max(resolutions), max(resolutions)))
            box = drafted[1] if drafted else None
        image = image.convert("RGB")
        out = {}
        for r in resolutions:
            size = resized_size(*whole, r)
            resized = image if size == image.size else image.resize(size, Image.Resampling.BICUBIC, box=box)
            out[r] = np.asarray(resized.crop(center_box(*size, r)))
        return out


def preprocess(data: bytes, resolution: int, reduced: bool = False) -> np.ndarray:
    """One resolution of `preprocess_all`."""
    return preprocess_all(data, (resolution,), reduced)[resolution]


def to_pixels(images: list[np.ndarray]):
    """uint8 (N, H, W, 3) to the VAE's input: float (N, 3, H, W) in [-1, 1]."""
    return normalize(to_uint8(images))


def to_uint8(images: list[np.ndarray]):
    """uint8 (N, H, W, 3) as a uint8 (N, 3, H, W) tensor: a quarter of float32's bytes to copy to a
    GPU, where `models.encode_images` normalizes it."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


class Batch:
    def __init__(self):
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.data: list[bytes] = []  # the encoded images, for saveImages
        self.images: dict[int, list[np.ndarray]] = {}
        self.pixels: dict = {}  # resolution -> the VAE's input
        self.skipped = 0

    def add(self, key: str, caption: str, data: bytes, images: dict[int, np.ndarray]) -> None:
        self.keys.append(key)
        self.captions.append(caption)
        self.data.append(data)
        for r, image in images.items():
            self.images.setdefault(r, []).append(image)

    def seal(self) -> Batch:
        self.pixels = {r: to_uint8(images) for r, images in self.images.items()}
        self.images = {}
        return self


_END = object()


def decoded_batches(
    samples: Iterator[Sample],
    resolutions: int | tuple[int, ...],
    batch_size: int,
    prefetch: int = PREFETCH,
    reduced: bool = False,
    threads: int = 1,
) -> Iterator[Batch]:
    """Batches of decoded images (`pixels[r]`, uint8, for every resolution), made by a thread (and
    `threads` decoding beside it: Pillow lets go of the GIL to decode and resize) while the caller
    encodes the previous ones. An image that does not decode is counted in its batch's `skipped` and
    left out."""
    from concurrent.futures import ThreadPoolExecutor

    resolutions = (resolutions,) if isinstance(resolutions, int) else tuple(resolutions)
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

    def decode(sample: Sample):
        try:
            return sample, preprocess_all(sample.image or b"", resolutions, reduced)
        except (OSError, ValueError, Image.DecompressionBombError):
            return sample, None

    def chunks() -> Iterator[list[Sample]]:
        chunk = []
        for sample in samples:
            chunk.append(sample)
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def work() -> None:
        batch = Batch()
        try:
            with ThreadPoolExecutor(max(1, threads), thread_name_prefix="latents-decode") as pool:
                for chunk in chunks():
                    for sample, images in pool.map(decode, chunk):
                        if images is None or sample.image is None:
                            batch.skipped += 1
                            continue
                        batch.add(sample.key, sample.caption or "", sample.image, images)
                        if len(batch.keys) == batch_size:
                            if not put(batch.seal()):
                                return
                            batch = Batch()
            if batch.keys or batch.skipped:
                put(batch.seal())
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

    def _to_host(self, tensor):
        import torch

        tensor = tensor.to(self.save)
        if not self.cuda:
            return tensor
        host = torch.empty(tensor.shape, dtype=self.save, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def launch(self, batch: Batch) -> tuple[Batch, dict, object, object]:
        import torch

        s = self.settings
        z = {
            r: self._to_host(
                self.encode_images(self.vae, batch.pixels[r], batch.keys, s.latent_mode, s.seed, self.scale)
            )
            for r in s.sizes
        }
        e = self._to_host(self.text(batch.captions))
        done = None
        if self.cuda:
            done = torch.cuda.Event()
            done.record()
        return batch, z, e, done

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


def decode_threads(settings: Latents, device: str) -> int:
    """latents.decodeThreads, or (0) the node's CPUs shared among its GPUs: on a GPU the decode must
    keep up with the model; on a CPU node every core already runs a shard task."""
    import os

    if settings.decode_threads:
        return settings.decode_threads
    if not str(device).startswith("cuda"):
        return 1
    import torch

    return max(1, (os.cpu_count() or 1) // max(1, torch.cuda.device_count()))


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
    for stale in (latents_stats(shard), latents_shard(shard)):  # an earlier attempt's partial output
        if store.exists(stale):
            store.fs.rm(store.path(stale), recursive=True)
    encoder = Encoder(settings, models or model_loading.load(settings))
    stats = LatentStats(
        shard=shard,
        start_time=time.time(),
        device=encoder.device,
        scaling_factor=encoder.scale.scale,
        shift_factor=encoder.scale.shift,
    )
    last = time.monotonic()
    samples = source.samples(shard) if source else read_samples(store, shard, spec)
    mds = streaming()
    with tempfile.TemporaryDirectory(prefix=f"latents-{shard_name(shard)}-") as local:
        with mds.MDSWriter(out=local, columns=columns(settings), compression=None, size_limit=MDS_SIZE_LIMIT) as writer:

            def write(pending) -> None:
                nonlocal last
                rows, shapes, stats.caption_shape = encoder.rows(pending)
                stats.image_shapes = {str(r): shape for r, shape in shapes.items()}
                stats.image_shape = shapes[settings.sizes[0]]
                for row in rows:
                    writer.write(row)
                stats.written += len(rows)
                if report and time.monotonic() - last >= report_every:
                    last = time.monotonic()
                    report(stats)

            pending = None
            for batch in decoded_batches(
                samples,
                settings.sizes,
                settings.batch_size,
                reduced=settings.reduced_decode,
                threads=decode_threads(settings, encoder.device),
            ):
                stats.skipped += batch.skipped
                stats.count += batch.skipped + len(batch.keys)
                if not batch.keys:
                    continue
                launched = encoder.launch(batch)
                if pending is not None:
                    write(pending)
                pending = launched
            if pending is not None:
                write(pending)
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
