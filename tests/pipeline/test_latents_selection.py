"""What the readers of an embedded output leave out (pipeline/selection.py): `convert` with
filter.dropDuplicates and filter.scores, the latents stage with latents.dropDuplicates and the latents
loader with scores, over one part embedded on the session's Ray and deduplicated at a threshold its
own embeddings set (so that duplicates exist); the left-out keys are exactly duplicates.parquet's and
the threshold's, counted by kind; a threshold on a column the metadata lacks names column and file.
`laion-operator verify` checks the embeddings folder and names a broken file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_operator import contract
from laion_operator.errors import InputError
from laion_operator.spec import PartSpec
from laion_operator.testbed.demo_data import write_metadata
from tests.support import outputs
from tests.support.specs import partspec

RESOLUTION = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.support.tiny_models import build, build_open_clip

    return build(tmp_path_factory.mktemp("vae")), build_open_clip(tmp_path_factory.mktemp("clip"))


DOWNLOAD = {"imageSize": 48, "resizeMode": "center_crop", "timeout": 2, "maxInFlight": 8}


def part(source, output, models, **latents) -> PartSpec:
    vae, clip = models
    section = {
        "vae": str(vae),
        "vaeSubfolder": "vae",
        "textEncoder": str(vae),
        "textEncoderSubfolder": "text_encoder",
        "tokenizerSubfolder": "tokenizer",
        "resolution": RESOLUTION,
        "batchSize": 4,
        **latents,
    }
    return partspec("S", source, output, samples_per_shard=12, download=DOWNLOAD, latents=section)


def embedded_keys(out: Path) -> tuple[list[str], np.ndarray, dict[str, float]]:
    """The embedded samples' keys, image embeddings and clip scores, over every shard."""
    keys, embs, scores = [], [], {}
    for path in sorted((out / contract.EMBEDDINGS_DIR / "metadata").glob("*.parquet")):
        rows = pq.read_table(path).to_pylist()
        keys += [r["key"] for r in rows]
        scores.update({r["key"]: r["clip_score"] for r in rows})
        embs.append(np.load(str(path).replace("metadata", "img_emb").replace(".parquet", ".npy")))
    return keys, np.concatenate(embs).astype(np.float32), scores


@pytest.fixture(scope="module")
def deduplicated(ray_driver, image_server, models, tmp_path_factory):
    """A part with embeddings, its duplicates found at the similarity its 6th closest pair has (a
    random model's embeddings are alike or not by chance: this makes some groups), and a clip_score
    threshold at the median: (output, the spec, duplicate key -> kind, the keys under the threshold)."""
    from laion_operator.pipeline.dedup import dedup_part
    from laion_operator.pipeline.driver import run_part
    from laion_operator.spec import Dedup

    source = tmp_path_factory.mktemp("meta") / "part.parquet"
    write_metadata(source, 30, image_server.base_url, seed=11, failure_mix={"ok": 0.9, "http_4xx": 0.1})
    out = tmp_path_factory.mktemp("selected") / "out"
    spec = partspec("S", source, out, samples_per_shard=12, download=DOWNLOAD, embeddings={"model": str(models[1])})
    run_part(spec)
    keys, emb, scores = embedded_keys(out)
    cosine = emb @ emb.T
    pairs = np.sort(cosine[np.triu_indices(len(keys), 1)])[::-1]
    settings = Dedup(exact=True, perceptual=False, hamming_distance=0, semantic=True, similarity=float(pairs[5]))
    dedup_part(spec, outputs.shards(out, "webdataset"), settings)
    table = pq.read_table(out / contract.EMBEDDINGS_DUPLICATES).to_pylist()
    duplicates = {r["key"]: r["kind"] for r in table}
    assert 0 < len(duplicates) < len(keys) // 2
    median = float(np.median(list(scores.values())))
    below = {k for k, v in scores.items() if v < median}
    return out, source, duplicates, median, below


def test_convert_leaves_out_exactly_the_duplicates_and_the_scores_below(deduplicated, tmp_path):
    from laion_operator.pipeline.driver import run_part

    out, _, duplicates, median, below = deduplicated
    spec = PartSpec.from_dict(
        {
            "partId": "c",
            "source": {"dataset": {"uri": str(out)}},
            "output": {"uri": str(tmp_path / "conv")},
            "download": {"outputFormat": "parquet", "resizeMode": "no", "skipReencode": True},
            "filter": {"dropDuplicates": True, "scores": {"clip_score": {"min": median}}},
        }
    )
    summary = run_part(spec)
    rows = outputs.metadata(tmp_path / "conv")
    kept = {r["source_key"] for r in rows if r["status"] == "success"}
    left = {r["source_key"]: r["error_message"] for r in rows if r["failure_reason"] == "filtered"}
    embedded = {s.key for s in outputs.images(out, "webdataset")}
    assert kept == embedded - set(duplicates) - below and set(left) == set(duplicates) | below
    for key, kind in duplicates.items():  # each names its kind and the sample kept in its place
        assert f"duplicate ({kind}) of " in left[key]
    for key in below - set(duplicates):
        assert (
            left[key].split(": ")[-1].startswith("clip_score ")
            and "is under spec.filter.scores.clip_score.min" in left[key]
        )
    assert summary["images"]["failedByReason"] == {"filtered": len(left)}
    kinds = {kind: list(duplicates.values()).count(kind) for kind in set(duplicates.values())}
    assert summary["images"]["leftOutBy"] == {**kinds, "score": len(below - set(duplicates))}


def test_a_threshold_on_a_missing_column_names_the_column_and_the_file(deduplicated, tmp_path):
    from laion_operator.pipeline.selection import of_dataset

    out, *_ = deduplicated
    spec = PartSpec.from_dict(
        {
            "partId": "c",
            "source": {"dataset": {"uri": str(out)}},
            "output": {"uri": str(tmp_path / "conv")},
            "filter": {"scores": {"aesthetic": {"min": 5}}},
        }
    )
    with pytest.raises(InputError, match=r"spec.filter.scores.aesthetic: .*metadata_00000.parquet has no column"):
        of_dataset(spec)
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / contract.EMBEDDINGS_DUPLICATES).unlink()
    no_dups = PartSpec.from_dict({**spec.to_dict(), "source": {"dataset": {"uri": str(bare)}}, "filter": {}})
    no_dups = PartSpec.from_dict({**no_dups.to_dict(), "filter": {"dropDuplicates": True}})
    with pytest.raises(InputError, match=r"spec.filter.dropDuplicates: .*duplicates.parquet does not exist"):
        of_dataset(no_dups)


def test_latents_and_the_loader_leave_out_the_duplicates_and_the_scores(deduplicated, models, tmp_path):
    from laion_operator.latents_loader import LatentsDataset
    from laion_operator.pipeline.driver import encode_part

    out, source, duplicates, median, below = deduplicated
    copy = tmp_path / "latents"
    shutil.copytree(out, copy)
    summary = encode_part(part(source, copy, models, dropDuplicates=True))
    embedded = {s.key for s in outputs.images(out, "webdataset")}
    kinds = {kind: list(duplicates.values()).count(kind) for kind in set(duplicates.values())}
    assert summary["latents"]["dropped"] == kinds
    assert summary["latents"]["samples"] == len(embedded) - len(duplicates)
    dataset = LatentsDataset(str(copy), scores={"clip_score": {"min": median}}, batch_size=4)
    read = [sample["key"] for sample in dataset]
    assert sorted(read) == sorted(embedded - set(duplicates) - below)
    assert dataset.dropped == {"score": len(below - set(duplicates))}
    with pytest.raises(InputError, match=r"build_latents_dataloader.scores.nsfw: .*metadata_00000.parquet"):
        LatentsDataset(str(copy), scores={"nsfw": {"max": 0.5}})


def test_verify_checks_the_embeddings_folder_and_names_a_broken_file(deduplicated, tmp_path):
    from laion_operator.pipeline.verify import verify_output

    out, *_ = deduplicated
    copy = tmp_path / "verified"
    shutil.copytree(out, copy)
    listed = copy / "part_S_stats.csv"  # the annotations name the shards by their URL
    listed.write_text(listed.read_text().replace(str(out), str(copy)))
    store = outputs.store_of(copy)
    _, result = verify_output(store)
    assert result.ok, result.problems
    text = copy / contract.embeddings_file("text_emb", 1)
    whole = np.load(text)
    np.save(text, whole[:-1])  # a row short
    _, result = verify_output(store)
    assert not result.ok and any(p.startswith(contract.embeddings_file("text_emb", 1)) for p in result.problems)
    np.save(text, whole)
    meta = copy / contract.embeddings_file("metadata", 0)
    table = pq.read_table(meta)
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), meta)  # rows out of the shard's order
    _, result = verify_output(store)
    assert any(p.startswith(f"{contract.embeddings_file('metadata', 0)}: its keys are not") for p in result.problems)
    pq.write_table(table, meta)
    dups = pq.read_table(copy / contract.EMBEDDINGS_DUPLICATES).to_pydict()
    dups["kept"][0] = "99999999"
    pq.write_table(pa.Table.from_pydict(dups), copy / contract.EMBEDDINGS_DUPLICATES)
    _, result = verify_output(store)
    assert result.problems == [
        f"{contract.EMBEDDINGS_DUPLICATES}: key '99999999' is no embedded sample ({len(dups['key'])} rows)"
    ]


def test_converts_flags_are_the_filters_fields():
    from laion_operator import cli

    args = cli.parser().parse_args(
        ["convert", "in", "out", "--output-format", "parquet", "--drop-duplicates"]
        + ["--min-score", "clip_score=0.28", "--max-score", "clip_score=0.9", "--min-score", "aesthetic=5"]
    )
    assert cli._selection(args) == {
        "dropDuplicates": True,
        "scores": {"clip_score": {"min": 0.28, "max": 0.9}, "aesthetic": {"min": 5.0}},
    }
    plain = cli.parser().parse_args(["convert", "in", "out", "--output-format", "parquet"])
    assert cli._selection(plain) == {}  # unset: the part's fingerprint stays what it was
    bad = cli.parser().parse_args(["convert", "in", "out", "--output-format", "parquet", "--min-score", "0.3"])
    with pytest.raises(InputError, match=r"--min-score '0.3': expected COLUMN=NUMBER"):
        cli._selection(bad)


def test_a_datasets_own_duplicates_stand_for_its_parts(deduplicated, models, tmp_path):
    """`laion-operator dedup ROOT/part_0 ROOT/part_1 --into ROOT`: the loader over the LaionDataset's
    root leaves out what the dataset-wide file lists, per part: here every sample of part 1, a copy of
    part 0, and none of part 0's (its own file's semantic duplicates are not the dataset's)."""
    import asyncio

    from laion_operator.control.datasets import Dataset
    from laion_operator.latents_loader import LatentsDataset
    from laion_operator.pipeline.dedup import dedup_parts
    from laion_operator.pipeline.driver import encode_part
    from laion_operator.spec import Dedup, validate_dataset

    out, source, *_ = deduplicated
    root = tmp_path / "dataset"
    full = tmp_path / "full"
    shutil.copytree(out, full)
    encode_part(part(source, full, models))  # the latents of every sample
    latents = part(source, out, models).to_dict()["latents"]
    data = validate_dataset(
        {"source": {"urls": ["a.parquet", "b.parquet"]}, "template": {"output": {"uri": str(root)}, "latents": latents}}
    )
    parts = []
    for part_id in ("0", "1"):
        shutil.copytree(full, root / contract.part_dir(part_id))
        parts.append(
            {"metadata": {"name": f"d-{part_id}"}, "spec": {"partId": part_id}, "status": {"phase": "Succeeded"}}
        )
    asyncio.run(Dataset(None, {"metadata": {"namespace": "ns", "name": "d"}}, None).write_index(data, parts))
    exact = Dedup(exact=True, perceptual=False, hamming_distance=0, semantic=False, similarity=1.0)
    stores = [outputs.store_of(root / contract.part_dir(p)) for p in ("0", "1")]
    counts = dedup_parts(stores, exact, outputs.store_of(root))
    embedded = {s.key for s in outputs.images(out, "webdataset")}
    assert counts["exact"] == len(embedded)
    dataset = LatentsDataset(str(root), drop_duplicates=True, batch_size=4)
    read = [(sample["stream"], sample["key"]) for sample in dataset]
    assert sorted(read) == sorted((0, key) for key in embedded)
    assert dataset.dropped == {"exact": len(embedded)}
