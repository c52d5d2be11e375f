"""outputFormat mds: written by streaming's MDSWriter, read back by streaming, locally and from S3."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion_operator.pipeline.driver import run_part
from laion_operator.spec import PartSpec
from laion_operator.testbed.demo_data import write_metadata
from tests.support.specs import part_dict

MIX = {"ok": 0.85, "http_4xx": 0.1, "decode": 0.05}


@pytest.fixture(scope="module")
def metadata(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("mds-meta") / "part.parquet"
    table = write_metadata(path, 60, image_server.base_url, seed=5, failure_mix=MIX, slow_seconds=0)
    return path, table


def mds_part(source, output, **download) -> PartSpec:
    # a small size limit: several MDS files per shard, so the index and the stats CSV list many
    return PartSpec.from_dict(part_dict(source, output, outputFormat="mds", mdsShardSizeLimit=20000, **download))


def stream(local: Path, remote: str | None = None) -> list[dict]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    dataset = StreamingDataset(local=str(local), remote=remote, shuffle=False, batch_size=1)
    return [dataset[i] for i in range(len(dataset))]


def metadata_rows(fs_open, names) -> dict[str, dict]:
    """Every successful sample's metadata row (the shards' .parquet), by key."""
    rows = {}
    for name in names:
        with fs_open(name) as f:
            rows.update({r["key"]: r for r in pq.read_table(f).to_pylist() if r["status"] == "success"})
    return rows


def assert_samples_equal_rows(samples, rows, source_table):
    source = {}
    for row in source_table.to_pylist():
        source.setdefault(row["URL"], row)
    assert len(samples) == len(rows) > 0
    assert sorted(s["key"] for s in samples) == sorted(rows)
    for sample in samples:
        row = rows[sample["key"]]
        assert sample["jpg"][:2] == b"\xff\xd8"
        assert sample["caption"] == (row["caption"] or "") == (source[row["url"]]["TEXT"] or "")
        for name, value in row.items():
            if name not in ("key", "caption"):
                assert sample[name] == value, name


def test_mds_samples_equal_their_metadata_rows(ray_driver, metadata, tmp_path):
    from streaming.base.util import merge_index

    source, table = metadata
    out = tmp_path / "mds"
    summary = run_part(mds_part(source, out))
    assert summary["verified"]["ok"], summary["verified"]
    shards = summary["shards"]["total"]
    assert shards == 3

    rows = metadata_rows(lambda n: open(out / n, "rb"), [f"{s:05d}.parquet" for s in range(shards)])
    assert len(rows) == summary["images"]["ok"]
    assert_samples_equal_rows(stream(out), rows, table)

    # part_<id>_stats.csv lists every MDS file with its samples, as the shards' own indexes say
    with open(out / "part_7_stats.csv") as f:
        listed = {Path(r["path"]).relative_to(out).as_posix(): int(r["num_samples"]) for r in csv.DictReader(f)}
    indexed = {
        f"{s:05d}/{e['raw_data']['basename']}": e["samples"]
        for s in range(shards)
        for e in json.loads((out / f"{s:05d}" / "index.json").read_text())["shards"]
    }
    assert listed == indexed and len(listed) > shards
    assert all((out / name).is_file() for name in listed)

    # the root index is what streaming's own merge_index makes of the shards' folders (pointed at the
    # output itself it would take every .json below it, _stats.json and _laion/ included)
    ours = json.loads((out / "index.json").read_text())
    copy = tmp_path / "copy"
    for s in range(shards):
        shutil.copytree(out / f"{s:05d}", copy / f"{s:05d}")
    merge_index(str(copy), keep_local=True)
    theirs = json.loads((copy / "index.json").read_text())

    def by_file(index):
        return sorted(index["shards"], key=lambda e: e["raw_data"]["basename"])

    assert by_file(ours) == by_file(theirs)


def test_mds_on_s3_reads_back_through_streaming(ray_driver, s3, metadata, tmp_path, monkeypatch):
    source, table = metadata
    bucket = s3.create_bucket("laion-mds")
    summary = run_part(
        mds_part(
            source, {"uri": f"s3://{bucket}/parts/7", "endpoint": s3.endpoint, "region": "us-east-1", "pathStyle": True}
        )
    )
    assert summary["verified"]["ok"], summary["verified"]
    keys = s3.keys(bucket, "parts/7/")
    assert "parts/7/index.json" in keys and "parts/7/00000/index.json" in keys
    assert any(k.startswith("parts/7/00002/shard.") and k.endswith(".mds") for k in keys)

    client = s3.client()
    rows = metadata_rows(
        lambda n: io.BytesIO(client.get_object(Bucket=bucket, Key=f"parts/7/{n}")["Body"].read()),
        [f"{s:05d}.parquet" for s in range(summary["shards"]["total"])],
    )
    # a trainer's reader: streaming's own S3 client, told the endpoint the way streaming is told
    monkeypatch.setenv("S3_ENDPOINT_URL", s3.endpoint)
    samples = stream(tmp_path / "cache", remote=f"s3://{bucket}/parts/7")
    assert_samples_equal_rows(samples, rows, table)


def test_a_redone_mds_shard_holds_each_sample_once(ray_driver, metadata, tmp_path):
    source, table = metadata
    out = tmp_path / "mds"
    spec = mds_part(source, out)
    first = run_part(spec)
    kept = {s: (out / f"{s:05d}_stats.json").stat().st_mtime for s in (0, 2)}
    # shard 1 as an interrupted attempt leaves it: no stats, a stray MDS file in its folder
    (out / "00001_stats.json").unlink()
    (out / "00001" / "shard.00099.mds").write_bytes(b"half a shard")

    second = run_part(spec)
    assert second["verified"]["ok"], second["verified"]
    assert {s: (out / f"{s:05d}_stats.json").stat().st_mtime for s in (0, 2)} == kept
    assert not (out / "00001" / "shard.00099.mds").exists()
    samples = stream(out)
    assert len(samples) == len({s["key"] for s in samples}) == first["images"]["ok"] == second["images"]["ok"]
