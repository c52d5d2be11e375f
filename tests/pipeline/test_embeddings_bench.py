"""The embeddings benchmark's comparator (`python -m bench --only embeddings`): clip-retrieval's own
clip_inference, as the bench runs it, writes every sample of a webdataset tar with the image
embeddings open_clip's own forward pass gives for the same checkpoint; and the dedup cost's data
has its planted pairs found by the project's semantic dedup."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    from bench.__main__ import ensure_python_tools
    from bench.embeddings_bench import build_model

    ensure_python_tools(no_deps=True)  # clip-retrieval is the bench's, not setup's: installed as the bench does

    return build_model(tmp_path_factory.mktemp("model"))


def test_clip_retrievals_inference_runs_as_the_bench_runs_it(tmp_path, vit):
    import open_clip
    import torch
    from PIL import Image

    from bench import common
    from bench.embeddings_bench import ARCH, clip_retrieval_cmd, read_embeddings, render

    render(tmp_path / "src", 6, 1)
    out = tmp_path / "clip-retrieval"
    model = f"open_clip:{ARCH}/{vit}"
    env = common.env(CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        clip_retrieval_cmd([tmp_path / "src" / "00000.tar"], out, model, 4, 1),
        cwd=common.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = read_embeddings(out, "image_path")
    assert sorted(theirs) == [f"{i:09d}" for i in range(6)]

    import io
    import tarfile

    reference, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(vit))
    with tarfile.open(tmp_path / "src" / "00000.tar") as tar:
        data = tar.extractfile("000000003.jpg").read()
    with torch.no_grad():
        want = reference.eval().encode_image(preprocess(Image.open(io.BytesIO(data)).convert("RGB"))[None])[0]
    want = (want / want.norm()).numpy()
    assert float(want @ theirs["000000003"]) >= 0.999


def test_the_dedup_costs_planted_pairs_are_what_semantic_dedup_finds():
    from bench.embeddings_bench import clustered
    from laion_operator.pipeline.dedup import find
    from laion_operator.spec.model import Dedup

    emb, copies = clustered(5000, seed=3)
    assert emb.dtype == np.float16 and len(copies) == 50
    norms = np.linalg.norm(emb.astype(np.float32), axis=1)
    assert np.allclose(norms, 1, atol=1e-2)
    settings = Dedup(exact=False, perceptual=False, hamming_distance=0, semantic=True, similarity=0.95)
    keys = [f"{i:06d}" for i in range(len(emb))]
    table, counts = find(keys, [""] * len(keys), np.zeros(len(keys), np.int64), emb, settings)
    kept = dict(zip(table.column("key").to_pylist(), table.column("kept").to_pylist()))
    pairs = {tuple(sorted((keys[a], keys[b]))) for a, b in copies.tolist()}
    assert all(kept.get(a, a) == kept.get(b, b) for a, b in pairs)
    assert counts["semantic"] == len(pairs)  # the centres' members (cosine about 0.5) are not duplicates
