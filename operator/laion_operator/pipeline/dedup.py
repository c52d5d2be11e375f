"""Duplicates within a part, over what was downloaded (spec.embeddings.dedup), three ways:

    exact        the same stored image bytes (SHA-256)
    perceptual   the same picture resized or recompressed: 64-bit DCT hashes (pHash: the 8×8 lowest
                 frequencies of a 32×32 grey image's DCT, each above their median or not) at most
                 `hammingDistance` bits apart
    semantic     image embeddings (unit length) whose cosine similarity is at least `similarity`

Every pair found joins its two samples' groups (connected components, as clip-retrieval's back end
dedups its results), whichever way it was found. Which sample a group keeps is deterministic: the
smallest key, i.e. the first in the part's own order (keys are the shard's number, then the sample's
place in it). Every other member is a row of embeddings/duplicates.parquet: its key, the key kept,
`kind` (the first test, in the order above, that paired it with any member of its group) and
`similarity` (the cosine similarity of its image embedding and the kept one's), with `hamming` (the
two DCT hashes' distance).

The hashes are computed by the embeddings stage's shard tasks while they decode the images (columns
`image_sha256` and `image_phash` of the embeddings' metadata), so that this runs on the driver over
the embeddings folder alone. Up to EXACT_UP_TO samples, pairs are found by brute force, in blocks that
bound the memory (n²/2 XOR-popcounts and an n×n×d product). Above it, FAISS finds them: the DCT hashes
in a multi-index hash of 7 tables of 9 bits (two hashes at most 6 bits apart agree on one table's
bits: none is missed), the embeddings in an inverted-file index searched by range (approximate: a
pair whose two vectors fall in cells NPROBE apart is missed; measured in bench/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from ..contract import EMBEDDINGS_DUPLICATES, embeddings_file
from ..spec import Dedup, PartSpec
from ..storage import Store

KINDS = ("exact", "perceptual", "semantic")
HASH_GREY = 32  # the grey image's side
HASH_LOW = 8  # the lowest frequencies kept, per side: 64 bits
CELLS = 1 << 24  # a block of the pairwise comparisons: 16 M cells, 128 MiB of 64-bit hashes


def _dct_matrix(n: int) -> np.ndarray:
    """DCT-II as a matrix (unnormalised: a scale per row does not move a coefficient past the median)."""
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n))


_DCT = _dct_matrix(HASH_GREY)


def phash(data: bytes) -> int:
    """The 64-bit DCT hash of an encoded image (imagehash's phash: Lanczos to 32×32 grey, 2-D DCT,
    the 8×8 lowest frequencies against their median), as an unsigned int."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (HASH_GREY * 2, HASH_GREY * 2))  # JPEG: decoded at a fraction, all a hash needs
        grey = np.asarray(image.convert("L").resize((HASH_GREY, HASH_GREY), Image.Resampling.LANCZOS), np.float64)
    low = (_DCT @ grey @ _DCT.T)[:HASH_LOW, :HASH_LOW].ravel()
    return int(np.packbits(low > np.median(low)).view(">u8")[0])


def image_hashes(data: bytes) -> tuple[str, int]:
    """(SHA-256 hex, DCT hash as a signed 64-bit int, parquet's) of an encoded image."""
    return hashlib.sha256(data).hexdigest(), int(np.uint64(phash(data)).view(np.int64))


class Groups:
    """Union-find whose root is always the smallest index of its group."""

    def __init__(self, n: int):
        self.parent = np.arange(n)
        self.kind = np.full(n, -1, dtype=np.int8)

    def root(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = int(self.parent[i])
        return i

    def join(self, a: int, b: int, kind: int) -> None:
        for i in (a, b):
            if self.kind[i] < 0:
                self.kind[i] = kind
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _pairs(scores, threshold, above: bool):
    """Index pairs (i < j) of the blocks of a symmetric score matrix at or past `threshold`."""
    for start, block in scores:
        hit = block >= threshold if above else block <= threshold
        rows, cols = np.nonzero(hit)
        keep = cols > rows + start
        yield from zip((rows[keep] + start).tolist(), cols[keep].tolist())


def _rows(n: int) -> int:
    return max(1, CELLS // max(n, 1))


EXACT_UP_TO = 50_000  # samples compared pair by pair; more go through FAISS's indexes
QUERY_ROWS = 65_536  # queries per FAISS range search: bounds the result lists held at once
NPROBE = 16  # inverted lists searched per query (of 4·√n)


def _range_pairs(search, n: int):
    """Index pairs (i < j) from an index's range searches, QUERY_ROWS queries at a time."""
    for start in range(0, n, QUERY_ROWS):
        lims, _, found = search(start, min(start + QUERY_ROWS, n))
        queries = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = found > queries
        yield from zip(queries[keep].tolist(), found[keep].tolist())


def _hamming_pairs(hashes: np.ndarray, distance: int):
    if len(hashes) <= EXACT_UP_TO:
        yield from _pairs(_hamming_blocks(hashes), distance, above=False)
        return
    import faiss

    if distance > 6:  # 7 tables of 9 bits find every pair up to 6 bits apart, no further
        raise ValueError(f"spec.embeddings.dedup.hammingDistance {distance}: above {EXACT_UP_TO:,} samples, 6 at most")
    codes = np.ascontiguousarray(hashes.view(np.uint8).reshape(len(hashes), 8))
    index = faiss.IndexBinaryMultiHash(64, 7, 9)
    index.add(codes)
    yield from _range_pairs(lambda a, b: index.range_search(codes[a:b], distance + 1), len(codes))


def _cosine_pairs(emb: np.ndarray, similarity: float):
    if len(emb) <= EXACT_UP_TO:
        yield from _pairs(_cosine_blocks(emb), similarity, above=True)
        return
    import faiss

    n, dim = emb.shape
    cells = int(4 * np.sqrt(n))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(n, min(n, 64 * cells), replace=False)
    index.train(emb[np.sort(sample)])
    index.add(emb)
    index.nprobe = NPROBE
    # faiss keeps an inner product strictly above the radius
    yield from _range_pairs(lambda a, b: index.range_search(emb[a:b], np.nextafter(similarity, -1)), n)


def _hamming_blocks(hashes: np.ndarray):
    for start in range(0, len(hashes), rows := _rows(len(hashes))):
        yield start, np.bitwise_count(hashes[start : start + rows, None] ^ hashes[None, :])


def _cosine_blocks(emb: np.ndarray):
    for start in range(0, len(emb), rows := _rows(len(emb))):
        yield start, emb[start : start + rows] @ emb.T


def find(keys: list[str], sha: list[str], hashes: np.ndarray, emb: np.ndarray, settings: Dedup):
    """The duplicates among the samples (in any order): a pyarrow table of key, kept, kind,
    similarity, hamming, sorted by key; and the count of each kind."""
    import pyarrow as pa

    order = np.argsort(np.array(keys, dtype=object), kind="stable")
    keys = [keys[i] for i in order]
    sha = [sha[i] for i in order]
    hashes = np.asarray(hashes, dtype=np.int64)[order].view(np.uint64)
    emb = np.asarray(emb, dtype=np.float32)[order]
    groups = Groups(len(keys))
    if settings.exact:
        first: dict[str, int] = {}
        for i, digest in enumerate(sha):
            if (j := first.setdefault(digest, i)) != i:
                groups.join(j, i, 0)
    if settings.perceptual:
        for a, b in _hamming_pairs(hashes, settings.hamming_distance):
            groups.join(a, b, 1)
    if settings.semantic:
        for a, b in _cosine_pairs(np.ascontiguousarray(emb), settings.similarity):
            groups.join(a, b, 2)
    members = [i for i in range(len(keys)) if groups.root(i) != i]
    kept = [groups.root(i) for i in members]
    kinds = [KINDS[groups.kind[i]] for i in members]
    table = pa.table(
        {
            "key": pa.array([keys[i] for i in members], pa.string()),
            "kept": pa.array([keys[r] for r in kept], pa.string()),
            "kind": pa.array(kinds, pa.string()),
            "similarity": pa.array([float(emb[i] @ emb[r]) for i, r in zip(members, kept)], pa.float32()),
            "hamming": pa.array(
                [int(np.bitwise_count(hashes[i] ^ hashes[r])) for i, r in zip(members, kept)], pa.int8()
            ),
        }
    )
    return table, {kind: kinds.count(kind) for kind in KINDS}


Read = tuple[list[str], list[str], list[np.ndarray], list[np.ndarray]]  # keys, SHA-256s, DCT hashes, embeddings


def _read(store: Store, shards: list[int], prefix: str = "") -> Read:
    """The keys (each after `prefix`), hashes and image embeddings of the shards' embeddings files."""
    import pyarrow.parquet as pq

    keys: list[str] = []
    sha: list[str] = []
    hashes: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    for shard in shards:
        with store.fs.open(store.path(embeddings_file("metadata", shard)), "rb") as f:
            meta = pq.read_table(f, columns=["key", "image_sha256", "image_phash"])
        with store.fs.open(store.path(embeddings_file("img_emb", shard)), "rb") as f:
            embs.append(np.load(f))
        keys += [prefix + key for key in meta.column("key").to_pylist()]
        sha += meta.column("image_sha256").to_pylist()
        hashes.append(meta.column("image_phash").to_numpy())
    return keys, sha, hashes, embs


def _found(found: Read, settings: Dedup):
    keys, sha, hashes, embs = found
    dim = embs[0].shape[1] if embs else 0
    emb = np.concatenate(embs) if embs else np.zeros((0, dim), np.float16)
    return find(keys, sha, np.concatenate(hashes) if hashes else np.zeros(0, np.int64), emb, settings)


def _write(table, store: Store, name: str, counts: dict[str, int]) -> dict[str, int]:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.fs.pipe(store.path(name), buf.getvalue())
    return {**counts, "groups": len(set(table.column("kept").to_pylist()))}


def dedup_part(spec: PartSpec, shards: list[int], settings: Dedup) -> dict[str, int]:
    """Find the part's duplicates over its embeddings folder and write embeddings/duplicates.parquet;
    returns the count of each kind and of the groups."""
    store = Store(spec.output)
    table, counts = _found(_read(store, shards), settings)
    return _write(table, store, EMBEDDINGS_DUPLICATES, counts)


def dedup_parts(stores: list[Store], settings: Dedup, into: Store) -> dict[str, int]:
    """Duplicates across parts (a LaionDataset's, or any embedded outputs): `into`'s duplicates.parquet
    names each sample as `<part>/<key>`, the part by its place in `stores` (0, 1, …): a group keeps
    the sample of the first part that has one, then the smallest key."""
    import pyarrow as pa

    from ..contract import EMBEDDINGS_DIR

    digits = len(str(max(len(stores) - 1, 0)))
    found: Read = ([], [], [], [])
    for n, store in enumerate(stores):
        listed = store.fs.glob(store.path(EMBEDDINGS_DIR, "metadata", "metadata_*.parquet"))
        shards = sorted(int(path.rsplit("_", 1)[1].split(".")[0]) for path in listed)
        keys, sha, hashes, embs = _read(store, shards, f"{n:0{digits}d}/")
        found = (found[0] + keys, found[1] + sha, found[2] + hashes, found[3] + embs)
    table, counts = _found(found, settings)
    parts = [s.uri for s in stores]
    for name, column in (("part", "key"), ("keptPart", "kept")):
        keys = table.column(column).to_pylist()
        table = table.append_column(name, pa.array([parts[int(k.split("/")[0])] for k in keys], pa.string()))
    into.fs.makedirs(into.path(EMBEDDINGS_DIR), exist_ok=True)
    return _write(table, into, EMBEDDINGS_DUPLICATES, counts)
