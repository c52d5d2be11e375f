"""What the two model stages share (latents: pipeline/latents.py, embeddings: pipeline/embeddings.py):
one shard's samples read back by its output format, decoded and prepared by threads beside the model
into a short queue of uint8 batches, and the shard loop that launches each batch on the device and
writes the previous one while the device computes it, so that neither the accelerator nor the CPU
waits for the other. A shard's stats file is written last, after its stale files are removed first:
a shard cut short is redone whole and every sample is written exactly once."""

from __future__ import annotations

import io
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..contract import EncodeStats
from ..spec import Embeddings, Latents, PartSpec
from ..storage import Store
from . import formats
from .formats import Sample

# Batches decoded ahead of the model: enough to hide a slow decode, little memory.
PREFETCH = 2


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
        self.described: list = []  # `describe`'s of each image (decoded_batches)
        self.images: dict[int, list[np.ndarray]] = {}
        self.pixels: dict = {}  # resolution -> the VAE's input
        self.skipped = 0

    def add(self, key: str, caption: str, data: bytes, images: dict[int, np.ndarray], described=None) -> None:
        self.keys.append(key)
        self.described.append(described)
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
    describe: Callable[[bytes], Any] | None = None,
) -> Iterator[Batch]:
    """Batches of decoded images (`pixels[r]`, uint8, for every resolution), made by a thread (and
    `threads` decoding beside it: Pillow lets go of the GIL to decode and resize) while the caller
    encodes the previous ones. An image that does not decode is counted in its batch's `skipped` and
    left out. `describe(image bytes)`, computed by the same threads, goes to each batch's `described`."""
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
            data = sample.image or b""
            return sample, preprocess_all(data, resolutions, reduced), describe(data) if describe else None
        except (OSError, ValueError, Image.DecompressionBombError):
            return sample, None, None

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
                    for sample, images, described in pool.map(decode, chunk):
                        if images is None or sample.image is None:
                            batch.skipped += 1
                            continue
                        batch.add(sample.key, sample.caption or "", sample.image, images, described)
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


# --- the device side ----------------------------------------------------------------------------


def decode_threads(settings: Latents | Embeddings, device: str) -> int:
    """A stage's decodeThreads, or (0) the node's CPUs shared among its GPUs: on a GPU the decode must
    keep up with the model; on a CPU node every core already runs a shard task."""
    if settings.decode_threads:
        return settings.decode_threads
    if not str(device).startswith("cuda"):
        return 1
    import torch

    return max(1, (os.cpu_count() or 1) // max(1, torch.cuda.device_count()))


def to_host(tensor, dtype, cuda: bool):
    """The tensor cast on the device, copied back into pinned memory without waiting (a GPU's)."""
    import torch

    tensor = tensor.to(dtype)
    if not cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def copied(cuda: bool):
    """An event the host waits on before reading what `to_host` launched (None on a CPU)."""
    if not cuda:
        return None
    import torch

    done = torch.cuda.Event()
    done.record()
    return done


class Launcher(Protocol):
    def launch(self, batch: Batch) -> Any: ...


def clear(store: Store, *names: str) -> None:
    """An earlier attempt's partial output of a shard, removed before it is written again."""
    for name in names:
        if store.exists(name):
            store.fs.rm(store.path(name), recursive=True)


def run_batches(
    batches: Iterable[Batch],
    encoder: Launcher,
    write: Callable[[Any], int],
    stats: EncodeStats,
    report: Callable[[Any], None] | None = None,
    report_every: float = 2.0,
) -> None:
    """The shard loop: each batch launched on the device, then the previous one written (`write`
    returns its samples) while the device computes it; counts in `stats`, `report`ed now and then."""
    last = time.monotonic()
    pending = None

    def written(done) -> None:
        nonlocal last
        stats.written += write(done)
        if report and time.monotonic() - last >= report_every:
            last = time.monotonic()
            report(stats)

    for batch in batches:
        stats.skipped += batch.skipped
        stats.count += batch.skipped + len(batch.keys)
        if not batch.keys:
            continue
        launched = encoder.launch(batch)
        if pending is not None:
            written(pending)
        pending = launched
    if pending is not None:
        written(pending)
