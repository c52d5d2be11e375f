"""Verify: every shard read back with its format's own reader, every image decoded, counts compared;
and the laion5B guide's webdataset loader over the demo's output."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from laion_operator.pipeline.driver import PartFailed, run_part
from laion_operator.spec import PartSpec
from laion_operator.testbed.demo import demo_spec
from laion_operator.testbed.demo_data import write_metadata
from tests.support.specs import loopback, part_dict

MIX = {"ok": 0.9, "http_4xx": 0.1}


@pytest.fixture(scope="module")
def metadata(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("verify-meta") / "part.parquet"
    write_metadata(path, 40, image_server.base_url, seed=9, failure_mix=MIX, slow_seconds=0)
    return path


def verify_cli(output: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "laion-operator"), "verify", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def rewrite_tar(path: Path, change) -> None:
    """The tar again, its members passed through `change(name, data)` (None drops a member)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def break_shard(out: Path, fmt: str) -> None:
    """Shard 1 loses a sample, the way a bad copy or a half-written shard would."""
    if fmt == "webdataset":
        last = sorted(n for n in tarfile.open(out / "00001.tar").getnames() if n.endswith(".jpg"))[-1]
        rewrite_tar(out / "00001.tar", lambda name, data: None if name.split(".")[0] == last.split(".")[0] else data)
    elif fmt == "files":
        sorted((out / "00001").glob("*.jpg"))[-1].unlink()
    elif fmt == "mds":
        shutil.rmtree(out / "00001")
    else:
        (out / f"00001.{fmt}").unlink()


@pytest.mark.parametrize("fmt", ["webdataset", "files", "parquet", "tfrecord", "mds"])
def test_every_format_reads_back_and_a_missing_sample_names_its_shard(ray_driver, metadata, tmp_path, fmt):
    out = tmp_path / fmt
    summary = run_part(PartSpec.from_dict(part_dict(metadata, out, outputFormat=fmt)))
    verified = summary["verified"]
    assert verified["ok"], verified
    assert verified["samples"] == verified["imagesDecoded"] == summary["images"]["ok"] > 0
    assert verified["shards"] == summary["shards"]["total"] == 2

    break_shard(out, fmt)
    done = verify_cli(out)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "NOT verified" in done.stdout and "00001" in done.stdout
    after = json.loads((out / "part_7_summary.json").read_text())["verified"]
    assert not after["ok"] and after["badShards"] == [1]
    assert all("00000" not in p for p in after["problems"])


def test_a_mismatch_fails_the_part_and_a_rerun_redoes_the_shard(ray_driver, metadata, tmp_path):
    out = tmp_path / "wds"
    spec = PartSpec.from_dict(part_dict(metadata, out))
    first = run_part(spec)
    broken = sorted(n for n in tarfile.open(out / "00001.tar").getnames() if n.endswith(".jpg"))[0]
    rewrite_tar(out / "00001.tar", lambda name, data: data[: len(data) // 3] if name == broken else data)

    with pytest.raises(PartFailed, match=rf"00001\.tar: sample {broken.split('.')[0]}: image does not decode"):
        run_part(spec)  # every shard is finished: only annotate and verify run
    progress = json.loads((out / "_laion" / "progress.json").read_text())
    assert progress["phase"] == "Failed" and not progress["verified"]["ok"]
    assert progress["verified"]["badShards"] == [1]
    assert not (out / "00001_stats.json").exists() and (out / "00000_stats.json").exists()

    third = run_part(spec)
    assert third["verified"]["ok"] and third["images"] == first["images"]


def test_the_laion5b_loader_reads_the_demo_output(ray_driver, image_server, tmp_path):
    import numpy as np
    import torch
    import webdataset as wds
    from torch.utils.data import DataLoader

    metadata = tmp_path / "demo.parquet"
    write_metadata(metadata, 300, image_server.base_url, variant="aesthetics", seed=0)
    data = demo_spec(metadata, tmp_path / "dataset")
    data["download"] = loopback({**data["download"], "imageSize": 64})
    summary = run_part(PartSpec.from_dict(data))
    assert summary["verified"]["ok"] and summary["images"]["ok"] > 10

    with open(tmp_path / "dataset" / "part_0_stats.csv") as f:
        urls = [row["path"] for row in csv.DictReader(f)]

    def filter_dataset(item):  # the guide's filter: samples with both an image and a caption
        return "txt" in item and "jpg" in item

    def preprocess(item):
        image = item["jpg"].convert("RGB").resize((32, 32))
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), item["txt"]

    dataset = wds.WebDataset(urls, shardshuffle=False).select(filter_dataset).decode("pil").map(preprocess)
    images, captions = 0, []
    for batch_images, batch_captions in DataLoader(dataset, batch_size=8, num_workers=0):
        assert batch_images.shape[1:] == (3, 32, 32) and batch_images.dtype == torch.uint8
        images += batch_images.shape[0]
        captions += list(batch_captions)
    assert images == len(captions) == summary["images"]["ok"]
    assert all(isinstance(c, str) for c in captions)


def test_the_verified_condition_comes_from_the_persisted_progress(ray_driver, metadata, tmp_path):
    """What the operator reads (contract.Progress from progress.json) says whether the part verified."""
    from laion_operator.contract import Progress
    from laion_operator.control.parts import verified_condition

    out = tmp_path / "wds"
    run_part(PartSpec.from_dict(part_dict(metadata, out)))
    progress = Progress.from_json(json.loads((out / "_laion" / "progress.json").read_text()))
    assert verified_condition(Progress(part_id="7"), []) is None  # before the verify stage ran
    good = verified_condition(progress, [])
    assert good["type"] == "Verified" and good["status"] == "True" and good["reason"] == "ShardsReadBack"

    (out / "00000.tar").unlink()
    assert verify_cli(out).returncode == 1
    progress = Progress.from_json(json.loads((out / "_laion" / "progress.json").read_text()))
    bad = verified_condition(progress, [good])
    assert bad["status"] == "False" and bad["reason"] == "ShardMismatch" and "00000.tar" in bad["message"]
