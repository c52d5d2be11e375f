"""Dedup (pipeline/dedup.py): the DCT hash against exact, resized-and-recompressed and merely similar
copies of photo-like images (precision and recall printed), semantic groups as connected components,
the keep rule, and the part's duplicates.parquet written over an embeddings folder."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from laion_operator.pipeline.dedup import find, image_hashes
from laion_operator.spec import Dedup


def photo(seed: int, w: int = 160, h: int = 120) -> np.ndarray:
    """Smooth colour fields and noise at a few scales: photo-like content, different for every seed."""
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3))
    for cell, weight in ((40, 140), (10, 60)):
        base = rng.random((h // cell + 2, w // cell + 2, 3))
        image += np.asarray(Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)) / 255 * weight
    return np.clip(image + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg(array: np.ndarray, quality: int = 92, size: tuple[int, int] | None = None) -> bytes:
    image = Image.fromarray(array)
    if size:
        image = image.resize(size, Image.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def similar(array: np.ndarray, seed: int) -> np.ndarray:
    """The same scene with a third of it replaced (another subject in the frame): alike, not a copy."""
    other = photo(10_000 + seed)
    out = array.copy()
    out[:, : array.shape[1] // 3] = other[:, : array.shape[1] // 3]
    return out


def settings(**kw) -> Dedup:
    return Dedup(
        **{"exact": True, "perceptual": True, "hamming_distance": 6, "semantic": False, "similarity": 0.95, **kw}
    )


@pytest.fixture(scope="module")
def corpus():
    """40 photos, each with an exact copy, a resized-and-recompressed copy (60 %, quality 70) and a
    merely similar one: (keys, bytes, the key each true duplicate belongs to)."""
    keys, data, truth = [], [], {}
    for i in range(40):
        array = photo(i)
        original = jpeg(array)
        variants = {
            "a": original,
            "exact": original,
            "resized": jpeg(array, 70, (96, 72)),
            "similar": jpeg(similar(array, i)),
        }
        for kind, blob in variants.items():
            key = f"{i:03d}{kind}"
            keys.append(key)
            data.append(blob)
            if kind in ("exact", "resized"):
                truth[key] = f"{i:03d}a"
    return keys, data, truth


def scores(table, truth) -> tuple[float, float]:
    found = dict(zip(table.column("key").to_pylist(), table.column("kept").to_pylist()))
    right = sum(1 for key, kept in found.items() if truth.get(key) == kept)
    return right / max(len(found), 1), right / len(truth)


def test_exact_and_resized_copies_are_found_and_merely_similar_ones_are_not(corpus):
    keys, data, truth = corpus
    sha, hashes = zip(*(image_hashes(b) for b in data))
    emb = np.zeros((len(keys), 4), np.float16)
    print("\nhammingDistance  precision  recall  (40 photos: exact, resized-and-recompressed, merely similar)")
    results = {}
    for distance in (2, 4, 6, 8, 10, 12, 16):
        table, counts = find(list(keys), list(sha), np.array(hashes), emb, settings(hamming_distance=distance))
        results[distance] = scores(table, truth)
        print(f"{distance:>15}  {results[distance][0]:9.3f}  {results[distance][1]:6.3f}")
    precision, recall = results[6]  # the default
    assert recall == 1.0 and precision >= 0.95
    table, counts = find(list(keys), list(sha), np.array(hashes), emb, settings())
    kinds = dict(zip(table.column("key").to_pylist(), table.column("kind").to_pylist()))
    assert all(kinds[f"{i:03d}exact"] == "exact" for i in range(40))
    assert sum(kinds.get(f"{i:03d}resized") == "perceptual" for i in range(40)) == 40
    assert counts["exact"] == 40 and counts["semantic"] == 0
    # Exact alone: only the identical bytes.
    table, _ = find(list(keys), list(sha), np.array(hashes), emb, settings(perceptual=False))
    assert sorted(table.column("key").to_pylist()) == sorted(f"{i:03d}exact" for i in range(40))


def test_semantic_groups_are_connected_components_keeping_the_smallest_key():
    rng = np.random.default_rng(1)

    def unit(v):
        return v / np.linalg.norm(v)

    a = unit(rng.normal(size=64))
    step = unit(rng.normal(size=64))
    # a chain a - b - c: each link at cosine ≈ 0.97, a and c further apart, yet one group
    b, c = unit(a + 0.25 * step), unit(a + 0.5 * step)
    others = [unit(rng.normal(size=64)) for _ in range(5)]
    keys = ["k5", "k2", "k9", "k1", "k3", "k4", "k7", "k8"]
    emb = np.array([b, c, a, *others], np.float32).astype(np.float16)
    sha = [f"s{i}" for i in range(len(keys))]
    hashes = np.arange(len(keys), dtype=np.int64) * 0x0F0F0F0F0F0F0F  # far apart
    assert float(a @ c) < 0.95 < min(float(a @ b), float(b @ c))
    table, counts = find(keys, sha, hashes, emb, settings(perceptual=False, semantic=True))
    rows = {r["key"]: r for r in table.to_pylist()}
    # the group {k5, k2, k9} keeps its smallest key, k2; the others are alone
    assert set(rows) == {"k5", "k9"} and {r["kept"] for r in rows.values()} == {"k2"}
    assert all(r["kind"] == "semantic" for r in rows.values()) and counts["semantic"] == 2
    assert rows["k5"]["similarity"] == pytest.approx(float(b @ c), abs=2e-3)
    # Whatever order the samples come in, the same table.
    order = rng.permutation(len(keys))
    again, _ = find(
        [keys[i] for i in order],
        [sha[i] for i in order],
        hashes[order],
        emb[order],
        settings(perceptual=False, semantic=True),
    )
    assert again.equals(table)


def test_past_the_pairwise_limit_faiss_finds_the_same_groups(monkeypatch):
    """Above EXACT_UP_TO samples the pairs come from FAISS (a multi-index hash of the DCT hashes, an
    inverted file of the embeddings): on planted copies it finds what comparing every pair finds."""
    from laion_operator.pipeline import dedup

    rng = np.random.default_rng(7)
    n, copies = 3000, 300
    emb = rng.normal(size=(n, 64)).astype(np.float32)
    hashes = rng.integers(0, 1 << 62, n, dtype=np.int64)
    sources = rng.choice(n - copies, copies, replace=False)
    for i, src in enumerate(sources):  # the last `copies` rows: copies of earlier ones
        row = n - copies + i
        emb[row] = emb[src] + rng.normal(scale=0.02, size=64)
        flips = rng.choice(64, 4 + i % 5, replace=False)  # 4 to 8 bits: a threshold of 6 keeps some
        hashes[row] = hashes[src] ^ int(sum(1 << int(b) for b in flips) & ((1 << 63) - 1))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = [f"{i:06d}" for i in range(n)]
    sha = [f"s{i}" for i in range(n)]
    both = settings(perceptual=True, semantic=True)
    pairwise, counts = find(keys, sha, hashes, emb, both)
    monkeypatch.setattr(dedup, "EXACT_UP_TO", 100)
    indexed, indexed_counts = find(keys, sha, hashes, emb, both)
    assert counts["semantic"] + counts["perceptual"] >= copies - 5  # the copies, found either way
    assert indexed.select(["key", "kept"]).equals(pairwise.select(["key", "kept"]))
    assert indexed_counts == counts


# --- what the readers leave out (pipeline/selection.py) -------------------------------------------------


def embeddings_folder(root, rows: list[dict], duplicates: list[dict] | None) -> None:
    """An output's embeddings metadata (one shard) and, given, its duplicates.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laion_operator import contract

    (root / "embeddings" / "metadata").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / contract.embeddings_file("metadata", 0))
    if duplicates is not None:
        pq.write_table(pa.Table.from_pylist(duplicates), root / contract.EMBEDDINGS_DUPLICATES)


def test_a_selection_leaves_out_the_duplicates_and_what_misses_a_threshold(tmp_path):
    from laion_operator.pipeline.selection import load
    from tests.support.outputs import store_of

    rows = [
        {"key": "a", "clip_score": 0.30, "aesthetic": 6.0},
        {"key": "b", "clip_score": 0.10, "aesthetic": 6.0},  # under clip_score's min
        {"key": "c", "clip_score": 0.40, "aesthetic": 9.5},  # over aesthetic's max
        {"key": "d", "clip_score": None, "aesthetic": 6.0},  # no score
        {"key": "e", "clip_score": 0.35, "aesthetic": 5.0},  # a duplicate of a
    ]
    embeddings_folder(tmp_path, rows, [{"key": "e", "kept": "a", "kind": "perceptual"}])
    scores = {"clip_score": {"min": 0.2}, "aesthetic": {"max": 9}}
    selection = load(store_of(tmp_path), True, scores, "spec.latents")
    assert selection is not None
    why = {key: selection.why(key) for key in ("a", "b", "c", "d", "e", "f")}
    assert why["a"] is None
    assert why["b"] == ("score", "clip_score 0.1 is under spec.latents.scores.clip_score.min (0.2)")
    assert why["c"] == ("score", "aesthetic 9.5 is over spec.latents.scores.aesthetic.max (9)")
    assert why["d"] == ("score", "clip_score is null: no score for spec.latents.scores.clip_score")
    assert why["e"] == ("perceptual", "duplicate (perceptual) of a")
    assert why["f"][0] == "score" and "no row in the embeddings metadata" in why["f"][1]  # not embedded
    assert selection.counts == {"score": 4, "perceptual": 1}
    assert load(store_of(tmp_path), False, None, "spec.latents") is None  # nothing asked: nothing read
    # a shard task's: its own shard's metadata alone; a shard with none scores no sample
    own = load(store_of(tmp_path), False, scores, "spec.latents", shard=0)
    assert own is not None and [own.why(key) is None for key in "abcde"] == [True, False, False, False, True]
    other = load(store_of(tmp_path), False, scores, "spec.latents", shard=1)
    assert other is not None and other.why("a") is not None


def test_a_selection_of_what_is_not_there_names_the_field_and_the_file(tmp_path):
    from laion_operator.errors import InputError
    from laion_operator.pipeline.selection import load
    from tests.support.outputs import store_of

    embeddings_folder(tmp_path, [{"key": "a", "clip_score": 0.3}], None)
    store = store_of(tmp_path)
    with pytest.raises(
        InputError,
        match=r"spec.filter.scores.nsfw: .*/embeddings/metadata/metadata_00000.parquet "
        r"has no column 'nsfw' \(its columns: key, clip_score\)",
    ):
        load(store, False, {"nsfw": {"max": 0.5}}, "spec.filter")
    with pytest.raises(
        InputError, match=r"spec.filter.dropDuplicates: .*/embeddings/duplicates.parquet does not exist"
    ):
        load(store, True, None, "spec.filter")
    with pytest.raises(InputError, match=r"spec.filter.scores: .*/embeddings/metadata holds no metadata_\*.parquet"):
        load(store_of(tmp_path / "empty"), False, {"clip_score": {"min": 0}}, "spec.filter")
