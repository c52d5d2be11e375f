"""The latents stage: tiny random models saved to disk and loaded as real ones are, a downloaded part
encoded on the session's Ray, its MDS read back with the loader and with micro_diffusion's count check."""

from __future__ import annotations

import gc
import io
import json
from pathlib import Path

import numpy as np
import pytest

from laion_operator import contract
from laion_operator.errors import InputError
from laion_operator.spec import PartSpec, SpecError
from laion_operator.testbed.demo_data import write_metadata
from tests.support import outputs
from tests.support.specs import partspec

RESOLUTION = 32
MIX = {"ok": 0.85, "http_4xx": 0.15}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.support.tiny_models import build

    return build(tmp_path_factory.mktemp("models"))


def latents_spec(model_dir, **extra) -> dict:
    return {
        "vae": str(model_dir),
        "vaeSubfolder": "vae",
        "textEncoder": str(model_dir),
        "textEncoderSubfolder": "text_encoder",
        "tokenizerSubfolder": "tokenizer",
        "resolution": RESOLUTION,
        "batchSize": 4,
        **extra,
    }


def part(source, output, model_dir, fmt="webdataset", **latents) -> PartSpec:
    download = {"imageSize": 48, "resizeMode": "center_crop", "timeout": 2, "maxInFlight": 8, "outputFormat": fmt}
    return partspec(
        "L", source, output, samples_per_shard=12, download=download, latents=latents_spec(model_dir, **latents)
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("meta") / "part.parquet"
    write_metadata(path, 30, image_server.base_url, seed=5, failure_mix=MIX)
    return path


@pytest.fixture(scope="module")
def models(model_dir):
    from laion_operator.pipeline import models

    settings = part("x", "y", model_dir).latents
    return models.load(settings)


def pictures(n, size=40, seed=0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


# --- spec -------------------------------------------------------------------------------------------


def test_latents_settings_are_validated_naming_the_field(model_dir):
    spec = part("s.parquet", "/tmp/o", model_dir)
    assert spec.latents.latent_mode == "sample" and spec.latents.save_dtype == "float16"
    assert PartSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match=r"spec\.latents\.latentMode: 'median' is not one of"):
        part("s.parquet", "/tmp/o", model_dir, latentMode="median")
    with pytest.raises(SpecError, match=r"spec\.latents\.textEncoder: required field is missing"):
        PartSpec.from_dict(
            {"partId": "L", "source": {"urls": ["s"]}, "output": {"uri": "/tmp/o"}, "latents": {"vae": "v"}}
        )
    assert PartSpec.from_dict({"partId": "L", "source": {"urls": ["s"]}, "output": {"uri": "/tmp/o"}}).latents is None
    for fmt in ("webdataset", "files", "parquet", "tfrecord", "mds"):  # the stage reads every format
        assert part("s.parquet", "/tmp/o", model_dir, fmt=fmt).download.output_format == fmt


# --- models -----------------------------------------------------------------------------------------


def test_latents_have_the_vaes_shape_and_decode_back_to_the_image_size(models):
    import torch

    from laion_operator.pipeline.latents import preprocess, to_pixels
    from laion_operator.pipeline.models import LatentScale, decode_latents, encode_images

    device, vae, text = models
    assert device == "cpu" and vae.dtype == torch.float32  # dtype auto on a CPU
    pixels = to_pixels([preprocess(b, RESOLUTION) for b in pictures(3)])
    assert pixels.shape == (3, 3, RESOLUTION, RESOLUTION) and -1.0 <= pixels.min() and pixels.max() <= 1.0
    scale = LatentScale.of(vae)
    z = encode_images(vae, pixels, ["a", "b", "c"], "mean", 0, scale)
    assert z.shape == (3, 4, RESOLUTION // 4, RESOLUTION // 4) and z.dtype == torch.float32
    assert torch.allclose(z, vae.encode(pixels).latent_dist.mean * 0.5, atol=1e-6)  # scaling_factor 0.5
    assert decode_latents(vae, z, scale).shape == (3, 3, RESOLUTION, RESOLUTION)
    e = text(["the cat on the mat", "", "a very long caption " * 30])
    assert e.shape == (3, 77, 32) and e.dtype == torch.float32


def test_samples_are_deterministic_by_seed_and_key_whatever_the_batch(models):
    import torch

    from laion_operator.pipeline.latents import preprocess, to_pixels
    from laion_operator.pipeline.models import LatentScale, encode_images

    _, vae, _ = models
    scale = LatentScale.of(vae)
    pixels = to_pixels([preprocess(b, RESOLUTION) for b in pictures(3, seed=1)])
    keys = ["000000000", "000000001", "000000002"]
    a = encode_images(vae, pixels, keys, "sample", 7, scale)
    b = encode_images(vae, pixels, keys, "sample", 7, scale)
    assert torch.equal(a, b)
    alone = encode_images(vae, pixels[2:], keys[2:], "sample", 7, scale)
    assert torch.allclose(a[2:], alone, atol=1e-5)
    other_seed = encode_images(vae, pixels, keys, "sample", 8, scale)
    mean = encode_images(vae, pixels, keys, "mean", 7, scale)
    assert not torch.allclose(a, other_seed) and not torch.allclose(a, mean)
    # The same image under another key draws other noise: each sample's own.
    renamed = encode_images(vae, pixels, ["x", "y", "z"], "sample", 7, scale)
    assert not torch.allclose(a, renamed)


def test_a_model_that_cannot_load_names_the_field(tmp_path, model_dir):
    from laion_operator.pipeline import models

    settings = part("s", "o", model_dir, vae=str(tmp_path / "missing")).latents
    with pytest.raises(models.ModelError, match=r"spec\.latents\.vae: cannot load .*missing"):
        models.load_vae(settings, "cpu")
    settings = part("s", "o", model_dir, textEncoderSubfolder="nope").latents
    with pytest.raises(models.ModelError, match=r"spec\.latents\.textEncoder: cannot load"):
        models.load_text_encoder(settings, "cpu")
    # A hub id is looked up in the local cache only (HF_HUB_OFFLINE): nothing reaches out to a hub.
    settings = part("s", "o", model_dir, vae="laion-operator-tests/no-such-vae").latents
    models.go_offline(settings)
    with pytest.raises(models.ModelError, match=r"spec\.latents\.vae: cannot load 'laion-operator-tests/no-such-vae'"):
        models.load_vae(settings, "cpu")


def test_decoding_runs_ahead_in_a_thread_and_skips_undecodable_images():
    from laion_operator.pipeline.formats import Sample
    from laion_operator.pipeline.latents import decoded_batches

    good = pictures(7, seed=2)
    samples = [Sample(f"k{i}", f"c{i}", b, {}, "") for i, b in enumerate(good)]
    samples.insert(3, Sample("bad", "broken", b"not an image", {}, ""))
    batches = list(decoded_batches(iter(samples), RESOLUTION, batch_size=3))
    assert [b.keys for b in batches] == [["k0", "k1", "k2"], ["k3", "k4", "k5"], ["k6"]]
    assert sum(b.skipped for b in batches) == 1
    assert batches[0].pixels[RESOLUTION].shape == (3, 3, RESOLUTION, RESOLUTION)

    def failing():
        yield samples[0]
        raise OSError("storage went away")

    with pytest.raises(OSError, match="storage went away"):
        list(decoded_batches(failing(), RESOLUTION, batch_size=3))


# --- the stage on Ray -------------------------------------------------------------------------------


def tar_samples(out: Path) -> dict[str, tuple[str | None, bytes | None]]:
    return {s.key: (s.caption, s.image) for s in outputs.images(out, "webdataset")}


@pytest.fixture(scope="module")
def encoded(ray_driver, source, model_dir, tmp_path_factory):
    from laion_operator.pipeline.driver import run_part

    out = tmp_path_factory.mktemp("encoded") / "out"
    summary = run_part(part(source, out, model_dir))
    return out, summary


def test_a_part_ends_with_latents_of_every_image(encoded, models):
    import torch

    from laion_operator.latents_loader import LatentsDataset, build_latents_dataloader
    from laion_operator.pipeline.latents import preprocess, to_pixels
    from laion_operator.pipeline.models import LatentScale, decode_latents, encode_images

    out, summary = encoded
    ok = summary["images"]["ok"]
    shards = summary["shards"]["total"]
    assert ok > 12 and shards >= 2
    section = summary["latents"]
    assert section["samples"] == ok and section["shards"] == shards and section["skipped"] == 0
    assert section["imageShape"] == [4, RESOLUTION // 4, RESOLUTION // 4] and section["captionShape"] == [77, 32]
    assert json.loads((out / "part_L_summary.json").read_text())["latents"] == section
    for shard in range(shards):
        assert (out / contract.latents_stats(shard)).is_file()
        assert (out / contract.latents_shard(shard) / "index.json").is_file()
    progress = json.loads((out / contract.PROGRESS).read_text())
    assert progress["phase"] == "Succeeded" and progress["latents"]["written"] == ok
    assert progress["latents"]["shards"]["done"] == shards and progress["latents"]["perSecond"] > 0

    # micro_diffusion's check: the loader's dataset holds as many samples as were downloaded.
    loader = build_latents_dataloader(str(out), batch_size=5)
    assert len(loader.dataset) == ok
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [5] * (ok // 5) + ([ok % 5] if ok % 5 else [])
    first = batches[0]
    assert first["image_latents"].shape == (5, 4, RESOLUTION // 4, RESOLUTION // 4)
    assert first["caption_latents"].shape == (5, 77, 32) and first["caption_latents"].dtype == torch.float32

    images = tar_samples(out)
    dataset = loader.dataset  # streaming refuses a second live dataset over the same folder
    assert isinstance(dataset, LatentsDataset)
    samples = [dataset[i] for i in range(len(dataset))]
    assert sorted(s["key"] for s in samples) == sorted(images)  # each downloaded image exactly once
    _, vae, text = models
    scale = LatentScale.of(vae)
    for sample in samples[:6]:
        caption, data = images[sample["key"]]
        assert sample["caption"] == caption
        # The same latents again from the downloaded image: the seed and key decide the noise.
        again = encode_images(vae, to_pixels([preprocess(data, RESOLUTION)]), [sample["key"]], "sample", 0, scale)
        assert torch.allclose(sample["image_latents"], again[0].half().float(), atol=1e-3)
        assert torch.allclose(sample["caption_latents"], text([caption])[0].half().float(), atol=1e-3)
        back = decode_latents(vae, sample["image_latents"][None], scale)
        assert back.shape == (1, 3, RESOLUTION, RESOLUTION)


def test_micro_diffusions_reader_reads_the_columns_as_they_are(encoded):
    """micro_diffusion's StreamingLatentsDataset reshapes `latents_<res>` and `caption_latents` float16 bytes."""
    from laion_operator.pipeline.latents import streaming

    out, summary = encoded
    gc.collect()  # an earlier test's dataset over the same folder must be gone: streaming refuses two
    dataset = streaming().StreamingDataset(local=str(out / contract.LATENTS_DIR), batch_size=1)
    sample = dataset[0]
    image = np.frombuffer(sample[f"latents_{RESOLUTION}"], dtype=np.float16).reshape(
        -1, RESOLUTION // 4, RESOLUTION // 4
    )
    caption = np.frombuffer(sample["caption_latents"], dtype=np.float16).reshape(1, 77, 32)
    assert image.shape == (4, RESOLUTION // 4, RESOLUTION // 4) and np.isfinite(caption).all()
    assert json.loads((out / contract.LATENTS_MANIFEST).read_text())["dtype"] == "float16"


def test_latents_resume_per_shard_with_each_sample_once(encoded, model_dir):
    import shutil

    from laion_operator.latents_loader import LatentsDataset
    from laion_operator.pipeline.driver import encode_part

    out, summary = encoded
    copy = out.parent / "resumed"
    shutil.copytree(out, copy)
    kept = (copy / contract.latents_stats(0)).read_text()
    (copy / contract.latents_stats(1)).unlink()  # shard 1 was cut short: its MDS may be partial
    (copy / contract.latents_shard(1) / "shard.00000.mds").write_bytes(b"half a file")
    spec = part("unused.parquet", copy, model_dir)
    resumed = encode_part(spec)
    assert (copy / contract.latents_stats(0)).read_text() == kept  # not redone
    assert resumed["latents"]["samples"] == summary["images"]["ok"]
    dataset = LatentsDataset(str(copy))
    keys = [dataset[i]["key"] for i in range(len(dataset))]
    assert len(keys) == len(set(keys)) == summary["images"]["ok"]


def test_a_model_that_cannot_load_fails_the_part_as_bad_input(encoded, model_dir, tmp_path):
    import shutil

    from laion_operator.pipeline.driver import encode_part

    out, _ = encoded
    copy = tmp_path / "bad"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("latents"))
    with pytest.raises(InputError, match=r"spec\.latents\.vae: cannot load"):
        encode_part(part("unused.parquet", copy, model_dir, vae=str(tmp_path / "no-such-model")))
    assert json.loads((copy / contract.PROGRESS).read_text())["phase"] == "Failed"


@pytest.mark.parametrize("fmt", ["parquet", "files", "tfrecord", "mds"])
def test_every_output_format_gives_the_same_latents(ray_driver, source, model_dir, encoded, tmp_path, fmt):
    from laion_operator.latents_loader import LatentsDataset
    from laion_operator.pipeline.driver import run_part

    out, _ = encoded
    summary = run_part(part(source, tmp_path / fmt, model_dir, fmt=fmt))
    gc.collect()
    reference = LatentsDataset(str(out))
    reference = {s["key"]: s for s in (reference[i] for i in range(len(reference)))}
    gc.collect()  # the reference dataset's shared memory goes with it
    dataset = LatentsDataset(str(tmp_path / fmt))
    assert len(dataset) == summary["images"]["ok"] == len(reference)
    for i in range(0, len(dataset), 4):
        sample = dataset[i]
        # The same image, in a batch made up by the order its shard's downloads finished in: float32
        # results may move in their last bits with the batch, not more.
        np.testing.assert_allclose(
            sample["image_latents"].numpy(), reference[sample["key"]]["image_latents"].numpy(), rtol=1e-3, atol=1e-4
        )


# --- what the operator shows ------------------------------------------------------------------------


def test_latents_progress_shows_in_the_status_and_the_metrics():
    from prometheus_client import generate_latest

    from laion_operator.contract import Progress
    from laion_operator.control.metrics import Metrics
    from laion_operator.control.status import STATUS_SCHEMA, cr_status

    progress = Progress(
        part_id="p",
        phase="Encoding",
        shards_total=3,
        shards_done=3,
        images_ok=40,
        latents={"shards": {"total": 3, "done": 1, "failed": 0}, "written": 17, "skipped": 1, "perSecond": 8.5},
    )
    status = cr_status(progress)
    assert status["latents"] == {
        "shards": {"total": 3, "done": 1, "failed": 0},
        "written": 17,
        "skipped": 1,
        "perSecond": 8.5,
    }
    assert set(status["latents"]) == set(STATUS_SCHEMA["properties"]["latents"]["properties"])
    assert "latents" not in cr_status(Progress(part_id="q", shards_total=2))  # a part without the stage
    metrics = Metrics()
    metrics.observe_part("ns", "p", "Encoding", progress)
    text = generate_latest(metrics.registry).decode()
    assert 'laion_part_latents_total{namespace="ns",part="p"} 17.0' in text
    assert 'laion_part_latents_per_second{namespace="ns",part="p"} 8.5' in text
    assert 'laion_part_latents_shards{namespace="ns",part="p",state="done"} 1.0' in text
    assert 'laion_part_phase{namespace="ns",part="p",phase="Encoding"} 1.0' in text


def test_the_hub_token_travels_like_the_storage_credentials(monkeypatch, tmp_path):
    """Jobs mode: the operator reads both Secrets and ships them in the job's working_dir package; only
    HF_TOKEN is taken from the hub token's Secret, and neither reaches the spec the job receives."""
    import asyncio
    import zipfile

    from laion_operator import credentials
    from laion_operator.control import kube, parts

    values = {
        "laion-s3": {"AWS_ACCESS_KEY_ID": "AKIA-test", "AWS_SECRET_ACCESS_KEY": "s3-secret"},
        "hf": {"HF_TOKEN": "hf_not_a_real_token", "UNRELATED": "x"},
    }
    monkeypatch.setattr(kube, "read_secret", lambda namespace, name: values[name])
    spec = PartSpec.from_dict(
        {
            "partId": "p",
            "source": {"urls": ["s.parquet"]},
            "output": {"uri": "s3://b/p", "credentialsSecret": "laion-s3"},
            "latents": {"vae": "v", "textEncoder": "t", "hubTokenSecret": "hf"},
        }
    )
    part = parts.Part(None, {"metadata": {"namespace": "ns", "name": "p", "uid": "u"}}, None)
    secret = asyncio.run(part.read_secret(spec))
    assert secret == {
        "AWS_ACCESS_KEY_ID": "AKIA-test",
        "AWS_SECRET_ACCESS_KEY": "s3-secret",
        "HF_TOKEN": "hf_not_a_real_token",
    }
    assert "hf_not_a_real_token" not in json.dumps(spec.to_dict())
    package = tmp_path / "pkg.zip"
    package.write_bytes(credentials.package(secret, job="lp-u-1"))
    with zipfile.ZipFile(package) as zf:
        zf.extractall(tmp_path / "job")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    assert credentials.load_into_environment(tmp_path / "job")
    import os

    assert os.environ["HF_TOKEN"] == "hf_not_a_real_token"  # where huggingface_hub looks for it

    values.pop("hf")
    monkeypatch.setattr(
        kube,
        "read_secret",
        lambda namespace, name: (
            (_ for _ in ()).throw(kube.KubeError(f"read Secret ns/{name}: not found")) if name == "hf" else values[name]
        ),
    )
    with pytest.raises(kube.KubeError, match=r"spec\.latents\.hubTokenSecret 'hf'"):
        asyncio.run(part.read_secret(spec))


def test_an_mds_folder_anyone_wrote_is_encoded_on_ray(encoded, model_dir, tmp_path):
    """`laion-operator latents --mds`: an MDS folder written by someone else's converter (its own column
    names, a merged index naming files in subfolders) gives the same latents as the part's own shards."""
    import shutil

    from streaming import MDSWriter

    from laion_operator.latents_loader import LatentsDataset
    from laion_operator.pipeline.driver import encode_mds
    from laion_operator.pipeline.formats.mds import MDSFolder, merge

    out, summary = encoded
    theirs = tmp_path / "theirs"
    images = sorted(tar_samples(out).items())
    indexes = {}
    for n, chunk in enumerate((images[: len(images) // 2], images[len(images) // 2 :])):
        with MDSWriter(out=str(theirs / f"{n:05d}"), columns={"key": "str", "img": "bytes", "txt": "str"}) as writer:
            for key, (caption, data) in chunk:
                writer.write({"key": key, "img": data, "txt": caption})
        indexes[n] = json.loads((theirs / f"{n:05d}" / "index.json").read_text())
    (theirs / "index.json").write_text(json.dumps(merge(indexes)))
    spec = part("unused.parquet", tmp_path / "latents-out", model_dir)
    result = encode_mds(spec, MDSFolder(str(theirs), image_column="img", caption_column="txt"))
    assert result["latents"]["samples"] == len(images) == summary["images"]["ok"]
    assert result["latents"]["shards"] == 2
    shutil.rmtree(theirs / "00000")  # the input is read once; the latents stand alone
    gc.collect()
    reference = LatentsDataset(str(out))
    reference = {s["key"]: s for s in (reference[i] for i in range(len(reference)))}
    gc.collect()
    dataset = LatentsDataset(str(tmp_path / "latents-out"))
    assert sorted(dataset[i]["key"] for i in range(len(dataset))) == sorted(reference)
    for i in range(0, len(dataset), 3):
        sample = dataset[i]
        assert sample["caption"] == reference[sample["key"]]["caption"]
        np.testing.assert_allclose(
            sample["image_latents"].numpy(), reference[sample["key"]]["image_latents"].numpy(), rtol=1e-3, atol=1e-4
        )
