"""Latents: the stage's shard encoding against plain PyTorch loops, on the same device and models.

`python -m bench --only latents --device cuda` on a machine with a GPU gives the figure the project
is judged by; `--device cpu` (the default) runs the same code on the CPU. Every side encodes the same
shard of JPEGs (a webdataset tar, as the download writes it) at the same resolutions (micro_diffusion's
256 and 512 by default, both from one decode), with the same models, batch size, preprocessing
(`latents.preprocess_all`: torchvision's Resize + CenterCrop) and MDS writer, in this one process,
with the models loaded before the clock starts:

- plain loop: micro_diffusion's precompute loop with `num_workers=0`: read and decode a batch, then
  encode it at each resolution, then copy back and write it;
- torch DataLoader, N workers: the same with the decoding in DataLoader worker processes (its
  script uses 2 a GPU; here N is the decode threads the stage is given, so both get the same CPUs);
- the project: `pipeline.latents.encode_shard`, decoding in threads beside the model and writing
  the previous batch while the device computes the next.

Models: `--latents-models sd` (the default on cuda) has Stable Diffusion's shapes, from their
configs below (its VAE, 83.7 M parameters, 8× downsampling; CLIP ViT-L/14's text tower, 123 M less its
vocabulary: the test bed's tokenizer has byte tokens only),
with random weights (the throughput does not depend on them; no hub is reached); `tiny` is a small
VAE and text encoder for a CPU. images/s = samples written / seconds. On cuda, GPU utilisation is
sampled every 100 ms while each side runs (NVML through nvidia-smi): the mean of the samples.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from . import common

PLAIN, WORKERS, PROJECT = "plain loop", "torch DataLoader", "project"
# Stable Diffusion's shapes (stabilityai/sd-vae-ft-mse's and openai/clip-vit-large-patch14's configs).
MODELS = {
    "sd": {
        "vae_blocks": (128, 256, 512, 512),
        "layers_per_block": 2,
        "norm_groups": 32,
        "scaling_factor": 0.18215,
        "text_width": 768,
        "text_layers": 12,
        "text_heads": 12,
        "text_intermediate": 3072,
    },
    "tiny": {"vae_blocks": (8, 16, 16, 16), "text_width": 128, "text_layers": 4},
}
BATCH = 32
GOAL_RATIO, GOAL_UTILISATION = 0.9, 80.0


def write_shard(out: Path, n: int, seed: int = 0, sides: tuple[int, int] = (320, 640)) -> None:
    """<out>/00000.tar: n photo-like JPEGs (smooth fields and noise) of random sides, with captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "00000.tar", "w") as tar:
        for i in range(n):
            w, h = (int(v) for v in rng.integers(sides[0], sides[1], 2))
            base = rng.random((h // 16 + 1, w // 16 + 1, 3))
            image = np.kron(base, np.ones((16, 16, 1)))[:h, :w] * 200 + rng.normal(0, 12, (h, w, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            key = f"{i:09d}"
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", f"a picture number {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def spec_for(out: Path, models: Path, resolutions: tuple[int, ...], batch: int, threads: int):
    from laion_operator.spec import PartSpec

    return PartSpec.from_dict(
        {
            "partId": "bench",
            "source": {"urls": ["unused.parquet"]},
            "output": {"uri": str(out)},
            "latents": {
                "vae": str(models),
                "vaeSubfolder": "vae",
                "textEncoder": str(models),
                "textEncoderSubfolder": "text_encoder",
                "tokenizerSubfolder": "tokenizer",
                "resolutions": list(resolutions),
                "batchSize": batch,
                "latentMode": "sample",
                "decodeThreads": threads,
            },
        }
    )


class _Decoded:
    """A map-style dataset of the shard's decoded samples (for the DataLoader sides)."""

    def __init__(self, samples, resolutions):
        self.samples, self.resolutions = samples, resolutions

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from laion_operator.pipeline.latents import preprocess_all

        sample = self.samples[i]
        return sample.key, sample.caption, preprocess_all(sample.image, self.resolutions)


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
    sizes = spec.latents.sizes
    samples = list(read_samples(Store(spec.output), 0, spec))
    loader = torch.utils.data.DataLoader(
        _Decoded(samples, sizes),
        batch_size=spec.latents.batch_size,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=2 if workers else None,
        pin_memory=device.startswith("cuda"),
    )
    written = 0
    with tempfile.TemporaryDirectory() as local:
        with streaming().MDSWriter(out=local, columns=columns(spec.latents), compression=None) as writer:
            for keys, captions, images in loader:
                z = {
                    r: encode_images(vae, to_pixels([im[r] for im in images]), keys, "sample", 0, scale)
                    .to("cpu", torch.float16)
                    .numpy()
                    for r in sizes
                }
                e = text(captions).to("cpu", torch.float16).numpy()
                for i, key in enumerate(keys):
                    writer.write(
                        {
                            "key": key,
                            "caption": captions[i],
                            contract.CAPTION_LATENTS: e[i].tobytes(),
                            **{contract.image_latents_column(r): z[r][i].tobytes() for r in sizes},
                        }
                    )
                written += len(keys)
    return written


def decode_alone(spec, threads: int) -> int:
    """The stage's decoding with no model: how fast the device could be fed."""
    from laion_operator.pipeline.latents import decoded_batches, read_samples
    from laion_operator.storage import Store

    s = spec.latents
    return sum(
        len(b.keys)
        for b in decoded_batches(read_samples(Store(spec.output), 0, spec), s.sizes, s.batch_size, threads=threads)
    )


def project(spec, models) -> int:
    from laion_operator.pipeline.latents import encode_shard

    return encode_shard(spec, 0, models=models).written


class Utilisation:
    """GPU utilisation (%) sampled by nvidia-smi every 100 ms while a side runs; None without a GPU."""

    def __init__(self, device: str):
        self.on = device.startswith("cuda") and shutil.which("nvidia-smi") is not None
        self.samples: list[float] = []

    def __enter__(self):
        if self.on:
            import torch

            index = torch.cuda.current_device()
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    f"--id={index}",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                continue

    def __exit__(self, *exc):
        if self.on:
            self.proc.terminate()
            self.proc.wait(timeout=5)
            self.reader.join(timeout=5)

    @property
    def mean(self) -> float | None:
        # The first samples cover nvidia-smi's start, before the side's first batch.
        kept = self.samples[2:] or self.samples
        return float(np.mean(kept)) if kept else None


def bench(
    n: int,
    repeats: int,
    device: str = "cpu",
    model_size: str | None = None,
    resolutions: tuple[int, ...] = (256, 512),
    batch: int = BATCH,
    threads: int = 0,
    work: Path | None = None,
    sides_px: tuple[int, int] = (320, 640),
) -> tuple[str, list[str]]:
    import os

    import torch

    from laion_operator.pipeline import models as model_loading
    from laion_operator.pipeline.latents import decode_threads
    from tests.support.tiny_models import build

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("[latents] --device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
    model_size = model_size or ("sd" if device.startswith("cuda") else "tiny")
    work = work or common.WORK / "latents"
    out = work / "out"
    print(f"[latents] writing {n} JPEGs and the {model_size} models", file=sys.stderr, flush=True)
    write_shard(out, n, sides=sides_px)
    model_dir = build(work / f"models-{model_size}", **MODELS[model_size])
    # latents.decodeThreads' own default for the device, unless given: the DataLoader side gets as many.
    threads = threads or decode_threads(spec_for(out, model_dir, resolutions, batch, 0).latents, device)
    spec = spec_for(out, model_dir, resolutions, batch, threads)
    torch_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # a Ray CPU task's: the model has a core, what decodes has the others
    settings = spec.latents
    loaded = (device, model_loading.load_vae(settings, device), model_loading.load_text_encoder(settings, device))
    workers_side = f"{WORKERS}, {threads} worker{'s' if threads > 1 else ''}"
    sides = [PLAIN, workers_side, PROJECT]
    runs = {
        PLAIN: lambda: plain(spec, loaded, 0),
        workers_side: lambda: plain(spec, loaded, threads),
        PROJECT: lambda: project(spec, loaded),
    }
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    utilisation: dict[str, list[float]] = {side: [] for side in sides}
    runs[PROJECT]()  # warm-up: cuDNN's algorithm search and the allocator, outside the clock
    for attempt in range(repeats):
        for side in sides:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            with Utilisation(device) as gpu:
                start = time.perf_counter()
                written = runs[side]()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                took = time.perf_counter() - start
            if written != n:
                raise SystemExit(f"[latents] {side}: {written} samples written, expected {n}")
            seconds[side].append(took)
            if gpu.mean is not None:
                utilisation[side].append(gpu.mean)
            shown = f", GPU {gpu.mean:.0f} %" if gpu.mean is not None else ""
            print(
                f"[latents] {side:<28} run {attempt + 1}/{repeats}: {took:6.2f} s ({n / took:,.1f} images/s"
                f"{shown}), load {common.load()}",
                file=sys.stderr,
                flush=True,
            )
    start = time.perf_counter()
    decoded = decode_alone(spec, threads)
    decode_rate = decoded / (time.perf_counter() - start)
    torch.set_num_threads(torch_threads)
    best = {side: min(v) for side, v in seconds.items()}
    baseline = min(sides[:2], key=lambda side: best[side])  # the faster plain-PyTorch side
    ratio = {side: float(np.median([b / s for b, s in zip(seconds[baseline], seconds[side])])) for side in sides}
    util = {side: (f"{np.mean(v):.0f} %" if v else "n/a") for side, v in utilisation.items()}
    rows = [
        [side, f"{best[side]:.2f} s", f"{n / best[side]:,.1f}", f"{ratio[side]:.2f}×", util[side]] for side in sides
    ]
    vae_params = sum(p.numel() for p in loaded[1].parameters()) / 1e6
    text_params = sum(p.numel() for p in loaded[2].model.parameters()) / 1e6
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    report = "\n".join(
        [
            f"Latents on {name}: {n} JPEGs ({sides_px[0]}–{sides_px[1]} px) in one webdataset shard, encoded at "
            f"{' and '.join(f'{r}×{r}' for r in settings.sizes)} from one decode, batch {batch}, latentMode "
            f"sample, model dtype {loaded[1].dtype}, saved float16 as MDS; {model_size} shapes: VAE "
            f"{vae_params:.1f} M parameters, CLIP text encoder {text_params:.1f} M, random weights; {threads} "
            f"decode thread(s) for the project and as many DataLoader workers; torch {torch.__version__}. "
            f"{repeats} rounds after a warm-up, each running the sides back to back; the ratio is against "
            f"the faster plain side ({baseline}), the median of the rounds' ratios, seconds the best.",
            "",
            common.table(["side", "best seconds", "images/s", f"vs {baseline}", "GPU utilisation"], rows),
            "",
            f"Decoding alone (the project's {threads} decode thread(s), no model): {decode_rate:,.1f} images/s, "
            f"{decode_rate * best[PROJECT] / n:.1f}× the project's rate.",
        ]
    )
    goals = [
        f"latents ≥ {GOAL_RATIO}× a plain PyTorch loop ({device}, {model_size} models): "
        f"{ratio[PROJECT]:.2f}× — {common.goal(ratio[PROJECT] >= GOAL_RATIO)}"
    ]
    if device.startswith("cuda"):
        fed = decode_rate * best[PROJECT] / n
        goals.append(
            f"latents decode never the bottleneck (decoding alone ≥ 1.2× the stage's rate): "
            f"{fed:.1f}× — {common.goal(fed >= 1.2)}"
        )
    if utilisation[PROJECT]:
        mean = float(np.mean(utilisation[PROJECT]))
        goals.append(
            f"latents GPU utilisation ≥ {GOAL_UTILISATION:.0f} %: {mean:.0f} % — "
            f"{common.goal(mean >= GOAL_UTILISATION)}"
        )
    return report, goals
