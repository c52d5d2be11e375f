"""micro_diffusion's recipe in the latents stage: its preprocessing (torchvision's Resize + CenterCrop,
compared with torchvision itself), several resolutions from one decode, an MDS folder anyone wrote as
input, and the loader mixing datasets as streams. The stage runs in-process here (encode_shard is
what each Ray task runs); tests/pipeline/test_latents.py runs it on Ray."""

from __future__ import annotations

import gc
import io
import json

import numpy as np
import pytest
from PIL import Image

from laion_operator import contract
from laion_operator.spec import REDUCED_DECODE_PSNR, PartSpec

# Odd sides, both orientations, near-square and very wide or tall: where rounding of sizes and offsets shows.
SIZES = [(37, 53), (53, 37), (101, 33), (33, 101), (64, 65), (97, 97), (300, 41), (45, 190), (32, 32), (257, 129)]


def photo(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth fields plus noise: JPEG-like content whose reduced decode differs as a photo's does."""
    rng = np.random.default_rng(seed)
    base = rng.random((h // 8 + 2, w // 8 + 2, 3))
    image = np.kron(base, np.ones((8, 8, 1)))[:h, :w] * 200 + rng.normal(0, 10, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def encoded(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --- preprocessing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [16, 31, 32])
def test_preprocessing_is_torchvisions_resize_and_center_crop(resolution):
    from torchvision import transforms

    from laion_operator.pipeline.latents import preprocess_all, to_pixels

    for i, (w, h) in enumerate(SIZES):
        data = encoded(photo(w, h, i))
        ours = preprocess_all(data, (resolution, 2 * resolution))  # one decode, both resolutions
        for r in (resolution, 2 * resolution):
            reference = transforms.Compose(
                [transforms.Resize(r, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(r)]
            )
            expected = np.asarray(reference(Image.open(io.BytesIO(data)).convert("RGB")))
            assert ours[r].shape == (r, r, 3), (w, h, r)
            assert np.array_equal(ours[r], expected), f"{w}x{h} at {r}: not torchvision's pixels"
        # And the VAE's input is torchvision's ToTensor + Normalize(0.5, 0.5) of them.
        tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
        expected = tensor(Image.fromarray(ours[resolution]))
        assert np.allclose(to_pixels([ours[resolution]])[0].numpy(), expected.numpy(), atol=1e-6)


def test_reduced_decode_stays_within_its_documented_psnr():
    from laion_operator.pipeline.latents import preprocess

    worst = float("inf")
    checked = 0
    for i, (w, h) in enumerate([(640, 480), (480, 640), (1000, 333), (517, 389), (800, 800), (1203, 611)]):
        data = encoded(photo(w, h, 100 + i), "JPEG", quality=90)
        for r in (64, 128):
            whole, reduced = preprocess(data, r), preprocess(data, r, reduced=True)
            assert reduced.shape == whole.shape == (r, r, 3)
            with Image.open(io.BytesIO(data)) as image:
                image.draft("RGB", (r, r))
                checked += image.size != (w, h)  # the DCT scaling did happen
            worst = min(worst, psnr(whole, reduced))
    assert checked >= 6
    assert REDUCED_DECODE_PSNR <= worst < float("inf"), worst


# --- the stage, in-process ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.support.tiny_models import build

    return build(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def wide_text_dir(tmp_path_factory):
    """Another text encoder: its embeddings are 48 wide, not 32."""
    from tests.support.tiny_models import build

    return build(tmp_path_factory.mktemp("models-wide"), text_width=48)


def latents_spec(model_dir, out, **extra) -> PartSpec:
    return PartSpec.from_dict(
        {
            "partId": "m",
            "source": {"dataset": {"uri": "unused"}},
            "output": {"uri": str(out)},
            "latents": {
                "vae": str(model_dir),
                "vaeSubfolder": "vae",
                "textEncoder": str(model_dir),
                "textEncoderSubfolder": "text_encoder",
                "tokenizerSubfolder": "tokenizer",
                "batchSize": 3,
                "latentMode": "mean",
                **extra,
            },
        }
    )


@pytest.fixture(scope="module")
def mds_folder(tmp_path_factory):
    """An MDS dataset as someone else's converter writes it: columns `image` and `text`, no key,
    two shard files, one image that does not decode."""
    from streaming import MDSWriter

    root = tmp_path_factory.mktemp("their-mds")
    images = {}
    with MDSWriter(
        out=str(root), columns={"image": "bytes", "text": "str", "width": "int"}, size_limit=1 << 14, compression=None
    ) as writer:
        for i in range(9):
            w, h = SIZES[i]
            data = b"not an image" if i == 4 else encoded(photo(w * 2, h * 2, 50 + i), "JPEG", quality=92)
            writer.write({"image": data, "text": f"caption {i}", "width": w})
            images[f"caption {i}"] = data
    assert len(json.loads((root / "index.json").read_text())["shards"]) >= 2
    return root, images


def encode_folder(spec: PartSpec, source, models) -> dict:
    """What `laion-operator latents --mds` runs, one shard task after another in this process."""
    from laion_operator.pipeline.latents import encode_shard, merge_indexes, write_manifest
    from laion_operator.storage import Store

    stats = [encode_shard(spec, shard, models=models, source=source) for shard in source.shards()]
    store = Store(spec.output)
    merge_indexes(store, stats)
    return write_manifest(store, spec.latents, stats)


@pytest.fixture(scope="module")
def two_resolutions(model_dir, mds_folder, tmp_path_factory):
    from laion_operator.pipeline import models
    from laion_operator.pipeline.formats.mds import MDSFolder

    root, _ = mds_folder
    out = tmp_path_factory.mktemp("latents-2r")
    spec = latents_spec(model_dir, out, resolutions=[64, 32], saveImages=True)
    loaded = models.load(spec.latents)
    manifest = encode_folder(spec, MDSFolder(str(root), image_column="image", caption_column="text"), loaded)
    return out, spec, manifest, loaded


def test_several_resolutions_come_from_one_decode_in_micro_diffusions_columns(two_resolutions, mds_folder):
    import torch
    from streaming import StreamingDataset

    from laion_operator.pipeline.latents import preprocess, to_pixels
    from laion_operator.pipeline.models import LatentScale, encode_images

    out, spec, manifest, (_, vae, text) = two_resolutions
    _, images = mds_folder
    assert spec.latents.sizes == (32, 64)
    assert manifest["resolutions"] == [32, 64] and manifest["imageShapes"] == {"32": [4, 8, 8], "64": [4, 16, 16]}
    assert manifest["columns"]["images"] == {"32": "latents_32", "64": "latents_64"}
    gc.collect()
    dataset = StreamingDataset(local=str(out / contract.LATENTS_DIR), batch_size=1)
    assert len(dataset) == 8  # the one that does not decode is left out
    columns = set(json.loads((out / contract.LATENTS_INDEX).read_text())["shards"][0]["column_names"])
    assert columns == {"key", "caption", "latents_32", "latents_64", "caption_latents", "jpg"}
    scale = LatentScale.of(vae)
    for i in range(len(dataset)):
        sample = dataset[i]
        data = images[sample["caption"]]
        assert sample["jpg"] == data  # saveImages: the bytes as they were
        for r in (32, 64):
            z = np.frombuffer(sample[f"latents_{r}"], np.float16).reshape(4, r // 4, r // 4)
            again = encode_images(vae, to_pixels([preprocess(data, r)]), [sample["key"]], "mean", 0, scale)[0]
            assert torch.allclose(torch.from_numpy(z.astype(np.float32)), again.half().float(), atol=1e-3)
        e = np.frombuffer(sample["caption_latents"], np.float16).reshape(77, 32)
        assert np.allclose(e, text([sample["caption"]])[0].half().numpy(), atol=1e-3)
    del dataset
    gc.collect()


def test_an_mds_folder_names_its_columns_or_is_refused(mds_folder):
    from laion_operator.errors import InputError
    from laion_operator.pipeline.formats.mds import MDSFolder

    root, _ = mds_folder
    with pytest.raises(InputError, match=r"no column 'jpg' \(its columns: image, text, width\).*--image-column"):
        MDSFolder(str(root)).shards()
    with pytest.raises(InputError, match=r"index\.json: missing"):
        MDSFolder(str(root / "nowhere"), "image", "text").shards()


# --- the loader --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_resolution(model_dir, mds_folder, tmp_path_factory):
    from laion_operator.pipeline import models
    from laion_operator.pipeline.formats.mds import MDSFolder

    root, _ = mds_folder
    out = tmp_path_factory.mktemp("latents-1r")
    spec = latents_spec(model_dir, out, resolution=32)
    encode_folder(spec, MDSFolder(str(root), "image", "text"), models.load(spec.latents))
    return out


def test_the_loader_mixes_datasets_as_streams_with_caption_dropout(two_resolutions, one_resolution):
    from laion_operator.latents_loader import build_latents_dataloader

    a, b = str(two_resolutions[0]), str(one_resolution)
    gc.collect()
    loader = build_latents_dataloader([a, b], batch_size=4, resolution=32)
    assert len(loader.dataset) == 16
    keys = []
    for batch in loader:
        assert batch["image_latents"].shape[1:] == (4, 8, 8) and batch["caption_latents"].shape[1:] == (77, 32)
        keys += batch["key"]
    assert len(keys) == 16 and not any(batch["caption_dropped"])
    del loader
    gc.collect()

    # Relative mixing (streaming's proportion): three quarters of an epoch from the first dataset.
    loader = build_latents_dataloader(
        [{"path": a, "proportion": 0.75}, {"path": b, "proportion": 0.25}], batch_size=4, resolution=32
    )
    streams = [int(s) for batch in loader for s in batch["stream"]]
    assert len(streams) == 16 and streams.count(0) == 12 and streams.count(1) == 4
    del loader
    gc.collect()

    # Absolute mixing (streaming's repeat): the first dataset twice, the second once.
    loader = build_latents_dataloader([{"path": a, "repeat": 2}, {"path": b, "repeat": 1}], batch_size=4, resolution=32)
    assert len(loader.dataset) == 24
    streams = [int(s) for batch in loader for s in batch["stream"]]
    assert streams.count(0) == 16 and streams.count(1) == 8
    del loader
    gc.collect()

    loader = build_latents_dataloader([a, b], batch_size=8, resolution=32, captionDropProbability=0.5, seed=3)
    samples = [
        s
        for batch in loader
        for s in zip(batch["key"], batch["caption_dropped"], batch["caption"], batch["caption_latents"])
    ]
    dropped = [s for s in samples if s[1]]
    assert 0 < len(dropped) < len(samples)
    assert all(caption == "" and not latents.any() for _, _, caption, latents in dropped)
    assert all(caption and latents.abs().sum() > 0 for _, d, caption, latents in samples if not d)
    again = [(k, bool(d)) for batch in loader for k, d in zip(batch["key"], batch["caption_dropped"])]
    assert sorted(again) == sorted((k, bool(d)) for k, d, _, _ in samples)  # the same captions drop every epoch
    del loader
    gc.collect()


def test_a_mix_of_incompatible_latents_is_refused_naming_both(
    two_resolutions, one_resolution, model_dir, wide_text_dir, mds_folder, tmp_path
):
    from laion_operator.latents_loader import build_latents_dataloader
    from laion_operator.pipeline import models
    from laion_operator.pipeline.formats.mds import MDSFolder

    a, b = str(two_resolutions[0]), str(one_resolution)
    with pytest.raises(ValueError, match=rf"{b}: no latents at resolution 64 \(it holds 32\)"):
        build_latents_dataloader([a, b], batch_size=4, resolution=64)
    root, _ = mds_folder
    wide = tmp_path / "wide"
    spec = latents_spec(model_dir, wide, resolution=32, textEncoder=str(wide_text_dir))
    encode_folder(spec, MDSFolder(str(root), "image", "text"), models.load(spec.latents))
    with pytest.raises(ValueError, match=rf"incompatible latents: {b} has captionShape \[77, 32\], {wide} \[77, 48\]"):
        build_latents_dataloader([b, str(wide)], batch_size=4)


def test_the_loader_reads_a_whole_laion_dataset_from_its_root(one_resolution, model_dir, tmp_path):
    """A LaionDataset's output: part folders and the dataset_index.json the operator writes, whose
    `latents` section is the dataset's one manifest."""
    import asyncio
    import shutil

    from laion_operator.control.datasets import Dataset
    from laion_operator.latents_loader import build_latents_dataloader
    from laion_operator.spec import validate_dataset

    root = tmp_path / "dataset"
    latents = latents_spec(model_dir, root, resolution=32).to_dict()["latents"]
    data = validate_dataset(
        {
            "source": {"urls": ["a.parquet", "b.parquet", "c.parquet"]},
            "template": {"output": {"uri": str(root)}, "latents": latents},
        }
    )
    parts = []
    for part_id, phase in (("0", "Succeeded"), ("1", "Succeeded"), ("2", "Running")):
        shutil.copytree(one_resolution, root / contract.part_dir(part_id))
        parts.append({"metadata": {"name": f"d-{part_id}"}, "spec": {"partId": part_id}, "status": {"phase": phase}})
    operator_side = Dataset(None, {"metadata": {"namespace": "ns", "name": "d"}}, None)
    asyncio.run(operator_side.write_index(data, parts))
    index = json.loads((root / contract.DATASET_INDEX).read_text())
    assert index["latents"]["resolutions"] == [32] and index["parts"][0]["latents"] == "part_0/latents"
    gc.collect()
    loader = build_latents_dataloader([str(root)], batch_size=4)
    assert len(loader.dataset) == 16  # the two finished parts
    assert {s.name for s in loader.dataset.sources} == {f"{root}/part_0", f"{root}/part_1"}
    del loader
    gc.collect()
    index["latents"]["dtype"] = "float32"  # a part whose latents are not what the dataset says
    (root / contract.DATASET_INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"dataset_index\.json has dtype 'float32', .*part_0 'float16'"):
        build_latents_dataloader(str(root), batch_size=4)
