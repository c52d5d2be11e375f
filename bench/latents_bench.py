"""Latents: the stage's shard encoding (decode thread feeding the model) against a plain PyTorch loop.

Both sides encode the same shard of JPEGs (a webdataset tar, as the download writes it) with the same
models, batch size, preprocessing (`latents.preprocess`) and MDS writer, in this one process, with
the models loaded before the clock starts:

- plain loop: what micro_diffusion's precompute script does per process with `num_workers=0`:
  read and decode a batch, then encode it, then write it;
- torch DataLoader, 1 worker: the same with the decoding in one DataLoader worker process, as its
  script (with 2 workers per GPU) does;
- the project: `pipeline.latents.encode_shard`, its decoding in a thread beside the model.

latents/s = samples written / seconds. The models are small (testbed.tiny_models, a wider VAE than
the tests'), on the CPU, with torch on one thread as in the stage's Ray task on a CPU node (Ray sets
OMP_NUM_THREADS to the task's one CPU): the model has a core, and what decodes has the other, as a
GPU and the host's cores. A GPU figure comes from a machine with one.
"""

from __future__ import annotations

import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from . import common

SIDES = ["plain loop", "torch DataLoader, 1 worker", "project (decode thread)"]
RESOLUTION = 256
BATCH = 16


def write_shard(out: Path, n: int, seed: int = 0) -> None:
    """<out>/00000.tar: n photo-like JPEGs (smooth fields and noise), 320–640 px, with captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "00000.tar", "w") as tar:
        for i in range(n):
            w, h = (int(v) for v in rng.integers(320, 640, 2))
            base = rng.random((h // 16 + 1, w // 16 + 1, 3))
            image = np.kron(base, np.ones((16, 16, 1)))[:h, :w] * 200 + rng.normal(0, 12, (h, w, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            key = f"{i:09d}"
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", f"a picture number {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def spec_for(out: Path, models: Path):
    from laion_operator.spec import PartSpec

    return PartSpec.from_dict({
        "partId": "bench", "source": {"urls": ["unused.parquet"]}, "output": {"uri": str(out)},
        "latents": {"vae": str(models), "vaeSubfolder": "vae", "textEncoder": str(models),
                    "textEncoderSubfolder": "text_encoder", "tokenizerSubfolder": "tokenizer",
                    "resolution": RESOLUTION, "batchSize": BATCH, "latentMode": "sample"},
    })


class _Decoded:
    """A map-style dataset of the shard's decoded samples (for the DataLoader side)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from laion_operator.pipeline.latents import preprocess

        key, caption, data = self.samples[i]
        return key, caption, preprocess(data, RESOLUTION)


def _collate(items):
    keys, captions, images = zip(*items)
    return list(keys), list(captions), list(images)


def plain(spec, models, workers: int) -> int:
    """micro_diffusion's loop: batches in order, each decoded, then encoded, then written."""
    import torch

    from laion_operator import contract
    from laion_operator.pipeline.latents import columns, read_samples, streaming, to_pixels
    from laion_operator.pipeline.models import LatentScale, encode_images
    from laion_operator.storage import Store

    device, vae, text = models
    scale = LatentScale.of(vae)
    samples = list(read_samples(Store(spec.output), 0, spec))
    loader = torch.utils.data.DataLoader(_Decoded(samples), batch_size=BATCH, num_workers=workers,
                                         collate_fn=_collate, prefetch_factor=2 if workers else None)
    written = 0
    with tempfile.TemporaryDirectory() as local:
        with streaming().MDSWriter(out=local, columns=columns(spec.latents), compression=None) as writer:
            for keys, captions, images in loader:
                z = encode_images(vae, to_pixels(images), keys, "sample", 0, scale).to("cpu", torch.float16).numpy()
                e = text(captions).to("cpu", torch.float16).numpy()
                for i, key in enumerate(keys):
                    writer.write({"key": key, "caption": captions[i],
                                  contract.image_latents_column(RESOLUTION): z[i].tobytes(),
                                  contract.CAPTION_LATENTS: e[i].tobytes()})
                written += len(keys)
    return written


def project(spec, models) -> int:
    from laion_operator.pipeline.latents import encode_shard

    return encode_shard(spec, 0, models=models).written


def bench(n: int, repeats: int) -> tuple[str, list[str]]:
    import torch

    from laion_operator.pipeline import models as model_loading
    from laion_operator.testbed.tiny_models import build

    work = common.WORK / "latents"
    out = work / "out"
    print(f"[latents] writing {n} JPEGs and the models", file=sys.stderr, flush=True)
    write_shard(out, n)
    model_dir = build(work / "models", vae_blocks=(8, 16, 16, 16), text_width=128, text_layers=4)
    spec = spec_for(out, model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    models = model_loading.load(spec.latents)
    results: dict[str, list[float]] = {side: [] for side in SIDES}
    for attempt in range(repeats):
        for side in SIDES:
            start = time.perf_counter()
            if side == SIDES[0]:
                written = plain(spec, models, workers=0)
            elif side == SIDES[1]:
                written = plain(spec, models, workers=1)
            else:
                written = project(spec, models)
            seconds = time.perf_counter() - start
            if written != n:
                raise SystemExit(f"[latents] {side}: {written} samples written, expected {n}")
            results[side].append(seconds)
            print(f"[latents] {side:<28} run {attempt + 1}/{repeats}: {seconds:6.1f} s ({n / seconds:,.1f} latents/s), "
                  f"load {common.load()}", file=sys.stderr, flush=True)
    torch.set_num_threads(threads)
    best = {side: min(v) for side, v in results.items()}
    ratios = {side: float(np.median([a / b for a, b in zip(results[SIDES[0]], results[side])])) for side in SIDES}
    rows = [[side, f"{best[side]:.1f} s", f"{n / best[side]:,.1f}", f"{ratios[side]:.2f}×",
             " ".join(f"{results[SIDES[0]][i] / t:.2f}" for i, t in enumerate(results[side]))] for side in SIDES]
    vae_params = sum(p.numel() for p in models[1].parameters()) / 1e6
    text_params = sum(p.numel() for p in models[2].model.parameters()) / 1e6
    report = "\n".join([
        f"Latents: {n} JPEGs (320–640 px) in one webdataset shard, encoded at {RESOLUTION}×{RESOLUTION}, batch "
        f"{BATCH}, latentMode sample, saved float16 as MDS; VAE {vae_params:.1f} M parameters (4 blocks, 8× "
        f"downsampling), CLIP text encoder {text_params:.1f} M parameters; CPU, torch {torch.__version__} on one "
        f"thread (a Ray CPU task's); models loaded before the clock. {repeats} rounds, each running the "
        "sides back to back; the ratio is the median of the rounds' ratios (a shared machine's load moves "
        "between rounds far more than within one), seconds the best.",
        "",
        common.table(["side", "best seconds", "latents/s", "vs plain loop (median)", "each round"], rows),
    ])
    ratio = ratios[SIDES[2]]
    goals = [f"latents ≥ 1.0× a plain PyTorch loop (CPU, small model): {ratio:.2f}× — {common.goal(ratio >= 1.0)}"]
    return report, goals
