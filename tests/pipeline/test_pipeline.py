"""The whole part on a real Ray cluster: output formats, failure reasons, resume, S3 output."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from laion_operator.pipeline.driver import run_part
from laion_operator.spec import PartSpec
from laion_operator.testbed.demo_data import write_metadata
from tests.support import outputs
from tests.support.failing_web import outcome_of
from tests.support.specs import mixed_metadata, partspec

TIMEOUT = 3.0  # a loaded 2-core machine answers a loopback request in well under this
MIX = {
    "ok": 0.6,
    "redirect": 0.05,
    "too_small": 0.05,
    "http_4xx": 0.08,
    "http_5xx": 0.05,
    "timeout": 0.04,
    "decode": 0.05,
    "opt_out": 0.05,
    "connection": 0.03,
}


def part(source, output, **download) -> PartSpec:
    return partspec(
        "3",
        source,
        output,
        samples_per_shard=40,
        download={
            "imageSize": 128,
            "resizeMode": "keep_ratio",
            "timeout": TIMEOUT,
            "maxInFlight": 16,
            "maxPerHost": 16,
            "minImageSize": 64,
            **download,
        },
    )


@pytest.fixture(scope="module")
def metadata(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("meta") / "part.parquet"
    table = write_metadata(path, 150, image_server.base_url, seed=11, failure_mix=MIX, slow_seconds=6)
    return path, table


def rows_by_url(table) -> dict[str, dict]:
    rows = {}
    for row in table.to_pylist():
        rows.setdefault(row["URL"], row)  # duplicates: the first row is the kept one
    return rows


def expected_reasons(urls) -> Counter:
    return Counter(outcome_of(u, timeout=TIMEOUT, min_image_size=64) for u in urls)


def test_webdataset_samples_agree_with_metadata(ray_driver, metadata, tmp_path):
    import webdataset as wds

    source, table = metadata
    summary = run_part(part(source, tmp_path / "wds"))
    meta = rows_by_url(table)

    samples = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "wds").glob("*.tar")), shardshuffle=False))
    assert len(samples) == summary["images"]["ok"] > 0
    assert len({s["__key__"] for s in samples}) == len(samples)
    for sample in samples:
        info = json.loads(sample["json"])
        row = meta[info["url"]]
        assert sample["txt"].decode() == (row["TEXT"] or "")
        assert info["caption"] == row["TEXT"]
        assert info["status"] == "success" and info["key"] == sample["__key__"]
        assert max(info["width"], info["height"]) <= 128 or min(info["width"], info["height"]) == 128
        assert sample["jpg"][:2] == b"\xff\xd8"
        assert outcome_of(info["url"], timeout=TIMEOUT, min_image_size=64) == "ok"

    with open(tmp_path / "wds" / "part_3_stats.csv") as f:
        index = list(csv.DictReader(f))
    per_tar = Counter(s["__url__"] for s in samples)
    assert {Path(r["path"]).name: int(r["num_samples"]) for r in index} == {Path(k).name: v for k, v in per_tar.items()}
    assert json.loads((tmp_path / "wds" / "part_3_summary.json").read_text()) == summary


def test_failure_reasons_match_the_servers_known_failures(ray_driver, metadata, tmp_path):
    source, _ = metadata
    spec = part(source, tmp_path / "out", outputFormat="parquet")
    summary = run_part(spec)
    shard_urls = [
        u
        for s in range(summary["shards"]["total"])
        for u in pq.read_table(tmp_path / "out" / "_laion" / "shards" / f"{s:05d}.parquet").column("url").to_pylist()
    ]
    want = expected_reasons(shard_urls)
    assert summary["images"]["ok"] == want.pop("ok")
    assert summary["images"]["failedByReason"] == dict(want)
    assert set(want) >= {"http_4xx", "http_5xx", "timeout", "decode", "opt_out", "too_small"}
    table = pq.read_table(tmp_path / "out" / "00000.parquet")
    for url, reason, status in zip(*(table.column(c).to_pylist() for c in ("url", "failure_reason", "status"))):
        assert (reason or "ok") == outcome_of(url, timeout=TIMEOUT, min_image_size=64)
        assert (status == "success") == (reason is None)
    assert table.column("jpg").null_count == table.num_rows - table.column("status").to_pylist().count("success")


@pytest.mark.parametrize("fmt", ["files", "parquet", "tfrecord"])
def test_every_output_format_is_readable(ray_driver, metadata, tmp_path, fmt):
    source, table = metadata
    out = tmp_path / fmt
    summary = run_part(part(source, out, outputFormat=fmt))
    meta = rows_by_url(table)
    ok = summary["images"]["ok"]
    assert ok > 0
    samples = outputs.images(out, fmt)  # read back as the format reads its shards
    assert len(samples) == ok
    for sample in samples:
        text = meta[sample.meta["url"]]["TEXT"]
        assert sample.image is not None and sample.image[:2] == b"\xff\xd8"
        if fmt == "parquet":  # the metadata's own caption column, beside the sample's txt
            assert sample.meta["caption"] == text
        else:  # the caption file (files) or feature (tfrecord)
            assert sample.caption == (text or "")
    if fmt == "files":
        with open(out / "part_3.csv", newline="") as f:
            index = list(csv.DictReader(f))
        assert len(index) == ok
        for entry in index:
            image = Path(entry["image_path"])
            info = json.loads(image.with_suffix(".json").read_text())
            assert image.read_bytes()[:2] == b"\xff\xd8"
            assert entry["caption"] == (meta[info["url"]]["TEXT"] or "")


def _cli(spec_file: Path, ray_cluster, **kw) -> subprocess.Popen:
    env = {**os.environ, **{k: v for k, v in ray_cluster.client_env().items() if k != "RAY_ADDRESS"}}
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "laion-operator"),
            "run",
            str(spec_file),
            "--ray-address",
            ray_cluster.address,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **kw,
    )


def test_killed_run_resumes_with_each_sample_exactly_once(ray_driver, image_server, tmp_path):
    source = tmp_path / "slow.parquet"
    # Half the images answer after a second: shards take long enough to be killed mid-way.
    mixed_metadata(source, 120, image_server, seed=4, slow_seconds=1, ok=0.5, timeout=0.5, http_4xx=0.0)
    out = tmp_path / "out"
    spec = part(source, out, timeout=5, maxInFlight=2, parallelism=2)
    spec = PartSpec.from_dict({**spec.to_dict(), "filter": {**spec.to_dict()["filter"], "samplesPerShard": 10}})
    spec_file = tmp_path / "part.yaml"
    spec_file.write_text(yaml.safe_dump(spec.to_dict()))

    first = _cli(spec_file, ray_driver)
    deadline = time.monotonic() + 240
    while not list(out.glob("*_stats.json")):
        assert first.poll() is None, first.stdout.read().decode()
        assert time.monotonic() < deadline, "no shard finished"
        time.sleep(0.2)
    time.sleep(1.5)  # let other shards get half-way
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    finished = {p.name: p.stat().st_mtime for p in out.glob("*_stats.json")}
    partial = {p.name for p in out.glob("*.tar")} - {n.replace("_stats.json", ".tar") for n in finished}
    total = json.loads((out / "_laion" / "filter.json").read_text())["shards"]
    assert len(finished) < total, "the run was not interrupted mid-way"

    second = _cli(spec_file, ray_driver)
    output = second.communicate(timeout=600)[0].decode()
    assert second.returncode == 0, output
    assert "resuming" in output or f"shards {total}/{total}" in output

    for name, mtime in finished.items():  # finished shards were not redone
        assert (out / name).stat().st_mtime == mtime
    kept = [
        u
        for s in range(total)
        for u in pq.read_table(out / "_laion" / "shards" / f"{s:05d}.parquet").column("url").to_pylist()
    ]
    written = outputs.metadata(out)
    assert sorted(r["url"] for r in written) == sorted(kept)  # each sample exactly once
    tar_keys = [s.key for s in outputs.images(out, "webdataset")]
    assert len(tar_keys) == len(set(tar_keys)) == sum(r["status"] == "success" for r in written)
    assert partial or len(finished) < total


def test_s3_output_has_the_local_layout(ray_driver, s3, metadata, tmp_path):
    source, _ = metadata
    bucket = s3.create_bucket("laion-out")
    s3.client().upload_file(str(source), bucket, "metadata/part.parquet")  # metadata read from S3 too
    local = run_part(part(source, tmp_path / "local"))
    remote = run_part(
        part(
            f"s3://{bucket}/metadata/part.parquet",
            {"uri": f"s3://{bucket}/parts/3", "endpoint": s3.endpoint, "region": "us-east-1", "pathStyle": True},
        )
    )
    local_files = sorted(str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*") if p.is_file())
    remote_files = [k.removeprefix("parts/3/") for k in s3.keys(bucket, "parts/3/")]
    assert remote_files == local_files
    for key in ("images", "metadata", "shards", "successRate"):
        assert remote[key] == local[key]
    body = s3.client().get_object(Bucket=bucket, Key="parts/3/part_3_stats.csv")["Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(body)))
    assert all(r["path"].startswith(f"s3://{bucket}/parts/3/") for r in rows)
    assert sum(int(r["num_samples"]) for r in rows) == remote["images"]["ok"]


def test_a_second_driver_with_the_same_credentials_leaves_this_drivers_workers_their_folder(ray_driver, s3):
    """Ray unpacks a working_dir over its old folder when its cache misses the package (two runtime
    envs naming one package set up at once, as parts started together with one Secret are): were two
    drivers' credentials packages one, the second could delete the folder this driver's workers run in
    and read their credentials from; shards then failed with FileNotFoundError from os.getcwd()."""
    import ray

    from laion_operator import credentials

    @ray.remote(num_cpus=0)
    class Worker:
        def folder(self) -> tuple[str, bool]:
            return os.getcwd(), os.path.isfile(credentials.FILE)

    worker = Worker.remote()
    folder, has_credentials = ray.get(worker.folder.remote(), timeout=120)
    assert has_credentials, folder  # the precondition: this driver's workers run in its package
    # Another driver on the same cluster with the same credentials in its environment, whose task has
    # a runtime env of its own (as each operator job has its own env_vars).
    other = (
        "import os, sys, ray\n"
        "from laion_operator.pipeline.runtime import ensure_ray\n"
        "ensure_ray(sys.argv[1])\n"
        "task = ray.remote(num_cpus=0, runtime_env={'env_vars': {'LAION_TEST_OTHER': '1'}})(lambda: os.getcwd())\n"
        "print(ray.get(task.remote(), timeout=120))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", other, ray_driver.address], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] != folder  # a package of its own
    assert ray.get(worker.folder.remote(), timeout=120) == (folder, True)
    ray.kill(worker)


def test_a_worker_whose_folder_was_unpacked_again_finds_it(tmp_path):
    """What a Ray worker sees after Ray unpacked its working_dir afresh: its folder deleted under it and
    a new one at the same path. A shard task enters the new one before any local delete (fsspec's rm
    asks for os.getcwd())."""
    folder = tmp_path / "_ray_pkg_0123"
    folder.mkdir()
    (tmp_path / "stale").mkdir()
    probe = (
        "import os, shutil, sys\n"
        "import fsspec\n"
        "from laion_operator.pipeline.runtime import enter_working_dir\n"
        "shutil.rmtree(os.getcwd()); os.mkdir(os.environ['PWD'])\n"
        "enter_working_dir()\n"
        "fsspec.filesystem('file').rm(sys.argv[1], recursive=True)\n"
        "print(os.getcwd())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "stale")],
        cwd=folder,
        env={**os.environ, "PWD": str(folder)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == str(folder)
    assert not (tmp_path / "stale").exists()
