"""The embeddings stage's work (spec.embeddings): every sample's CLIP image and caption embedding of
one shard, what clip-retrieval's `clip_inference` computes, as one Ray task per shard.

The shard's images are read back by its output format, decoded and prepared by the threads and the
shard loop the latents stage uses (pipeline/encoding.py): the device embeds a batch while the previous
one is copied back. Embeddings are normalised to unit length and stored as float16 in clip-retrieval's
own layout, so that its index step, autofaiss and embedding-reader read the folder unchanged:

    embeddings/img_emb/img_emb_<shard>.npy          (N, d) float16, the images'
    embeddings/text_emb/text_emb_<shard>.npy        (N, d) float16, the captions'
    embeddings/metadata/metadata_<shard>.parquet    N rows in the same order: key, url, caption, shard,
                                                     image_sha256 and image_phash (pipeline/dedup.py's
                                                     hashes of the stored image), then the part's
                                                     metadata columns
    embeddings/<shard>_stats.json                   written last: the shard is done

A shard's earlier partial files are removed before it is embedded again, so that a resumed part ends
with each sample once; the batches are the same on every attempt, and so are the bytes.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..contract import EMBEDDING_FILES, EncodeStats, embeddings_file, embeddings_stats
from ..errors import InputError
from ..spec import PartSpec
from ..storage import Store
from .dedup import image_hashes
from .encoding import Batch, clear, copied, decode_threads, decoded_batches, read_samples, run_batches, to_host
from .formats import read_metadata
from .models import LOADS, Clip, load_clip, load_head

# The metadata's own columns, first, in clip-retrieval's order; then the part's, less the outcome
# columns that say the same for every embedded sample.
LEADING = ("key", "url", "caption", "shard", "image_sha256", "image_phash")
OUTCOME = frozenset({"status", "error_message", "failure_reason"})


@dataclass
class EmbeddingStats(EncodeStats):
    """One embedded shard's stats file (contract.embeddings_stats)."""

    dim: int = 0  # the embeddings' width, the images' and the captions' alike
    made_by: str = ""  # what made the files (`made_by`): a shard made otherwise is embedded again
    model_seconds: float = 0.0  # loading the model, in this shard's task: 0 when its worker had it already


def made_by(settings) -> str:
    """The model and heads, which decide a shard's files: resuming with others redoes the shard."""
    return json.dumps({"model": settings.model, "heads": [[h.name, h.file] for h in settings.heads or ()]})


def load_stats(store: Store, shard: int, settings=None) -> EmbeddingStats | None:
    """A finished shard's stats; None when it is not finished, or (`settings`) was made by another model or heads."""
    data = store.read_json(embeddings_stats(shard))
    stats = EmbeddingStats.from_json(data) if data else None
    if stats is not None and settings is not None and stats.made_by != made_by(settings):
        return None
    return stats


class Embedder:
    """A batch's image and caption embeddings, of unit length, cast to float16 on the device and
    copied back without waiting (`launch`)."""

    def __init__(self, clip: Clip, heads: dict | None = None):
        import torch

        self.clip, self.cuda = clip, str(clip.device).startswith("cuda")
        self.half = torch.float16
        self.heads = heads or {}

    def launch(self, batch: Batch):
        import torch
        import torch.nn.functional as F

        images = F.normalize(self.clip.images(batch.pixels[self.clip.size]).float(), dim=-1)
        texts = F.normalize(self.clip.texts(batch.captions).float(), dim=-1)
        with torch.inference_mode():  # the scores of the float32 embeddings, before they are halved
            scores = {"clip_score": (images * texts).sum(-1), **{n: h(images)[:, 0] for n, h in self.heads.items()}}
        scores = {name: to_host(v, torch.float32, self.cuda) for name, v in scores.items()}
        return (
            batch,
            to_host(images, self.half, self.cuda),
            to_host(texts, self.half, self.cuda),
            scores,
            copied(self.cuda),
        )


def embed_shard(
    spec: PartSpec,
    shard: int,
    report: Callable[[EmbeddingStats], None] | None = None,
    report_every: float = 2.0,
    clip: Clip | None = None,
) -> EmbeddingStats:
    """Embed one of the part's finished shards into embeddings/; returns its stats (also persisted, last)."""
    settings = spec.embeddings
    if settings is None:
        raise InputError("spec.embeddings: required field is missing (the model and settings of the stage)")
    store = Store(spec.output)
    clear(store, embeddings_stats(shard), *(embeddings_file(kind, shard) for kind in EMBEDDING_FILES))
    started, loads = time.time(), LOADS[0]
    clip = clip or load_clip(settings)
    stats = EmbeddingStats(shard=shard, start_time=time.time(), device=clip.device, made_by=made_by(settings))
    stats.model_seconds = round(time.time() - started, 3) if LOADS[0] > loads else 0.0
    keys: list[str] = []
    captions: list[str] = []
    hashes: list[tuple[str, int]] = []
    scores: dict[str, list[np.ndarray]] = {}
    images: list[np.ndarray] = []
    texts: list[np.ndarray] = []

    def write(pending) -> int:
        batch, image, text, score, done = pending
        if done is not None:
            done.synchronize()
        for name, values in score.items():
            scores.setdefault(name, []).append(values.numpy())
        keys.extend(batch.keys)
        captions.extend(batch.captions)
        hashes.extend(batch.described)
        images.append(image.numpy())
        texts.append(text.numpy())
        return len(batch.keys)

    batches = decoded_batches(
        read_samples(store, shard, spec),
        clip.size,
        settings.batch_size,
        threads=decode_threads(settings, clip.device),
        describe=image_hashes,
    )
    run_batches(batches, Embedder(clip, heads(settings, clip)), write, stats, report, report_every)
    if keys:  # a shard without a decodable image has no files: clip-retrieval's readers refuse empty ones
        stats.dim = int(images[0].shape[1])
        put(store, embeddings_file("img_emb", shard), npy(np.concatenate(images)))
        put(store, embeddings_file("text_emb", shard), npy(np.concatenate(texts)))
        columns = {name: np.concatenate(values) for name, values in scores.items()}
        put(store, embeddings_file("metadata", shard), metadata(store, shard, keys, captions, hashes, columns))
    stats.end_time = time.time()
    store.write_json(stats.to_json(), embeddings_stats(shard))
    return stats


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def put(store: Store, name: str, data: bytes) -> None:
    path = store.path(name)
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe(path, data)


def heads(settings, clip: Clip) -> dict:
    """embeddings.heads, loaded over the model's width (a head of another width is refused, named)."""
    import torch

    if not settings.heads:
        return {}
    with torch.inference_mode():
        dim = int(clip.texts([""]).shape[-1])
    return {h.name: load_head(settings, n, dim, clip.device) for n, h in enumerate(settings.heads)}


def metadata(
    store: Store,
    shard: int,
    keys: list[str],
    captions: list[str],
    hashes: list[tuple[str, int]],
    scores: dict[str, np.ndarray] | None = None,
) -> bytes:
    """The embedded samples' rows of the shard's metadata, in the embeddings' order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = read_metadata(store, shard)
    where = {key: i for i, key in enumerate(table.column("key").to_pylist())} if "key" in table.column_names else {}
    rows = table.take(pa.array([where.get(key) for key in keys], type=pa.int64()))
    out = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "url": rows.column("url") if "url" in rows.column_names else pa.nulls(len(keys), pa.string()),
            "caption": pa.array(captions, pa.string()),
            "shard": pa.array([shard] * len(keys), pa.int32()),
            "image_sha256": pa.array([h[0] for h in hashes], pa.string()),
            "image_phash": pa.array([h[1] for h in hashes], pa.int64()),
            **{name: pa.array(values, pa.float32()) for name, values in (scores or {}).items()},
        }
    )
    for name in rows.column_names:
        if name not in LEADING and name not in OUTCOME and name not in out.column_names:
            out = out.append_column(rows.schema.field(name), rows.column(name))
    buf = io.BytesIO()
    pq.write_table(out, buf)
    return buf.getvalue()
