"""Batches of precomputed latents and text embeddings from a part's output, for training.

    from laion_operator.latents_loader import build_latents_dataloader

    loader = build_latents_dataloader("s3://bucket/part-7", batch_size=64, local="/tmp/part-7-cache")
    for batch in loader:
        batch["image_latents"]    # (64, C, H/f, W/f) float32, scaled as the diffusion model expects
        batch["caption_latents"]  # (64, tokens, width) float32, the text encoder's hidden states
        batch["caption"], batch["key"]

It is mosaicml-streaming's StreamingDataset over `latents/index.json` (`contract.LATENTS_INDEX`),
so it shards, shuffles and resumes across ranks and workers as streaming does; the shapes and the
dtype come from `latents/_latents.json`. The same MDS is also what micro_diffusion's
`StreamingLatentsDataset` reads (`latents_<resolution>`, `caption_latents`, float16 bytes).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import fsspec
import numpy as np
import torch

from . import contract
from .pipeline.latents import streaming

_mds = streaming()


def read_manifest(output: str) -> dict:
    """The latents' shapes, dtype, scaling and models, from a part's output (a path or s3://)."""
    url = f"{output.rstrip('/')}/{contract.LATENTS_MANIFEST}"
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no latents here (a part with spec.latents writes them)") from None


class LatentsDataset(_mds.StreamingDataset):  # type: ignore[name-defined]  # mosaicml-streaming, loaded at run time
    """Each sample as tensors: image_latents, caption_latents (float32), caption and key."""

    def __init__(self, output: str, local: str | None = None, **kwargs: Any):
        self.manifest = read_manifest(output)
        root = f"{output.rstrip('/')}/{contract.LATENTS_DIR}"
        if "://" in output:
            local = local or tempfile.mkdtemp(prefix="laion-latents-")
            super().__init__(remote=root, local=local, **kwargs)
        else:
            super().__init__(local=os.path.abspath(root), **kwargs)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.image_shape = tuple(self.manifest["imageShape"])
        self.caption_shape = tuple(self.manifest["captionShape"])
        self.image_column = self.manifest["columns"]["image"]
        self.caption_column = self.manifest["columns"]["caption"]

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        image = np.frombuffer(sample[self.image_column], dtype=self.dtype).reshape(self.image_shape)
        caption = np.frombuffer(sample[self.caption_column], dtype=self.dtype).reshape(self.caption_shape)
        return {
            "image_latents": torch.from_numpy(image.astype(np.float32)),
            "caption_latents": torch.from_numpy(caption.astype(np.float32)),
            "caption": sample["caption"],
            "key": sample["key"],
        }


def build_latents_dataloader(output: str, batch_size: int, local: str | None = None, shuffle: bool = False,
                             drop_last: bool = False, seed: int = 0, **dataloader_kwargs: Any):
    """A torch DataLoader of LatentsDataset batches; `local` is the cache folder for an s3:// output."""
    dataset = LatentsDataset(output, local=local, shuffle=shuffle, shuffle_seed=seed, batch_size=batch_size)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, **dataloader_kwargs)
