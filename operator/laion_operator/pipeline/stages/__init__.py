"""A part's stages, one module each, as img2dataset keeps one module per stage: each has
`wanted(run)` (does this run take it) and `run(run) -> its result`, the one entry the driver calls
(`base` holds the `Run` they share and the shard stages' common steps).

A new stage is one module here and its line in the lists below.
"""

from __future__ import annotations

from . import annotate, convert, download, embeddings, filtering, finish, heal, latents, verify
from .base import Run, Stage

# A part, from its source to a healed dataset; each stage runs when its `wanted(run)` says so. The
# embeddings (and their dedup) before the latents, which latents.dropDuplicates and scores read.
PART: tuple[Stage, ...] = (filtering, convert, download, annotate, verify, embeddings, latents, finish, heal)
# `laion-operator latents`: the latents stage alone, over an output already written or an MDS folder.
LATENTS: tuple[Stage, ...] = (latents, finish)
# `laion-operator embed`: the embeddings stage alone, over an output already written.
EMBED: tuple[Stage, ...] = (embeddings, finish)
# `laion-operator heal`: the heal stage alone, over a finished part.
HEAL: tuple[Stage, ...] = (heal,)

__all__ = ["EMBED", "HEAL", "LATENTS", "PART", "Run", "Stage"]
