"""The embeddings stage: tiny random CLIP models (open_clip's and transformers') saved to disk and loaded
as real ones are, their embeddings checked against the libraries' own preprocessing and forward pass,
a downloaded part embedded on the session's Ray in clip-retrieval's layout, read back by
embedding-reader, resumed byte for byte, in every output format; bad input naming its field."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from laion_operator import contract
from laion_operator.errors import InputError
from laion_operator.spec import PartSpec, SpecError
from laion_operator.testbed.demo_data import write_metadata
from tests.support import outputs
from tests.support.specs import partspec
from tests.support.tiny_models import CLIP_EMBED_DIM, CLIP_IMAGE_SIZE

MIX = {"ok": 0.85, "http_4xx": 0.15}
FILES = ("img_emb", "text_emb", "metadata")


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    from tests.support.tiny_models import build_open_clip

    return build_open_clip(tmp_path_factory.mktemp("open-clip"))


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    from tests.support.tiny_models import build_hf_clip

    return build_hf_clip(tmp_path_factory.mktemp("hf-clip"))


def part(source, output, model, fmt="webdataset", **embeddings) -> PartSpec:
    download = {"imageSize": 48, "resizeMode": "center_crop", "timeout": 2, "maxInFlight": 8, "outputFormat": fmt}
    section = {"model": str(model), "batchSize": 4, **embeddings}
    return partspec("E", source, output, samples_per_shard=12, download=download, embeddings=section)


def pictures(n, seed=0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        size = (40 + 8 * i, 36 + 4 * (i % 3))  # portrait and landscape: the crop and resize are checked
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def ours(spec_model: str, images: list[bytes], captions: list[str]):
    """The stage's embeddings of images and captions, as a shard task computes them."""
    from laion_operator.pipeline.embeddings import Embedder
    from laion_operator.pipeline.encoding import Batch
    from laion_operator.pipeline.models import load_clip

    clip = load_clip(part("s", "/tmp/o", spec_model).embeddings)
    batch = Batch()
    from laion_operator.pipeline.encoding import preprocess

    for i, (data, caption) in enumerate(zip(images, captions)):
        batch.add(f"k{i}", caption, data, {clip.size: preprocess(data, clip.size)})
    _, image, text, _, _ = Embedder(clip).launch(batch.seal())
    return image.numpy(), text.numpy()


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


CAPTIONS = ["the cat on the mat", "", "a very long caption " * 30, "ünïcödé caption"]


# --- spec -------------------------------------------------------------------------------------------


def test_embeddings_settings_are_validated_naming_the_field(open_clip_dir):
    spec = part("s.parquet", "/tmp/o", open_clip_dir, dedup={"similarity": 0.9})
    assert spec.embeddings.batch_size == 4 and spec.embeddings.dtype == "auto"
    assert spec.embeddings.dedup.similarity == 0.9 and spec.embeddings.dedup.hamming_distance == 6
    assert PartSpec.from_dict(spec.to_dict()) == spec
    assert part("s", "/tmp/o", open_clip_dir).embeddings.dedup is None
    with pytest.raises(SpecError, match=r"spec\.embeddings\.model: required field is missing"):
        PartSpec.from_dict({"partId": "E", "source": {"urls": ["s"]}, "output": {"uri": "/o"}, "embeddings": {}})
    with pytest.raises(SpecError, match=r"spec\.embeddings\.dedup\.similarity"):
        part("s", "/tmp/o", open_clip_dir, dedup={"similarity": 1.5})
    with pytest.raises(SpecError, match=r"spec\.embeddings\.batchSize"):
        part("s", "/tmp/o", open_clip_dir, batchSize=0)


# --- models -----------------------------------------------------------------------------------------


def test_open_clip_embeddings_are_the_librarys_own(open_clip_dir):
    """The stage's decode, crop, normalisation and towers against open_clip's own preprocess transform
    (on the PIL image), tokenizer and encode_image/encode_text, for a local folder and `local-dir:`."""
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")
    images = pictures(4)
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images])
        want_image = unit(model.encode_image(pixels).numpy())
        want_text = unit(model.encode_text(tokenizer(CAPTIONS)).numpy())
    for name in (str(open_clip_dir), f"local-dir:{open_clip_dir}", f"open_clip:local-dir:{open_clip_dir}"):
        image, text = ours(name, images, CAPTIONS)
        assert image.dtype == np.float16 and image.shape == (4, CLIP_EMBED_DIM)
        np.testing.assert_allclose(np.linalg.norm(image.astype(np.float64), axis=1), 1.0, atol=2e-3)
        np.testing.assert_allclose(image, want_image, atol=3e-3)
        np.testing.assert_allclose(text, want_text, atol=3e-3)


def test_transformers_clip_embeddings_are_the_librarys_own(hf_clip_dir):
    """transformers' CLIPModel: its forward pass on the stage's pixels exactly, normalised with its
    CLIPImageProcessor's mean and std; the processor's own resize rounds otherwise, within a cosine
    of 0.99 on these noise images; its tokenizer's captions exactly."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from laion_operator.pipeline.encoding import preprocess, to_uint8

    model = CLIPModel.from_pretrained(str(hf_clip_dir)).eval()
    processor = CLIPImageProcessor.from_pretrained(str(hf_clip_dir))
    tokenizer = CLIPTokenizer.from_pretrained(str(hf_clip_dir))
    images = pictures(4, seed=3)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (processor.image_mean, processor.image_std))
    with torch.no_grad():
        uint8 = to_uint8([preprocess(b, CLIP_IMAGE_SIZE) for b in images])
        want_image = unit(model.get_image_features(pixel_values=(uint8 / 255.0 - mean) / std).numpy())
        theirs = processor([Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")
        processed = unit(model.get_image_features(**theirs).numpy())
        tokens = tokenizer(CAPTIONS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        want_text = unit(model.get_text_features(**tokens).numpy())
    image, text = ours(str(hf_clip_dir), images, CAPTIONS)
    assert image.shape == text.shape == (4, CLIP_EMBED_DIM)
    np.testing.assert_allclose(image, want_image, atol=3e-3)
    np.testing.assert_allclose(text, want_text, atol=3e-3)
    assert (np.sum(image.astype(np.float64) * processed, axis=1) > 0.99).all()


def test_a_model_that_cannot_load_names_the_field(tmp_path):
    from laion_operator.pipeline import models
    from tests.support.tiny_models import build_open_clip

    for name in (str(tmp_path / "missing"), "laion-operator-tests/no-such-clip", "hf-hub:laion-operator-tests/none"):
        settings = part("s", "/tmp/o", name).embeddings
        models.go_offline(settings)  # a hub id is looked up in the local cache only
        with pytest.raises(models.ModelError, match=r"spec\.embeddings\.model: cannot load"):
            (models.OpenClip if models.is_open_clip(name) else models.TransformersClip)(settings, "cpu")
    squash = build_open_clip(tmp_path / "squash", resize_mode="squash")
    with pytest.raises(models.ModelError, match=r"spec\.embeddings\.model: .* prepares images as squash"):
        models.OpenClip(part("s", "/tmp/o", squash).embeddings, "cpu")


def test_embeddings_progress_shows_in_the_status_and_the_metrics():
    from prometheus_client import generate_latest

    from laion_operator.contract import Progress
    from laion_operator.control.metrics import Metrics
    from laion_operator.control.status import STATUS_SCHEMA, cr_status
    from laion_operator.pipeline.stages.encoding import Counts

    counts = Counts(shards_total=3, shards_done=1, written=17, skipped=1, per_second=8.5)
    progress = Progress(part_id="p", phase="Embedding", shards_total=3, shards_done=3, embeddings=counts.status())
    status = cr_status(progress)
    assert status["embeddings"] == {
        "shards": {"total": 3, "done": 1, "failed": 0},
        "written": 17,
        "skipped": 1,
        "perSecond": 8.5,
    }
    assert set(status["embeddings"]) == set(STATUS_SCHEMA["properties"]["embeddings"]["properties"])
    assert "embeddings" not in cr_status(Progress(part_id="q", shards_total=2))
    assert Progress.from_json(json.loads(json.dumps(progress.to_json()))).embeddings == counts.status()
    metrics = Metrics()
    metrics.observe_part("ns", "p", "Embedding", progress)
    text = generate_latest(metrics.registry).decode()
    assert 'laion_part_embeddings_total{namespace="ns",part="p"} 17.0' in text
    assert 'laion_part_embeddings_per_second{namespace="ns",part="p"} 8.5' in text
    assert 'laion_part_embeddings_shards{namespace="ns",part="p",state="done"} 1.0' in text
    assert 'laion_part_phase{namespace="ns",part="p",phase="Embedding"} 1.0' in text


# --- the stage on Ray -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("meta") / "part.parquet"
    write_metadata(path, 30, image_server.base_url, seed=7, failure_mix=MIX)
    return path


def aesthetic_mlp(path: Path, width: int = CLIP_EMBED_DIM, seed: int = 0) -> Path:
    """A head shaped as LAION's aesthetic predictor's MLP (Linear, Dropout, … under `layers`, no
    activation), smaller, saved as its weights are: a torch state dict."""
    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(width, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 8), torch.nn.Linear(8, 1)
            )

    torch.manual_seed(seed)
    torch.save(MLP().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def embedded(ray_driver, source, open_clip_dir, tmp_path_factory):
    from laion_operator.pipeline.driver import run_part

    out = tmp_path_factory.mktemp("embedded") / "out"
    head = aesthetic_mlp(out.parent / "aesthetic.pth")
    heads = [{"name": "aesthetic", "file": str(head)}]
    summary = run_part(part(source, out, open_clip_dir, dedup={}, index=True, indexMemory="64M", heads=heads))
    return out, summary


def read_layout(out: Path) -> dict[int, tuple[np.ndarray, np.ndarray, list[dict]]]:
    folder = out / contract.EMBEDDINGS_DIR
    found = {}
    for path in sorted((folder / "img_emb").iterdir()):
        shard = int(path.stem.rsplit("_", 1)[1])
        found[shard] = (
            np.load(path),
            np.load(out / contract.embeddings_file("text_emb", shard)),
            pq.read_table(out / contract.embeddings_file("metadata", shard)).to_pylist(),
        )
    return found


def test_a_part_ends_with_every_images_embeddings_in_clip_retrievals_layout(embedded, open_clip_dir):
    out, summary = embedded
    ok, shards = summary["images"]["ok"], summary["shards"]["total"]
    assert ok > 12 and shards >= 2
    section = summary["embeddings"]
    assert section["samples"] == ok and section["shards"] == shards and section["skipped"] == 0
    assert section["dim"] == CLIP_EMBED_DIM and section["model"] == str(open_clip_dir)
    assert json.loads((out / "part_E_summary.json").read_text())["embeddings"] == section
    progress = json.loads((out / contract.PROGRESS).read_text())
    assert progress["phase"] == "Succeeded" and progress["embeddings"]["written"] == ok
    assert progress["embeddings"]["shards"] == {"total": shards, "done": shards, "failed": 0}

    layout = read_layout(out)
    assert sorted(layout) == list(range(shards))
    downloaded = {s.key: s for s in outputs.images(out, "webdataset")}
    rows = {row["key"]: row for row in outputs.metadata(out)}
    keys = []
    for shard, (image, text, meta) in layout.items():
        assert image.dtype == text.dtype == np.float16 and image.shape == text.shape == (len(meta), CLIP_EMBED_DIM)
        for row in meta:
            assert list(row)[:6] == ["key", "url", "caption", "shard", "image_sha256", "image_phash"]
            assert row["shard"] == shard and row["url"] == rows[row["key"]]["url"]
            assert row["caption"] == downloaded[row["key"]].caption and "status" not in row
            assert row["width"] == rows[row["key"]]["width"]  # the part's metadata columns follow
            assert -1.0 <= row["clip_score"] <= 1.0 and isinstance(row["aesthetic"], float)
        keys += [row["key"] for row in meta]
        # Row i of the metadata is row i of both arrays: the same embeddings again from its image.
        again_image, again_text = ours(
            str(open_clip_dir), [downloaded[r["key"]].image for r in meta], [r["caption"] for r in meta]
        )
        np.testing.assert_allclose(image.astype(np.float32), again_image.astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(text.astype(np.float32), again_text.astype(np.float32), atol=2e-3)
        # clip_score: the image-caption cosine, of the embeddings before they are stored as float16
        clip_score = np.array([r["clip_score"] for r in meta])
        stored = np.einsum("ij,ij->i", image.astype(np.float64), text.astype(np.float64))
        np.testing.assert_allclose(clip_score, stored, atol=2e-3)
    assert sorted(keys) == sorted(downloaded)  # each downloaded image exactly once
    # dedup over the folder: the image server serves each URL's own picture, so no copy but by chance
    table = pq.read_table(out / contract.EMBEDDINGS_DUPLICATES)
    assert table.column_names == ["key", "kept", "kind", "similarity", "hamming"]
    assert section["duplicates"] == {
        **{kind: table.column("kind").to_pylist().count(kind) for kind in ("exact", "perceptual", "semantic")},
        "groups": len(set(table.column("kept").to_pylist())),
    }
    assert set(table.column("key").to_pylist()) <= set(keys) and not set(table.column("key").to_pylist()) & set(
        table.column("kept").to_pylist()
    )


def test_embedding_reader_reads_the_folder_as_clip_retrievals(embedded):
    """clip-retrieval's own reader (what autofaiss reads with) pairs each embedding with its metadata row."""
    from embedding_reader import EmbeddingReader

    out, summary = embedded
    folder = out / contract.EMBEDDINGS_DIR
    layout = read_layout(out)
    want = {row["key"]: image[i] for image, _, meta in layout.values() for i, row in enumerate(meta)}
    reader = EmbeddingReader(
        str(folder / "img_emb"),
        file_format="parquet_npy",
        metadata_folder=str(folder / "metadata"),
        meta_columns=["key", "url", "caption"],
    )
    assert reader.count == summary["images"]["ok"] and reader.dimension == CLIP_EMBED_DIM
    seen = 0
    for embeddings, meta in reader(batch_size=7, start=0, end=reader.count):
        for vector, key in zip(embeddings, meta["key"]):
            np.testing.assert_array_equal(vector, want[key])
            seen += 1
    assert seen == reader.count


def test_embeddings_resume_per_shard_byte_for_byte(embedded, open_clip_dir):
    """A shard cut short (its stats missing, its array half written) is embedded again whole: the folder
    ends byte-identical to the uninterrupted run's, the finished shard not redone."""
    from laion_operator.pipeline.driver import embed_part

    out, summary = embedded
    copy = out.parent / "resumed"
    shutil.copytree(out, copy)
    kept = (copy / contract.embeddings_stats(0)).read_text()
    (copy / contract.embeddings_stats(1)).unlink()
    half = copy / contract.embeddings_file("img_emb", 1)
    half.write_bytes(half.read_bytes()[: len(half.read_bytes()) // 2])
    (copy / contract.embeddings_file("metadata", 1)).unlink()
    heads = [{"name": "aesthetic", "file": str(out.parent / "aesthetic.pth")}]
    resumed = embed_part(part("unused.parquet", copy, open_clip_dir, dedup={}, heads=heads))  # the copy's index stays
    assert (copy / contract.embeddings_stats(0)).read_text() == kept
    assert resumed["embeddings"]["samples"] == summary["images"]["ok"]
    for shard in range(summary["shards"]["total"]):
        for kind in FILES:
            name = contract.embeddings_file(kind, shard)
            assert (copy / name).read_bytes() == (out / name).read_bytes(), name
    dups = contract.EMBEDDINGS_DUPLICATES
    assert pq.read_table(copy / dups).equals(pq.read_table(out / dups))


@pytest.mark.parametrize("fmt", ["parquet", "files", "tfrecord", "mds"])
def test_every_output_format_gives_the_same_embeddings(ray_driver, source, open_clip_dir, embedded, tmp_path, fmt):
    from laion_operator.pipeline.driver import embed_part, run_part

    out, _ = embedded
    reference = {row["key"]: image[i] for image, _, meta in read_layout(out).values() for i, row in enumerate(meta)}
    spec = part(source, tmp_path / fmt, open_clip_dir, fmt=fmt)
    downloaded = run_part(PartSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "embeddings"}))
    summary = embed_part(spec)  # `laion-operator embed` over a finished output
    assert summary["embeddings"]["samples"] == downloaded["images"]["ok"] == len(reference)
    for image, _, meta in read_layout(tmp_path / fmt).values():
        for i, row in enumerate(meta):
            # The same image, in a batch made up by the order its shard's downloads finished in.
            np.testing.assert_allclose(image[i].astype(np.float32), reference[row["key"]].astype(np.float32), atol=2e-3)


def test_an_output_without_images_fails_naming_the_field(ray_driver, image_server, open_clip_dir, tmp_path):
    from laion_operator.pipeline.driver import embed_part, run_part

    meta = tmp_path / "all-404.parquet"
    write_metadata(meta, 6, image_server.base_url, seed=2, failure_mix={"http_4xx": 1.0})
    spec = part(meta, tmp_path / "out", open_clip_dir)
    with pytest.raises(InputError, match=r"spec\.embeddings: output .* holds no image to embed \(0 samples"):
        run_part(spec)
    assert json.loads((tmp_path / "out" / contract.PROGRESS).read_text())["phase"] == "Failed"
    with pytest.raises(InputError, match=r"output .*nothing.* holds no finished shard"):
        embed_part(part(meta, tmp_path / "nothing", open_clip_dir))


def test_a_model_that_cannot_load_fails_the_part_as_bad_input(embedded, tmp_path):
    from laion_operator.pipeline.driver import embed_part

    out, _ = embedded
    copy = tmp_path / "bad"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(contract.EMBEDDINGS_DIR))
    with pytest.raises(InputError, match=r"spec\.embeddings\.model: cannot load .*no-such-model"):
        embed_part(part("unused.parquet", copy, tmp_path / "no-such-model"))
    assert json.loads((copy / contract.PROGRESS).read_text())["phase"] == "Failed"


# --- the index and search ---------------------------------------------------------------------------


def test_autofaiss_indexes_the_folder_and_search_finds_each_sample(embedded, capsys):
    """embeddings.index: autofaiss over the folder as clip-retrieval's index step runs it; an index id is
    the row of the metadata files read in name order (ids.parquet), so every sample finds itself."""
    import faiss

    from laion_operator import cli
    from laion_operator.pipeline.index import search
    from tests.support.outputs import store_of

    out, summary = embedded
    folder = out / contract.EMBEDDINGS_INDEX
    assert summary["embeddings"]["index"].endswith(contract.EMBEDDINGS_INDEX)
    info = json.loads((folder / "index.json").read_text())
    assert info["count"] == summary["images"]["ok"] and set(info["indexes"]) == {"image", "text"}
    ids = pq.read_table(folder / "ids.parquet").to_pylist()
    rows = [(row, image[i], text[i]) for image, text, meta in read_layout(out).values() for i, row in enumerate(meta)]
    assert [r["key"] for r in ids] == [row["key"] for row, _, _ in rows] and [r["id"] for r in ids] == list(
        range(len(ids))
    )
    for tower, column in (("image", 1), ("text", 2)):
        index = faiss.read_index(str(folder / f"{tower}.index"))
        vectors = np.array([r[column] for r in rows], np.float32)
        scores, found = index.search(vectors, 1)
        # the nearest vector is the sample's own (or one exactly as near: the tiny model's near-twins)
        assert (scores[:, 0] >= np.einsum("ij,ij->i", vectors, vectors) - 1e-3).all()
        assert (found[:, 0] == np.arange(len(rows))).mean() > 0.9

    store = store_of(out)
    downloaded = {s.key: s for s in outputs.images(out, "webdataset")}
    row = ids[3]
    hits = search(store, text=row["caption"], k=3, against="text")
    assert hits[0].similarity == pytest.approx(1.0, abs=2e-3) and row["key"] in [
        h.key for h in hits if h.similarity > 0.998
    ]
    hits = search(store, image=downloaded[row["key"]].image, k=5)
    assert len(hits) == 5 and row["key"] in [h.key for h in hits if h.similarity > 0.998]
    assert hits[0].url == ids[hits[0].id]["url"] and hits[0].caption == ids[hits[0].id]["caption"]

    assert cli.main(["search", str(out), "--text", row["caption"], "-k", "2", "--against", "text"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and any(row["key"] in line for line in lines)
    with pytest.raises(InputError, match="give a text or an image"):
        search(store, k=1)


def test_index_command_rebuilds_within_its_budget_and_refuses_an_output_without_embeddings(embedded, tmp_path):
    from laion_operator import cli

    out, summary = embedded
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("index"))
    assert cli.main(["index", str(copy), "--memory", "32M"]) == 0
    info = json.loads((copy / contract.EMBEDDINGS_INDEX / "index.json").read_text())
    assert info["memory"] == "32M" and info["count"] == summary["images"]["ok"]
    assert cli.main(["index", str(tmp_path / "empty"), "--model", "x"]) == contract.ExitCode.BAD_INPUT


def test_heads_score_the_image_embedding_and_a_head_of_another_width_is_refused(open_clip_dir, tmp_path):
    """embeddings.heads: a LAION-aesthetic-shaped MLP over the (unit) image embedding, as torch computes
    it with the same weights; clip_score the image-caption cosine; a head of another width, named."""
    import torch

    from laion_operator.pipeline import models
    from laion_operator.pipeline.embeddings import Embedder, heads
    from laion_operator.pipeline.encoding import Batch, preprocess

    head = aesthetic_mlp(tmp_path / "aesthetic.pth")
    settings = part("s", "/tmp/o", open_clip_dir, heads=[{"name": "aesthetic", "file": str(head)}]).embeddings
    clip = models.load_clip(settings)
    batch = Batch()
    for i, data in enumerate(pictures(3)):
        batch.add(f"k{i}", CAPTIONS[i], data, {clip.size: preprocess(data, clip.size)})
    _, image, text, scores, _ = Embedder(clip, heads(settings, clip)).launch(batch.seal())
    state = torch.load(head, weights_only=True)
    with torch.no_grad():
        unit_images = torch.nn.functional.normalize(clip.images(batch.pixels[clip.size]).float(), dim=-1)
        x = unit_images
        for n in (0, 2, 3):  # Dropout is the identity at inference
            x = x @ state[f"layers.{n}.weight"].T + state[f"layers.{n}.bias"]
    np.testing.assert_allclose(scores["aesthetic"].numpy(), x[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    cosine = (unit_images * torch.nn.functional.normalize(clip.texts(CAPTIONS[:3]).float(), dim=-1)).sum(-1)
    np.testing.assert_allclose(scores["clip_score"].numpy(), cosine.numpy(), atol=1e-5)

    wrong = aesthetic_mlp(tmp_path / "wide.pth", width=768)
    settings = part(
        "s", "/tmp/o", open_clip_dir, heads=[{"name": "a", "file": str(head)}, {"name": "b", "file": str(wrong)}]
    )
    with pytest.raises(models.ModelError, match=r"spec\.embeddings\.heads\.1\.file: .* not a head over 16-wide"):
        heads(settings.embeddings, clip)
    settings = part("s", "/tmp/o", open_clip_dir, heads=[{"name": "a", "file": str(tmp_path / "none.pth")}])
    with pytest.raises(models.ModelError, match=r"spec\.embeddings\.heads\.0\.file: cannot load"):
        heads(settings.embeddings, clip)
    with pytest.raises(SpecError, match=r"spec\.embeddings\.heads\.0\.name"):
        part("s", "/tmp/o", open_clip_dir, heads=[{"name": "Bad Name", "file": "x"}])


def test_the_progress_line_and_the_summary_show_the_stage():
    from laion_operator.contract import Progress
    from laion_operator.pipeline.local import ProgressBar, print_summary
    from laion_operator.pipeline.stages.encoding import Counts
    from laion_operator.summary import EmbeddingsSummary, Summary

    stream = io.StringIO()
    counts = Counts(shards_total=8, shards_done=3, shards_failed=1, written=1204, per_second=95.1)
    ProgressBar(stream)(Progress(part_id="p", phase="Embedding", embeddings=counts.status()))
    assert stream.getvalue() == "[embeddings] shards 3/8 (1 failed) | 1,204 samples, 95.1/s\n"
    stream = io.StringIO()  # the latents stage's line, from the same counts in its own field
    ProgressBar(stream)(Progress(part_id="p", phase="Encoding", latents=counts.status()))
    ProgressBar(stream)(Progress(part_id="p", phase="Encoding"))  # nothing counted yet: no line
    assert stream.getvalue() == "[latents] shards 3/8 (1 failed) | 1,204 samples, 95.1/s\n"
    section = EmbeddingsSummary(
        folder="/o/embeddings", model="hf-hub:x", samples=1204, dim=512, devices=["cuda"], index="/o/embeddings/index"
    )
    section.duplicates = {"exact": 2, "perceptual": 1, "semantic": 0, "groups": 3}
    out = io.StringIO()
    print_summary(Summary("p", "/o", embeddings=section), out)
    text = out.getvalue()
    assert "embedded  1,204 samples" in text and "512 wide, hf-hub:x" in text
    assert "duplicates: 2 exact, 1 perceptual, 0 semantic, 3 groups" in text and "/o/embeddings/index" in text


def test_a_shard_task_killed_midway_is_redone_byte_for_byte(embedded, open_clip_dir):
    """A process killed in the middle of a shard (after its first batch, its old files already gone):
    the part embedded again ends with the same bytes as the run never killed."""
    import subprocess
    import sys

    from laion_operator.pipeline.driver import embed_part

    out, summary = embedded
    copy = out.parent / "killed"
    shutil.copytree(out, copy)
    heads = [{"name": "aesthetic", "file": str(out.parent / "aesthetic.pth")}]
    spec = part("unused.parquet", copy, open_clip_dir, dedup={}, heads=heads)
    code = (
        "import json, os, sys\n"
        "from laion_operator.spec import PartSpec\n"
        "from laion_operator.pipeline.embeddings import embed_shard\n"
        "spec = PartSpec.from_dict(json.loads(sys.argv[1]))\n"
        "embed_shard(spec, 1, report=lambda stats: os._exit(137), report_every=0)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code, json.dumps(spec.to_dict())], timeout=300)
    assert killed.returncode == 137 and not (copy / contract.embeddings_stats(1)).exists()
    assert embed_part(spec)["embeddings"]["samples"] == summary["images"]["ok"]
    for shard in range(summary["shards"]["total"]):
        for kind in FILES:
            name = contract.embeddings_file(kind, shard)
            assert (copy / name).read_bytes() == (out / name).read_bytes(), name


def test_the_model_loads_once_a_worker_not_once_a_shard(ray_driver, source, open_clip_dir, tmp_path):
    """Eight shards one at a time on the session's 2-CPU cluster: a worker process keeps the model
    for its next shard (models.cached), so at most one load a worker, and most shards load nothing."""
    from laion_operator.pipeline.driver import run_part

    out = tmp_path / "out"
    spec = part(source, out, open_clip_dir, parallelism=1)
    spec = PartSpec.from_dict({**spec.to_dict(), "filter": {**spec.to_dict()["filter"], "samplesPerShard": 4}})
    summary = run_part(spec)
    stats = [json.loads((out / contract.embeddings_stats(s)).read_text()) for s in range(summary["shards"]["total"])]
    loads = [s["shard"] for s in stats if s["model_seconds"] > 0]
    assert len(stats) >= 7 and len(loads) <= 2, loads  # 2: the cluster's CPUs, its workers at once


def test_another_model_embeds_every_shard_again(embedded, tmp_path):
    """Finished shards are resumed only when the same model and heads made them."""
    from laion_operator.pipeline.driver import embed_part
    from tests.support.tiny_models import build_open_clip

    out, summary = embedded
    copy = tmp_path / "other-model"
    shutil.copytree(out, copy)
    other = build_open_clip(tmp_path / "other-clip", seed=1)
    assert embed_part(part("unused.parquet", copy, other))["embeddings"]["model"] == str(other)
    for shard in range(summary["shards"]["total"]):
        assert json.loads((copy / contract.embeddings_stats(shard)).read_text())["made_by"].count(str(other)) == 1
        name = contract.embeddings_file("img_emb", shard)
        assert (copy / name).read_bytes() != (out / name).read_bytes()


def test_duplicates_across_parts_keep_the_first_parts_sample(embedded, tmp_path, capsys):
    """`laion-operator dedup OUT1 OUT2 --into DIR`: a second part holding the same images is all exact
    duplicates of the first's, each kept in the first part under its own key."""
    from laion_operator import cli

    out, summary = embedded
    second = tmp_path / "second"
    shutil.copytree(out, second)
    assert cli.main(["dedup", str(out), str(second), "--into", str(tmp_path / "dataset"), "--similarity", "1"]) == 0
    assert "exact" in capsys.readouterr().out
    rows = pq.read_table(tmp_path / "dataset" / contract.EMBEDDINGS_DUPLICATES).to_pylist()
    theirs = [r for r in rows if r["part"] == str(second)]
    assert len(theirs) == summary["images"]["ok"]
    for row in theirs:  # its twin in the first part, whose key is its own
        assert row["kind"] == "exact" and row["keptPart"] == str(out) and row["kept"] == "0/" + row["key"][2:]
