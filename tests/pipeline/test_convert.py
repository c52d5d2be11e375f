"""Convert: existing datasets (webdataset tars, a files folder, images plus a captions JSONL) written
again in another output format, one Ray task per input shard."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from laion_operator.errors import InputError
from laion_operator.pipeline.driver import run_part
from laion_operator.spec import PartSpec


def jpeg(seed: int, size=(40, 30), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256)).save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    """An img2dataset-style shard: key.jpg, key.txt, key.json per sample."""
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for ext, data in (
                ("jpg", image),
                ("txt", caption.encode()),
                ("json", json.dumps({"key": key, "caption": caption, "url": f"http://x/{key}"}).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def tars(tmp_path):
    """Two webdataset shards from "elsewhere": 6 and 5 samples."""
    folder = tmp_path / "wds"
    folder.mkdir()
    samples = {}
    for shard, n in ((0, 6), (1, 5)):
        rows = [(f"{shard:05d}{i:04d}", jpeg(shard * 10 + i), f"caption {shard}-{i}") for i in range(n)]
        write_tar(folder / f"{shard:05d}.tar", rows)
        samples.update({key: (image, caption) for key, image, caption in rows})
    return folder, samples


def convert(source: dict, output: Path, fmt: str, part_id: str = "c", per_shard: int = 10000, **download):
    return PartSpec.from_dict(
        {
            "partId": part_id,
            "source": {"dataset": source},
            "output": {"uri": str(output)},
            "filter": {"samplesPerShard": per_shard},
            "download": {"outputFormat": fmt, "resizeMode": "no", "skipReencode": True, **download},
        }
    )


def read_tars(folder: Path) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False))


def test_webdataset_to_files_is_laion6m_extraction(ray_driver, tars, tmp_path):
    source, samples = tars
    out = tmp_path / "files"
    summary = run_part(convert({"uri": str(source)}, out, "files"))
    assert summary["verified"]["ok"], summary["verified"]
    assert summary["images"]["ok"] == summary["images"]["attempted"] == len(samples) == 11
    assert summary["shards"] == {"total": 2, "done": 2, "failed": 0}
    with open(out / "part_c.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert len(index) == len(samples)
    seen = set()
    for entry in index:
        image = Path(entry["image_path"])
        meta = json.loads(image.with_suffix(".json").read_text())
        original, caption = samples[meta["source_key"]]
        assert image.read_bytes() == original  # resizeMode no + skipReencode: the bytes are kept
        assert entry["caption"] == caption == image.with_suffix(".txt").read_text()
        assert meta["url"] == f"http://x/{meta['source_key']}"
        assert meta["source_file"] == str(source / f"{meta['source_key'][:5]}.tar")
        seen.add(meta["source_key"])
    assert seen == set(samples)

    # …and the files folder back into webdataset: every sample once, bytes and caption unchanged
    back = tmp_path / "back"
    summary = run_part(convert({"uri": str(out)}, back, "webdataset"))
    assert summary["verified"]["ok"] and summary["images"]["ok"] == len(samples)
    round_trip = read_tars(back)
    assert len(round_trip) == len(samples)
    by_caption = {caption: image for image, caption in samples.values()}
    assert {s["txt"].decode(): s["jpg"] for s in round_trip} == by_caption


@pytest.fixture
def journeydb(tmp_path):
    """micro_diffusion's JourneyDB layout: image folders and a JSONL of img_path / prompt."""
    root = tmp_path / "jdb"
    lines, images = [], {}
    for i in range(10):
        rel = f"{i % 3:03d}/{i:04d}.{'png' if i == 4 else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        data = jpeg(i, fmt="PNG" if i == 4 else "JPEG") if i != 7 else b"\xff\xd8 not really a jpeg"
        (root / rel).write_bytes(data)
        images[f"prompt {i}"] = data
        lines.append(json.dumps({"img_path": f"./{rel}", "prompt": f"prompt {i}", "Task2": {"Caption": "x"}}))
    (root / "train_anno.jsonl").write_text("\n".join(lines) + "\n")
    return root, images


def _cli(args: list[str], ray_cluster) -> subprocess.CompletedProcess:
    env = {**os.environ, **{k: v for k, v in ray_cluster.client_env().items() if k != "RAY_ADDRESS"}}
    return subprocess.run(
        [str(Path(sys.executable).parent / "laion-operator"), *args, "--ray-address", ray_cluster.address],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_images_and_captions_to_mds_from_the_cli(ray_driver, journeydb, tmp_path):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    root, images = journeydb
    out = tmp_path / "mds"
    done = _cli(
        [
            "convert",
            str(root),
            str(out),
            "--output-format",
            "mds",
            "--captions",
            "train_anno.jsonl",
            "--samples-per-shard",
            "4",
            "--part-id",
            "jdb",
        ],
        ray_driver,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified" in done.stdout
    summary = json.loads((out / "part_jdb_summary.json").read_text())
    assert summary["shards"]["total"] == 3  # 10 lines, 4 a shard
    assert summary["images"]["ok"] == 9 and summary["images"]["failedByReason"] == {"decode": 1}
    assert summary["verified"]["ok"]

    clean_stale_shared_memory()
    dataset = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    samples = [dataset[i] for i in range(len(dataset))]
    assert len(samples) == 9
    for sample in samples:
        if sample["caption"] == "prompt 4":  # a PNG becomes the JPEG the jpg column holds, same pixels
            assert sample["jpg"][:2] == b"\xff\xd8"
            assert Image.open(io.BytesIO(sample["jpg"])).size == Image.open(io.BytesIO(images["prompt 4"])).size
        else:  # JPEGs keep their bytes
            assert sample["jpg"] == images[sample["caption"]]
    # the broken image is a counted failure that names its file and sample
    import pyarrow.parquet as pq

    failed = [
        r for s in range(3) for r in pq.read_table(out / f"{s:05d}.parquet").to_pylist() if r["status"] != "success"
    ]
    assert len(failed) == 1
    assert "train_anno.jsonl line 8" in failed[0]["error_message"] and "0007" in failed[0]["error_message"]


def test_a_conversion_resumes_per_shard_with_each_sample_once(ray_driver, journeydb, tmp_path):
    root, images = journeydb
    out = tmp_path / "wds"
    spec = convert({"uri": str(root), "captions": "train_anno.jsonl"}, out, "webdataset", per_shard=3)
    first = run_part(spec)
    assert first["shards"]["total"] == 4
    kept = {s: (out / f"{s:05d}_stats.json").stat().st_mtime for s in (0, 1, 3)}
    (out / "00002_stats.json").unlink()  # shard 2 as an interrupted attempt leaves it
    second = run_part(spec)
    assert {s: (out / f"{s:05d}_stats.json").stat().st_mtime for s in (0, 1, 3)} == kept
    samples = read_tars(out)
    assert sorted(s["txt"].decode() for s in samples) == sorted(c for c in images if c != "prompt 7")
    assert second["images"] == first["images"] and second["verified"]["ok"]


def test_bad_inputs_name_the_file_and_the_sample(ray_driver, journeydb, tars, tmp_path):
    root, _ = journeydb
    anno = root / "train_anno.jsonl"
    lines = anno.read_text().splitlines()
    lines[5] = json.dumps({"image": "000/0005.jpg", "prompt": "p"})
    anno.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"train_anno\.jsonl line 6: no 'img_path' field"):
        run_part(convert({"uri": str(root), "captions": "train_anno.jsonl"}, tmp_path / "a", "mds"))
    done = _cli(
        ["convert", str(root), str(tmp_path / "b"), "--output-format", "parquet", "--captions", "train_anno.jsonl"],
        ray_driver,
    )
    assert done.returncode == 2 and "train_anno.jsonl line 6" in done.stderr

    folder, _ = tars
    write_tar(folder / "00002.tar", [("000020000", jpeg(1), "fine")])
    with tarfile.open(folder / "00002.tar", "a") as tar:  # a sample with a caption and no image
        info = tarfile.TarInfo("000020001.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"lost"))
    # found inside a shard's Ray task: bad input all the same (a retry cannot help), file and sample named
    with pytest.raises(InputError, match=r"00002\.tar: sample 000020001: no image"):
        run_part(convert({"uri": str(folder)}, tmp_path / "c", "webdataset", shardRetries=0))
    progress = json.loads((tmp_path / "c" / "_laion" / "progress.json").read_text())
    assert progress["phase"] == "Failed" and "000020001" in progress["message"]

    with pytest.raises(InputError, match="spec.source: give exactly one of urls"):
        PartSpec.from_dict(
            {
                "partId": "x",
                "source": {"urls": ["a.parquet"], "dataset": {"uri": str(folder)}},
                "output": {"uri": str(tmp_path / "d")},
            }
        )


def test_dry_run_of_a_conversion_lists_its_input_shards(tars, tmp_path):
    import yaml

    folder, _ = tars
    spec_file = tmp_path / "part.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "partId": "c",
                "source": {"dataset": {"uri": str(folder)}},
                "output": {"uri": str(tmp_path / "out")},
                "download": {"outputFormat": "mds"},
            }
        )
    )
    done = subprocess.run(
        [str(Path(sys.executable).parent / "laion-operator"), "run", str(spec_file), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"convert {folder} (webdataset) in 2 shards" in done.stdout and "as mds" in done.stdout
