"""Batches of precomputed latents and text embeddings, mixed across datasets, for training.

    from laion_operator.latents_loader import build_latents_dataloader

    loader = build_latents_dataloader(
        ["s3://bucket/laion-aesthetic",                  # a LaionDataset's root (dataset_index.json)
         {"path": "s3://bucket/part-7", "proportion": 0.2},  # one part's output
         "/data/diffdb-latents"],                        # `laion-operator latents --mds` output
        batch_size=64, resolution=256, local="/tmp/latents-cache", captionDropProbability=0.1)
    for batch in loader:
        batch["image_latents"]    # (64, C, 256/f, 256/f) float32, scaled as the diffusion model expects
        batch["caption_latents"]  # (64, tokens, width) float32; zeros where the caption was dropped
        batch["caption"], batch["key"], batch["caption_dropped"], batch["stream"]

As micro_diffusion's `build_streaming_latents_dataloader`, every dataset is a stream (mosaicml-
streaming's `Stream`; a LaionDataset's root gives one a finished part) of one StreamingDataset, so
streams mix as streaming mixes them (`proportion`, `repeat` or `choose` per dataset), and it shards,
shuffles and resumes across ranks and workers as streaming does. Each stream's shapes and dtype come
from its own `latents/_latents.json`; streams whose latents cannot share a batch (another shape,
dtype, VAE or scaling) are refused, naming both. The same MDS is also what micro_diffusion's
`StreamingLatentsDataset` reads (`latents_<resolution>`, `caption_latents`, float16 bytes).

`drop_duplicates=True` and `scores={"clip_score": {"min": 0.28}}` leave out, per part, what its
embeddings/duplicates.parquet lists and the samples outside thresholds on its embeddings metadata
(pipeline/selection.py, the rule `convert` and the latents stage follow too).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch

from . import contract
from .pipeline.formats.mds import streaming
from .pipeline.selection import Selection, dataset_duplicates, load
from .storage import Store

_mds = streaming()

Dataset = str | dict  # a path or URL, or {"path": …, "proportion" | "repeat" | "choose": …}
MIX_KEYS = ("proportion", "repeat", "choose")
# What two streams must agree on to share a batch (and a model's training).
COMPATIBLE = ("dtype", "captionShape", "scalingFactor", "shiftFactor", "vae", "vaeSubfolder", "textEncoder")


def _read_json(url: str) -> dict | None:
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_manifest(output: str) -> dict:
    """The latents' shapes, dtype, scaling and models, from a part's output (a path or s3://)."""
    url = f"{output.rstrip('/')}/{contract.LATENTS_MANIFEST}"
    manifest = _read_json(url)
    if manifest is None:
        raise FileNotFoundError(f"{url}: no latents here (a part with spec.latents writes them)")
    return manifest


def _samples(latents_root: str) -> int:
    index = _read_json(f"{latents_root}/{contract.MDS_INDEX}") or {"shards": []}
    return sum(entry["samples"] for entry in index["shards"])


@dataclass
class Source:
    """One stream: a part's latents folder, its manifest, and how it mixes."""

    name: str  # what errors call it: the part's output
    root: str  # its latents/ folder
    manifest: dict
    mix: dict
    dataset: str | None = None  # the LaionDataset's root it is a part of


def sources(dataset: Dataset) -> list[Source]:
    """A dataset's streams: one a ready part of a LaionDataset's root (`contract.DATASET_INDEX`), or the
    one of a part's output. A LaionDataset's proportion is shared among its parts by their samples."""
    spec = {"path": dataset} if isinstance(dataset, str) else dict(dataset)
    if "path" not in spec:
        raise ValueError(f"{dataset!r}: a dataset is a path or URL, or a mapping with `path`")
    path = str(spec.pop("path")).rstrip("/")
    mix = {k: spec.pop(k) for k in MIX_KEYS if spec.get(k) is not None}
    if spec:
        raise ValueError(f"{path}: unknown dataset options {sorted(spec)} (known: path, {', '.join(MIX_KEYS)})")
    index = _read_json(f"{path}/{contract.DATASET_INDEX}")
    if index is None:
        return [Source(path, f"{path}/{contract.LATENTS_DIR}", read_manifest(path), mix)]
    parts = [p for p in index.get("parts", []) if p.get("ready")]
    if not parts:
        raise FileNotFoundError(f"{path}/{contract.DATASET_INDEX}: no part is ready yet")
    found = [
        Source(
            f"{path}/{p['output']}",
            f"{path}/{p.get('latents') or p['output'] + '/' + contract.LATENTS_DIR}",
            read_manifest(f"{path}/{p['output']}"),
            dict(mix),
            path,
        )
        for p in parts
    ]
    shared = index.get("latents")
    if shared is None:
        raise FileNotFoundError(f"{path}/{contract.DATASET_INDEX}: the dataset has no spec.latents")
    for source in found:  # each part as the dataset's one manifest says
        for key in ("dtype", "resolutions", "vae", "vaeSubfolder", "textEncoder"):
            if source.manifest.get(key) != shared.get(key):
                raise ValueError(
                    f"incompatible latents: {path}/{contract.DATASET_INDEX} has {key} "
                    f"{shared.get(key)!r}, {source.name} {source.manifest.get(key)!r}"
                )
    if "proportion" in mix:
        counts = [_samples(s.root) for s in found]
        for source, count in zip(found, counts):
            source.mix["proportion"] = float(mix["proportion"]) * count / max(sum(counts), 1)
    return found


def image_column(source: Source, resolution: int | None) -> tuple[str, tuple[int, ...]]:
    """The stream's column and shape of image latents at `resolution` (None: its smallest)."""
    m = source.manifest
    shapes = m.get("imageShapes") or {str(m["resolution"]): m["imageShape"]}
    columns = m["columns"].get("images") or {str(m["resolution"]): m["columns"]["image"]}
    r = str(resolution if resolution is not None else m["resolution"])
    if r not in columns:
        raise ValueError(
            f"{source.name}: no latents at resolution {r} (it holds {', '.join(sorted(columns, key=int))})"
        )
    return columns[r], tuple(shapes[r])


def check_compatible(found: list[Source], resolution: int | None) -> None:
    """Refuse streams that cannot share a batch, naming the first one and the one that differs."""
    first = found[0]
    _, shape = image_column(first, resolution)
    for other in found[1:]:
        _, other_shape = image_column(other, resolution)
        if other_shape != shape:
            raise ValueError(
                f"incompatible latents: {first.name} has image latents {list(shape)}, {other.name} {list(other_shape)}"
            )
        for key in COMPATIBLE:
            if first.manifest.get(key) != other.manifest.get(key):
                raise ValueError(
                    f"incompatible latents: {first.name} has {key} {first.manifest.get(key)!r}, "
                    f"{other.name} {other.manifest.get(key)!r}"
                )


def dropped(seed: int, key: str, probability: float) -> bool:
    """Whether a sample's caption is dropped (classifier-free guidance): by (seed, key), so that the
    same samples are dropped whatever the worker, the rank or a resumed epoch."""
    if probability <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < probability


class LatentsDataset(_mds.StreamingDataset):  # type: ignore[name-defined]  # mosaicml-streaming, loaded at run time
    """Each sample as tensors: image_latents, caption_latents (float32), caption, key and whether its
    caption was dropped; over one dataset or a mix of them."""

    def __init__(
        self,
        datasets: Dataset | list[Dataset],
        local: str | None = None,
        resolution: int | None = None,
        caption_drop_probability: float = 0.0,
        caption_drop_seed: int = 0,
        drop_duplicates: bool = False,
        scores: dict | None = None,
        **kwargs: Any,
    ):
        datasets = [datasets] if isinstance(datasets, (str, dict)) else list(datasets)
        if not datasets:
            raise ValueError("no dataset to read: give at least one path or URL")
        if not 0 <= caption_drop_probability <= 1:
            raise ValueError(f"captionDropProbability: {caption_drop_probability} is not in [0, 1]")
        found = [s for d in datasets for s in sources(d)]
        check_compatible(found, resolution)
        self.sources = found
        self.selections = selections(found, drop_duplicates, scores)
        self.manifest = found[0].manifest
        self.columns = [image_column(s, resolution) for s in found]
        self.dtypes = [np.dtype(s.manifest["dtype"]) for s in found]
        self.caption_shape = tuple(self.manifest["captionShape"])
        self.caption_drop_probability, self.caption_drop_seed = caption_drop_probability, caption_drop_seed
        cache = local
        streams = []
        for i, s in enumerate(found):
            if "://" in s.root:
                cache = cache or tempfile.mkdtemp(prefix="laion-latents-")
                streams.append(_mds.Stream(remote=s.root, local=os.path.join(cache, str(i)), **s.mix))
            else:
                streams.append(_mds.Stream(local=os.path.abspath(s.root), **s.mix))
        super().__init__(streams=streams, **kwargs)

    def __iter__(self):
        """streaming's iteration, less the samples `drop_duplicates` and `scores` leave out: a
        worker's, a rank's and an epoch's share may then hold fewer samples than `len` says."""
        for sample in super().__iter__():
            selection = self.selections[sample["stream"]]
            if selection is None or selection.why(sample["key"]) is None:
                yield sample

    @property
    def dropped(self) -> dict[str, int]:
        """The samples this process's iteration left out so far, by kind (a DataLoader worker counts its own)."""
        return dict(sum((Counter(s.counts) for s in self.selections if s is not None), Counter()))

    def get_item(self, sample_id: int, retry: int = 7) -> dict:
        sample = super().get_item(sample_id, retry)
        stream = int(self.stream_per_shard[self.spanner[sample_id][0]])
        column, shape = self.columns[stream]
        dtype, name = self.dtypes[stream], self.sources[stream].name
        image = self._array(sample[column], dtype, shape, name, column)
        caption = self._array(
            sample[contract.CAPTION_LATENTS], dtype, self.caption_shape, name, contract.CAPTION_LATENTS
        )
        drop = dropped(self.caption_drop_seed, sample["key"], self.caption_drop_probability)
        return {
            "image_latents": torch.from_numpy(image.astype(np.float32)),
            "caption_latents": torch.zeros(caption.shape) if drop else torch.from_numpy(caption.astype(np.float32)),
            "caption": "" if drop else sample["caption"],
            "caption_dropped": drop,
            "key": sample["key"],
            "stream": stream,  # which dataset of the mix (the place of its stream in `sources`)
        }

    @staticmethod
    def _array(data: bytes, dtype: np.dtype, shape: tuple[int, ...], name: str, column: str) -> np.ndarray:
        if len(data) != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(
                f"{name}: a sample's {column} holds {len(data)} bytes, its manifest says "
                f"{list(shape)} of {dtype.name} ({dtype.itemsize * int(np.prod(shape))} bytes)"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)


def selected(output: str, drop_duplicates: bool, scores: dict | None) -> Selection | None:
    """What `drop_duplicates` and `scores` leave out of a part's output (pipeline/selection.py)."""
    from .spec import output_of

    return load(Store(output_of({"uri": output})), drop_duplicates, scores, "build_latents_dataloader")


def selections(found: list[Source], drop_duplicates: bool, scores: dict | None) -> list[Selection | None]:
    """Each stream's selection. A LaionDataset root's own duplicates.parquet (`laion-operator dedup`
    over its parts, `--into` the root: duplicates across parts too) stands for its parts' own files."""
    from .spec import output_of

    wide: dict[str, dict | None] = {}
    out = []
    for source in found:
        per_part = None
        if drop_duplicates and source.dataset is not None:
            if source.dataset not in wide:
                wide[source.dataset] = dataset_duplicates(Store(output_of({"uri": source.dataset})))
            across = wide[source.dataset]
            if across is not None:
                per_part = across.get(source.name.rsplit("/", 1)[-1], {})
        selection = selected(source.name, drop_duplicates and per_part is None, scores)
        if per_part is not None:
            selection = selection or Selection()
            selection.duplicates = per_part
        out.append(selection)
    return out


def build_latents_dataloader(
    datasets: Dataset | list[Dataset],
    batch_size: int,
    local: str | None = None,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    resolution: int | None = None,
    captionDropProbability: float = 0.0,
    drop_duplicates: bool = False,
    scores: dict | None = None,
    **dataloader_kwargs: Any,
):
    """A torch DataLoader of LatentsDataset batches over one dataset or a mix (a list; each a path or
    URL, or a mapping with `proportion`, `repeat` or `choose`); `local` is the cache folder for
    s3:// datasets; `resolution` picks the `latents_<r>` column (None: each dataset's smallest);
    `drop_duplicates` and `scores` ({column: {min, max}}) leave out what each part's embeddings/
    duplicates.parquet marks as not kept and the samples outside thresholds on its embeddings metadata
    (drop_last=True keeps ranks' batch counts equal when they do)."""
    dataset = LatentsDataset(
        datasets,
        local=local,
        resolution=resolution,
        caption_drop_probability=captionDropProbability,
        caption_drop_seed=seed,
        drop_duplicates=drop_duplicates,
        scores=scores,
        shuffle=shuffle,
        shuffle_seed=seed,
        batch_size=batch_size,
    )
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, **dataloader_kwargs)
