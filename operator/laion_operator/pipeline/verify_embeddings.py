"""Verify's look at the embeddings folder (pipeline/embeddings.py's clip-retrieval layout, and
pipeline/dedup.py's duplicates.parquet), against the shards as verify read them back: what a reader
of the folder (autofaiss, embedding-reader, selection.py, the index's id map) would trip over.

Per embedded shard (one with `embeddings/<shard>_stats.json`): img_emb and text_emb open as (N, d)
arrays of the same N and d, the metadata has N rows, N is the stats' `written`, and the metadata's keys
are the shard's own keys in the shard's order, less exactly `skipped` (images that did not decode).
A shard read back without its stats file is reported as not embedded. duplicates.parquet's keys and
kept keys are samples the embeddings hold, of a known kind. Every problem names its file.
"""

from __future__ import annotations

import numpy as np

from ..contract import EMBEDDINGS_DUPLICATES, embeddings_file, embeddings_stats
from ..storage import Store


def check_embeddings(store: Store, keys_by_shard: dict[int, list[str]]) -> list[str]:
    """Problems of the embeddings folder, given each shard's keys as read back (in their order)."""
    from .dedup import KINDS
    from .embeddings import load_stats

    problems: list[str] = []
    embedded: set[str] = set()
    for shard, keys in sorted(keys_by_shard.items()):
        stats = load_stats(store, shard)
        if stats is None:
            problems.append(f"{embeddings_stats(shard)}: missing: shard {shard} is not embedded")
            continue
        found = _shard(store, shard, stats.written, problems)
        if found is None:
            continue
        rows = iter(keys)
        if not all(key in rows for key in found):  # a subsequence: the shard's order, each key once
            problems.append(f"{embeddings_file('metadata', shard)}: its keys are not the shard's, in the shard's order")
        elif len(keys) - len(found) != stats.skipped:
            problems.append(
                f"{embeddings_file('metadata', shard)}: {len(found)} rows of the shard's {len(keys)} samples, "
                f"{embeddings_stats(shard)} says {stats.skipped} skipped"
            )
        embedded.update(found)
    if store.exists(EMBEDDINGS_DUPLICATES):
        problems += _duplicates(store, embedded, set(KINDS))
    return problems


def _shard(store: Store, shard: int, written: int, problems: list[str]) -> list[str] | None:
    """The shard's metadata keys when its three files agree with each other and its stats, else None
    (the disagreement added to `problems`)."""
    import pyarrow.parquet as pq

    if not written:
        return []
    shapes = {}
    for kind in ("img_emb", "text_emb"):
        name = embeddings_file(kind, shard)
        try:
            with store.fs.open(store.path(name), "rb") as f:
                array = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            problems.append(f"{name}: cannot be read: {type(err).__name__}: {err}")
            return None
        if array.ndim != 2:
            problems.append(f"{name}: shape {list(array.shape)}, not (samples, width)")
            return None
        shapes[kind] = array.shape
    name = embeddings_file("metadata", shard)
    try:
        with store.fs.open(store.path(name), "rb") as f:
            keys = pq.read_table(f, columns=["key"]).column("key").to_pylist()
    except (OSError, ValueError, KeyError) as err:  # pyarrow's errors are OSError and ValueError subclasses
        problems.append(f"{name}: cannot be read: {type(err).__name__}: {err}")
        return None
    counts = {embeddings_file(kind, shard): shape[0] for kind, shape in shapes.items()} | {name: len(keys)}
    bad = {file: n for file, n in counts.items() if n != written}
    if bad or shapes["img_emb"][1] != shapes["text_emb"][1]:
        said = ", ".join(f"{file} {n} rows" for file, n in counts.items())
        problems.append(
            f"{next(iter(bad), embeddings_file('text_emb', shard))}: the shard's files disagree: {said} "
            f"(widths {shapes['img_emb'][1]} and {shapes['text_emb'][1]}), {embeddings_stats(shard)} says {written}"
        )
        return None
    return keys


def _duplicates(store: Store, embedded: set[str], kinds: set[str]) -> list[str]:
    import pyarrow.parquet as pq

    try:
        with store.fs.open(store.path(EMBEDDINGS_DUPLICATES), "rb") as f:
            rows = pq.read_table(f, columns=["key", "kept", "kind"]).to_pylist()
    except (OSError, ValueError, KeyError) as err:
        return [f"{EMBEDDINGS_DUPLICATES}: cannot be read: {type(err).__name__}: {err}"]
    problems = []
    for row in rows:
        unknown = [row[c] for c in ("key", "kept") if row[c] not in embedded]
        if unknown or row["kind"] not in kinds:
            what = f"key {unknown[0]!r} is no embedded sample" if unknown else f"kind {row['kind']!r} is unknown"
            problems.append(f"{EMBEDDINGS_DUPLICATES}: {what} ({len(rows)} rows)")
            break
    return problems
