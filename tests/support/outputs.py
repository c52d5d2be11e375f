"""A part's output read back as its own format reads it (pipeline/formats/), for the tests' checks:
no test reads a tar, an MDS folder, a TFRecord or a shard's parquet by hand."""

from __future__ import annotations

from laion_operator.pipeline import formats
from laion_operator.pipeline.formats import Sample
from laion_operator.spec import Output
from laion_operator.storage import Store


def store_of(output) -> Store:
    """The Store of an output given as a path, a URI, an Output or a Store."""
    if isinstance(output, Store):
        return output
    if isinstance(output, Output):
        return Store(output)
    return Store(
        Output(
            uri=str(output),
            endpoint=None,
            region=None,
            path_style=False,
            profile=None,
            credentials_secret=None,
            retry_seconds=30,
        )
    )


def shards(output, fmt: str) -> list[int]:
    """The shards whose data file (or folder) in `fmt` the output holds."""
    return sorted({s for n in _names(store_of(output)) if (s := formats.get(fmt).shard_of(n)) is not None})


def images(output, fmt: str, shard: int | None = None) -> list[Sample]:
    """The samples with an image of one shard, or of every shard, as the format reads them back."""
    store = store_of(output)
    found = shards(store, fmt) if shard is None else [shard]
    return [s for n in found for s in formats.get(fmt).read_samples(store, n) if s.image is not None]


def metadata(output) -> list[dict]:
    """Every sample's metadata row and status, from every shard's `<shard>.parquet` (any format)."""
    store = store_of(output)
    numbered = sorted({s for n in _names(store) if (s := formats.base.numbered(n, ".parquet")) is not None})
    return [row for s in numbered for row in formats.read_metadata(store, s).to_pylist()]


def _names(store: Store) -> list[str]:
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.root, detail=False)]
