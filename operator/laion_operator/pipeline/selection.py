"""Which samples of an embedded output a reader leaves out: the duplicates embeddings/duplicates.parquet
marks as not kept (`dropDuplicates`: every row of it is a sample whose group keeps another), and the
samples outside `scores` thresholds on columns of the embeddings' metadata (clip_score, a head's).

One rule for every reader of an output: `laion-operator convert` (spec.filter, over source.dataset),
the latents stage (spec.latents, over the part's own output) and the latents loader (over each part it
reads). A sample is judged by its key, so that a reader needs the embeddings folder only, never the
images: a threshold needs a score, so a sample the embeddings stage did not embed (its image did not
decode) is left out by any threshold. A threshold on a column the metadata lacks is bad input, named
with the file that lacks it: a misspelt column would otherwise keep nothing, or everything.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..contract import EMBEDDINGS_DIR, EMBEDDINGS_DUPLICATES, embeddings_file
from ..errors import InputError
from ..storage import Store

SCORE = "score"  # the kind of a sample left out by a threshold, beside dedup's kinds


@dataclass
class Selection:
    """The left-out samples of one output, by key: `why(key)` is (kind, message) or None (kept)."""

    duplicates: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (kind, message)
    below: dict[str, str] = field(default_factory=dict)  # key -> which threshold it fails
    scored: frozenset[str] | None = None  # keys with a metadata row, when thresholds are set
    counts: Counter = field(default_factory=Counter)  # what `why` left out so far, by kind

    def why(self, key: str) -> tuple[str, str] | None:
        found = self.duplicates.get(key)
        if found is None and self.scored is not None:
            if key in self.below:
                found = (SCORE, self.below[key])
            elif key not in self.scored:
                found = (SCORE, "no row in the embeddings metadata, so no score to hold to the thresholds")
        if found is not None:
            self.counts[found[0]] += 1
        return found


def load(
    store: Store, drop_duplicates: bool | None, scores: dict | None, field_name: str, shard: int | None = None
) -> Selection | None:
    """The selection `field_name`'s dropDuplicates and scores make of the output in `store`; None when
    neither is set (every sample kept). `shard`: the scores of that shard's metadata only (a shard task
    of the same output, whose samples have no row in any other)."""
    if not drop_duplicates and not scores:
        return None
    selection = Selection()
    if drop_duplicates:
        selection.duplicates = _duplicates(store, field_name)
    if scores:
        selection.scored, selection.below = _scores(store, scores, field_name, shard)
    return selection


def _duplicates(store: Store, field_name: str) -> dict[str, tuple[str, str]]:
    import pyarrow.parquet as pq

    if not store.exists(EMBEDDINGS_DUPLICATES):
        raise InputError(
            f"{field_name}.dropDuplicates: {store.url(EMBEDDINGS_DUPLICATES)} does not exist: find the duplicates "
            "first (spec.embeddings.dedup, or laion-operator dedup)"
        )
    with store.fs.open(store.path(EMBEDDINGS_DUPLICATES), "rb") as f:
        rows = pq.read_table(f, columns=["key", "kept", "kind"]).to_pydict()
    return {
        key: (kind, f"duplicate ({kind}) of {kept}") for key, kept, kind in zip(rows["key"], rows["kept"], rows["kind"])
    }


def dataset_duplicates(store: Store) -> dict[str, dict[str, tuple[str, str]]] | None:
    """A dataset's own duplicates.parquet (`laion-operator dedup PART… --into ROOT`, its rows named
    `<n>/<key>` with their `part`): each part's, by the part folder's name (the last of its URL), as
    `key -> (kind, message)`; None where the root holds none (each part's own file is read then)."""
    import pyarrow.parquet as pq

    if not store.exists(EMBEDDINGS_DUPLICATES):
        return None
    with store.fs.open(store.path(EMBEDDINGS_DUPLICATES), "rb") as f:
        if "part" not in pq.read_schema(f).names:
            return None
        rows = pq.read_table(f, columns=["key", "kept", "kind", "part", "keptPart"]).to_pydict()
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for key, kept, kind, part, kept_part in zip(*(rows[c] for c in ("key", "kept", "kind", "part", "keptPart"))):
        message = f"duplicate ({kind}) of {kept.split('/', 1)[1]} in {kept_part}"
        found.setdefault(part.rstrip("/").rsplit("/", 1)[-1], {})[key.split("/", 1)[1]] = (kind, message)
    return found


def _scores(
    store: Store, scores: dict, field_name: str, shard: int | None = None
) -> tuple[frozenset[str], dict[str, str]]:
    import pyarrow.parquet as pq

    if shard is not None:  # a shard without a decodable image has no metadata file: no sample is scored
        files = [p for p in [store.path(embeddings_file("metadata", shard))] if store.fs.exists(p)]
    else:
        files = sorted(store.fs.glob(store.path(EMBEDDINGS_DIR, "metadata", "metadata_*.parquet")))
    if not files and shard is None:
        raise InputError(
            f"{field_name}.scores: {store.url(EMBEDDINGS_DIR, 'metadata')} holds no metadata_*.parquet: "
            "embed the output first (spec.embeddings)"
        )
    scored: set[str] = set()
    below: dict[str, str] = {}
    for path in files:
        url = store.url(path[len(store.root.rstrip("/")) + 1 :])
        with store.fs.open(path, "rb") as f:
            names = pq.read_schema(f).names
            for column in scores:
                if column not in names:
                    raise InputError(
                        f"{field_name}.scores.{column}: {url} has no column {column!r} "
                        f"(its columns: {', '.join(names)})"
                    )
            table = pq.read_table(f, columns=["key", *scores]).to_pydict()
        for i, key in enumerate(table["key"]):
            scored.add(key)
            for column, bounds in scores.items():
                failed = _outside(table[column][i], bounds, f"{field_name}.scores.{column}")
                if failed:
                    below[key] = f"{column} {failed}"
                    break
    return frozenset(scored), below


def _outside(value: float | None, bounds: dict, field_name: str) -> str | None:
    """How `value` misses its bounds, or None when it is within them."""
    if value is None:
        return f"is null: no score for {field_name}"
    if bounds.get("min") is not None and value < bounds["min"]:
        return f"{value:.4g} is under {field_name}.min ({bounds['min']})"
    if bounds.get("max") is not None and value > bounds["max"]:
        return f"{value:.4g} is over {field_name}.max ({bounds['max']})"
    return None


def of_dataset(spec) -> Selection | None:
    """spec.filter's selection of the dataset a part converts (source.dataset), read with the output's
    storage options as the dataset's samples are; None for any other part."""
    import dataclasses

    if spec.dataset is None:
        return None
    store = Store(dataclasses.replace(spec.output, uri=spec.dataset.uri))
    return load(store, spec.filter.drop_duplicates, spec.filter.scores, "spec.filter")
