"""Embeddings: `laion-operator embed` against clip-retrieval's own `clip_inference`, same images, same model.

`python -m bench --only embeddings` (`--device cuda` on a machine with a GPU; bench/gpu_embeddings.sh):

- **Images**: JPEGs rendered by the bench (latents_bench.write_shard: smooth fields and noise, 320–640
  px sides, a caption each), split into webdataset tars, then converted once by `laion-operator run`
  (`source.dataset`, `resizeMode: no`) into a finished project output. Both sides read that output's
  tars: clip-retrieval with `input_format="webdataset"`, the project as its own output.
- **Model**: open_clip's ViT-B-32 architecture with random weights (no hub is reached; the throughput
  does not depend on the weights), saved as a local checkpoint; both sides are given the same name,
  `open_clip:ViT-B-32/<checkpoint>`, which clip-retrieval's loader (all_clip) and the stage both
  read as architecture/pretrained file.
- **Measured**, each side in turns for ROUNDS rounds, outputs cleared between runs: the whole command's
  wall time (model load and, for the project, Ray's start included), samples/s, peak memory of its
  process tree; on cuda, GPU utilisation sampled every 100 ms (latents_bench.Utilisation).
- **Checked**: the same number of image embeddings on both sides, and for each key the cosine
  similarity of the two sides' image embeddings (both float16, of unit length).
- **Dedup's cost**: pipeline/dedup.py's semantic dedup (`find`, semantic only) over N random-but-clustered
  float16 512-d unit vectors with planted near-duplicates, in its own process: seconds, peak memory
  and the share of planted pairs found (above EXACT_UP_TO samples the search is FAISS's approximate one).

clip-retrieval 2.45.0 pins numpy<2 and pyarrow<16: it is installed with --no-deps (bench/requirements.txt),
with all_clip and clip-anytorch, what its inference imports. Its package's `__init__` imports its web
back end (flask, h5py…) and its mapper imports sentence_transformers for multilingual CLIP only; the
runner below imports `clip_retrieval.clip_inference` without the former and gives the latter a
placeholder that refuses to be used (`use_mclip` stays off); clip-anytorch takes `packaging` from
pkg_resources, gone from setuptools 81+, so it is given the real `packaging` there. The inference
code itself runs unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from . import common

CLIP_RETRIEVAL, PROJECT = "clip-retrieval clip_inference", "project (laion-operator embed)"
ARCH = "ViT-B-32"
GOAL_RATIO, GOAL_UTILISATION, GOAL_COSINE = 1.5, 80.0, 0.99


def build_model(folder: Path) -> Path:
    """A ViT-B-32 with random weights as open_clip saves a checkpoint (a state dict), made once."""
    path = folder / f"{ARCH}-random.pt"
    if not path.exists():
        import open_clip
        import torch

        torch.manual_seed(0)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(open_clip.create_model(ARCH).state_dict(), path)
    return path


def render(src: Path, n: int, tars: int) -> None:
    """n JPEGs with captions in `tars` webdataset tars (what a finished download would hold)."""
    from .latents_bench import write_shard

    shutil.rmtree(src, ignore_errors=True)
    per = -(-n // tars)
    for t in range(tars):
        part = src / f"tmp{t}"
        write_shard(part, min(per, n - t * per), seed=t)
        (part / "00000.tar").rename(src / f"{t:05d}.tar")
        part.rmdir()


def part_spec(src: Path, out: Path, model: str, batch: int, samples_per_shard: int) -> dict:
    return {
        "partId": "bench",
        "source": {"dataset": {"uri": str(src), "format": "webdataset"}},
        "filter": {"samplesPerShard": samples_per_shard},
        "download": {"resizeMode": "no", "outputFormat": "webdataset"},
        "output": {"uri": str(out)},
        "verify": False,
        "embeddings": {"model": model, "batchSize": batch},
    }


def cli(*args: str) -> list[str]:
    return [str(Path(common.PYTHON).parent / "laion-operator"), *args]


def project_cmd(spec_path: Path) -> list[str]:
    return cli("embed", str(spec_path))


def clip_retrieval_cmd(tars: list[Path], out: Path, model: str, batch: int, workers: int) -> list[str]:
    args = {"tars": [str(t) for t in tars], "out": str(out), "model": model, "batch": batch, "workers": workers}
    return [common.PYTHON, "-m", "bench.embeddings_bench", "clip-retrieval", json.dumps(args)]


def run_clip_retrieval(args: dict) -> None:
    """clip_inference as its CLI calls it (`clip-retrieval inference …`), imported as described above."""
    import importlib.util
    import types

    found = importlib.util.find_spec("clip_retrieval")  # locates the package without running its __init__
    if found is None or not found.submodule_search_locations:
        raise SystemExit("clip-retrieval is not installed (bench/requirements.txt)")
    package = types.ModuleType("clip_retrieval")
    package.__path__ = list(found.submodule_search_locations)
    sys.modules["clip_retrieval"] = package

    class SentenceTransformer:
        def __init__(self, *a, **k):
            raise RuntimeError("the bench runs clip_inference without multilingual CLIP (use_mclip=False)")

    placeholder = types.ModuleType("sentence_transformers")
    placeholder.SentenceTransformer = SentenceTransformer  # type: ignore[attr-defined]
    sys.modules.setdefault("sentence_transformers", placeholder)
    try:  # clip-anytorch reads `packaging` through pkg_resources, which setuptools 81+ no longer ships
        import pkg_resources  # noqa: F401 (only whether it imports)
    except ImportError:
        import packaging.version

        shim = types.ModuleType("pkg_resources")
        shim.packaging = packaging  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    from clip_retrieval.clip_inference.main import main

    tars = args["tars"]
    main(
        input_dataset=tars[0] if len(tars) == 1 else "{" + ",".join(tars) + "}",
        output_folder=args["out"],
        input_format="webdataset",
        batch_size=args["batch"],
        num_prepro_workers=args["workers"],
        enable_text=True,
        enable_image=True,
        enable_metadata=False,
        clip_model=args["model"],
        use_jit=False,
        distribution_strategy="sequential",
        enable_wandb=False,
    )


def read_embeddings(folder: Path, key_column: str) -> dict[str, np.ndarray]:
    """key → image embedding (float32) of an embeddings folder in clip-retrieval's layout."""
    import pyarrow.parquet as pq

    out: dict[str, np.ndarray] = {}
    for npy in sorted((folder / "img_emb").glob("img_emb_*.npy")):
        suffix = npy.stem.removeprefix("img_emb_")
        keys = pq.read_table(folder / "metadata" / f"metadata_{suffix}.parquet", columns=[key_column])
        emb = np.load(npy).astype(np.float32)
        for key, vector in zip(keys.column(key_column).to_pylist(), emb):
            out[str(key)] = vector
    return out


def compare(project_dir: Path, clip_dir: Path) -> dict:
    ours = read_embeddings(project_dir, "key")
    theirs = read_embeddings(clip_dir, "image_path")
    common_keys = sorted(set(ours) & set(theirs))
    cos = np.array([float(ours[k] @ theirs[k]) for k in common_keys]) if common_keys else np.zeros(1)
    return {"project": len(ours), "clip_retrieval": len(theirs), "shared": len(common_keys), "cosine": cos}


def bench(
    n: int,
    rounds: int,
    device: str = "cpu",
    batch: int | None = None,
    workers: int | None = None,
    dedup_n: int = 1_000_000,
    work: Path | None = None,
) -> tuple[str, list[str]]:
    import yaml

    from .latents_bench import Utilisation

    cuda = device.startswith("cuda")
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("[embeddings] --device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
    batch = batch or (256 if cuda else 32)
    workers = workers or min(os.cpu_count() or 1, 8)
    work = work or common.WORK / "embeddings"
    src, out, clip_out = work / "src", work / "out", work / "clip-retrieval"
    model = f"open_clip:{ARCH}/{build_model(work / 'model')}"
    # as many tars as clip-retrieval's preprocessing workers: webdataset refuses a worker without a shard
    tars = max(1, min(workers, n // batch))
    workers = tars
    print(f"[embeddings] rendering {n} JPEGs in {tars} tars, converting them", file=sys.stderr, flush=True)
    render(src, n, tars)
    shutil.rmtree(out, ignore_errors=True)
    spec_path = work / "part.yaml"
    spec = part_spec(src, out, model, batch, -(-n // tars))
    convert = {k: v for k, v in spec.items() if k != "embeddings"}
    (work / "convert.yaml").write_text(yaml.safe_dump(convert, sort_keys=False))
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    common.run(cli("run", str(work / "convert.yaml")), timeout=1800)
    out_tars = sorted(out.glob("*.tar"))
    env = common.env(**({} if cuda else {"CUDA_VISIBLE_DEVICES": ""}))  # clip_inference picks cuda if it sees one
    sides = {
        CLIP_RETRIEVAL: (clip_retrieval_cmd(out_tars, clip_out, model, batch, workers), clip_out),
        PROJECT: (project_cmd(spec_path), out / "embeddings"),
    }
    results: dict[str, list[common.Run]] = {s: [] for s in sides}
    utilisation: dict[str, list[float]] = {s: [] for s in sides}
    spans: list[float] = []
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # neither side always goes first
        for side in order:
            cmd, folder = sides[side]
            shutil.rmtree(folder, ignore_errors=True)
            with Utilisation(device) as gpu:
                result = common.run(cmd, timeout=3600, env=env, cwd=common.ROOT)
            results[side].append(result)
            if side == PROJECT:
                spans.append(shard_span(folder))
            if gpu.mean is not None:
                utilisation[side].append(gpu.mean)
            shown = f", GPU {gpu.mean:.0f} %" if gpu.mean is not None else ""
            print(
                f"[embeddings] {side:<32} round {r + 1}/{rounds}: {result.seconds:6.1f} s "
                f"({n / result.seconds:,.1f} samples/s, peak {common.mb(result.peak_rss)}{shown}), "
                f"load {common.load()}",
                file=sys.stderr,
                flush=True,
            )
    checked = compare(out / "embeddings", clip_out)
    dedup = measure_dedup(dedup_n, work)
    return report(n, tars, rounds, device, batch, workers, results, utilisation, checked, dedup, spans)


def shard_span(folder: Path) -> float:
    """First shard's start to last shard's end (the stage's shard tasks, after their model loads)."""
    stats = [json.loads(p.read_text()) for p in folder.glob("*_stats.json")]
    return max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats) if stats else 0.0


def report(
    n, tars, rounds, device, batch, workers, results, utilisation, checked, dedup, spans
) -> tuple[str, list[str]]:
    import torch

    seconds = {side: [r.seconds for r in runs] for side, runs in results.items()}
    median = {side: statistics.median(v) for side, v in seconds.items()}
    ratios = [c / p for c, p in zip(seconds[CLIP_RETRIEVAL], seconds[PROJECT])]
    ratio = statistics.median(ratios)
    rows = []
    for side, runs in results.items():
        util = f"{np.mean(utilisation[side]):.0f} %" if utilisation[side] else "n/a"
        rows.append(
            [
                side,
                f"{median[side]:.1f} s",
                f"{min(seconds[side]):.1f}–{max(seconds[side]):.1f} s",
                f"{n / median[side]:,.1f}",
                common.mb(int(statistics.median(r.peak_rss for r in runs))),
                f"{statistics.median(r.cpu for r in runs):.0f} s",
                util,
            ]
        )
    cos = checked["cosine"]
    same = checked["project"] == checked["clip_retrieval"] == checked["shared"] == n
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    text = [
        f"Embeddings on {name}: {n} JPEGs (320–640 px) in {tars} webdataset shards of a converted output, "
        f"open_clip {ARCH} with random weights from a local checkpoint, batch {batch} on both sides, "
        f"clip-retrieval with {workers} preprocessing workers, the project with its defaults; torch "
        f"{torch.__version__}. {rounds} rounds, the sides in turns (alternating which goes first); whole "
        f"commands; the ratio is the median of the rounds' ratios.",
        "",
        common.table(
            ["side", "median", "range", "samples/s", "peak memory", "CPU", "GPU utilisation"],
            rows,
        ),
        "",
        f"Ratio (clip-retrieval's seconds / the project's), per round: {', '.join(f'{x:.2f}×' for x in ratios)}; "
        f"median {ratio:.2f}×. Of the project's whole command, its shard tasks (first start to last end, "
        f"after their model loads) took {statistics.median(spans):.1f} s (median; "
        f"{n / statistics.median(spans):,.1f} samples/s): the rest is the CLI's and Ray's start and the loads.",
        f"Outputs: {checked['project']} image embeddings from the project, {checked['clip_retrieval']} from "
        f"clip-retrieval, {checked['shared']} keys on both; image-embedding cosine per key: min {cos.min():.4f}, "
        f"median {np.median(cos):.4f}. Preprocessing is the same steps: clip-retrieval applies open_clip's "
        "transform (torchvision's Resize, bicubic, on the PIL image, then CenterCrop), the stage does the same "
        "with PIL itself into uint8 and normalises with the model's mean and std on the device; both store "
        "float16.",
        "",
        dedup["text"],
    ]
    goals = [
        f"embeddings ≥ {GOAL_RATIO}× clip-retrieval's clip_inference ({device}, whole command): {ratio:.2f}× — "
        f"{common.goal(ratio >= GOAL_RATIO)}",
        f"embeddings outputs agree (same count, cosine ≥ {GOAL_COSINE} per key): {checked['shared']}/{n} keys, "
        f"min cosine {cos.min():.4f} — {common.goal(same and float(cos.min()) >= GOAL_COSINE)}",
    ]
    if utilisation[PROJECT]:
        mean = float(np.mean(utilisation[PROJECT]))
        goals.append(
            f"embeddings GPU utilisation ≥ {GOAL_UTILISATION:.0f} %: {mean:.0f} % — "
            f"{common.goal(mean >= GOAL_UTILISATION)}"
        )
    goals.append(dedup["goal"])
    return "\n".join(text), goals


# --- dedup's cost -------------------------------------------------------------------------------


def clustered(n: int, dim: int = 512, seed: int = 0, planted: float = 0.01):
    """n float16 unit vectors around n/100 centres (members' cosine about 0.5: not duplicates), and
    `planted`·n of them near-copies of another (cosine about 0.98); returns them and the planted pairs."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = np.empty((n, dim), np.float16)
    step = 65_536
    for a in range(0, n, step):
        b = min(n, a + step)
        v = centres[rng.integers(0, len(centres), b - a)] + rng.standard_normal(
            (b - a, dim), dtype=np.float32
        ) / np.sqrt(dim)
        emb[a:b] = v / np.linalg.norm(v, axis=1, keepdims=True)
    copies = rng.choice(n, int(n * planted) * 2, replace=False).reshape(-1, 2)
    for a in range(0, len(copies), step):
        src, dst = copies[a : a + step, 0], copies[a : a + step, 1]
        v = emb[src].astype(np.float32) + rng.standard_normal((len(src), dim), dtype=np.float32) * (0.2 / np.sqrt(dim))
        emb[dst] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return emb, copies


def run_dedup(n: int) -> None:
    """In its own process (its peak memory is the bench's measure): prints one JSON line."""
    from laion_operator.pipeline.dedup import EXACT_UP_TO, find
    from laion_operator.spec.model import Dedup

    emb, copies = clustered(n)
    keys = [f"{i:012d}" for i in range(n)]
    settings = Dedup(exact=False, perceptual=False, hamming_distance=0, semantic=True, similarity=0.95)
    start = time.perf_counter()
    table, counts = find(keys, [""] * n, np.zeros(n, np.int64), emb, settings)
    took = time.perf_counter() - start
    kept = dict(zip(table.column("key").to_pylist(), table.column("kept").to_pylist()))
    found = sum(1 for a, b in copies.tolist() if kept.get(keys[a], keys[a]) == kept.get(keys[b], keys[b]))
    print(
        json.dumps(
            {
                "seconds": took,
                "duplicates": counts["semantic"],
                "planted": len(copies),
                "found": found,
                "exact": n <= EXACT_UP_TO,
            }
        )
    )


def measure_dedup(n: int, work: Path) -> dict:
    if n <= 0:
        return {"text": "Dedup's cost: not measured (--embeddings-dedup 0).", "goal": "dedup's cost: not measured"}
    print(f"[embeddings] semantic dedup of {n:,} vectors", file=sys.stderr, flush=True)
    run = common.run([common.PYTHON, "-m", "bench.embeddings_bench", "dedup", str(n)], timeout=3600, cwd=common.ROOT)
    r = common.last_json(run.stdout)
    how = "pair by pair" if r["exact"] else "FAISS's inverted-file range search (approximate)"
    text = (
        f"Dedup's cost: pipeline/dedup.py's `find`, semantic only (similarity 0.95), over {n:,} float16 512-d "
        f"unit vectors around {max(1, n // 100):,} centres (cosine about 0.5 within a centre: not duplicates) "
        f"with {r['planted']:,} planted near-copies (cosine about 0.98), {how}: {r['seconds']:.1f} s "
        f"({n / r['seconds']:,.0f} vectors/s), peak memory {common.mb(run.peak_rss)} (the process, the "
        f"{n * 512 * 2 / 2**20:,.0f} MB of float16 vectors included); {r['duplicates']:,} duplicates, "
        f"{r['found']:,} of the {r['planted']:,} planted pairs found ({r['found'] / max(1, r['planted']):.1%})."
    )
    goal = (
        f"dedup's cost on {n:,} embeddings: {r['seconds']:.0f} s, peak {common.mb(run.peak_rss)}, "
        f"{r['found'] / max(1, r['planted']):.1%} of planted pairs found (measured; no goal set)"
    )
    return {"text": text, "goal": goal}


if __name__ == "__main__":
    if sys.argv[1] == "clip-retrieval":
        run_clip_retrieval(json.loads(sys.argv[2]))
    elif sys.argv[1] == "dedup":
        run_dedup(int(sys.argv[2]))
