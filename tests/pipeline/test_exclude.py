"""Removal lists (`filter.exclude`): every accepted shape, from a local path, S3 and HTTP, dropped in the
filter and counted as `droppedBy.excluded`, each remaining row exactly once; bad lists named."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from laion_operator.contract import fingerprint
from laion_operator.pipeline.exclude import ExclusionListError
from laion_operator.pipeline.filter import plan, run_filter
from laion_operator.spec import PartSpec
from laion_operator.storage import Store
from laion_operator.testbed.demo_data import write_metadata
from tests.support.services import free_port

BASE = "http://127.0.0.1:9"  # never contacted: the filter reads metadata only
FILTER = {"minWidth": 300, "maxPunsafe": 0.9, "samplesPerShard": 250}
CLI = str(Path(sys.executable).parent / "laion-operator")


def sha(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    path = tmp_path_factory.mktemp("meta") / "part.parquet"
    return path, write_metadata(path, 4000, BASE, seed=3).to_pandas()


def listed_urls(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Two disjoint sets of the file's distinct URLs (~1 in 7 each), some failing the other conditions."""
    urls = sorted(df["URL"].dropna().unique())
    return urls[::7], urls[3::7]


def expected(df: pd.DataFrame, listed: set[str]) -> tuple[set[str], int]:
    """Independently: the URLs the filter must keep, and the rows `excluded` must count (rows that pass
    the column conditions and are listed; counted before the dedupe)."""
    ok = (
        df["URL"].notna()
        & (df["URL"].str.len() > 0)
        & (df["WIDTH"] >= FILTER["minWidth"]).fillna(False)
        & (df["punsafe"] <= FILTER["maxPunsafe"]).fillna(False)
    ).astype(bool)
    survivors = df[ok]
    hit = survivors["URL"].isin(listed)
    return set(survivors[~hit]["URL"]), int(hit.sum())


def spec_for(source: Path, out, exclude: list[str], **output) -> PartSpec:
    return PartSpec.from_dict(
        {
            "partId": "x",
            "source": {"urls": [str(source)]},
            "filter": {**FILTER, "exclude": exclude},
            "output": {"uri": str(out), **output},
        }
    )


def shard_urls(store: Store, shards: int) -> list[str]:
    urls = []
    for shard in range(shards):
        with store.fs.open(store.path("_laion/shards", f"{shard:05d}.parquet"), "rb") as f:
            urls += pq.read_table(f).column("url").to_pylist()
    return urls


def check_run(spec: PartSpec, df: pd.DataFrame, listed: set[str]) -> None:
    keep, excluded = expected(df, listed)
    store = Store(spec.output)
    result = run_filter(spec, store)
    assert result.dropped_by["excluded"] == excluded > 0
    urls = shard_urls(store, result.shards)
    assert len(urls) == len(set(urls)), "a URL was written into the shards twice"
    assert set(urls) == keep
    assert not set(urls) & listed
    assert result.rows_read == len(df)
    assert result.rows_kept + sum(result.dropped_by.values()) == len(df)


def write_lists(tmp: Path, by_url: list[str], by_hash: list[str]) -> dict[str, list[Path]]:
    """The same entries in each accepted shape: URLs in one file, hashes in another (or one file, both)."""
    text = tmp / "takedowns.txt"
    text.write_text(
        "# takedown requests\n\n"
        + "\n".join(f"  {u}  " for u in by_url)
        + "\n"
        + "\n".join(sha(u).upper() for u in by_hash[:5])
        + "\n"
        + "\n".join(sha(u) for u in by_hash[5:])
    )
    gz = tmp / "takedowns.txt.gz"
    gz.write_bytes(gzip.compress(text.read_bytes()))
    zst = tmp / "takedowns.txt.zst"
    with pa.CompressedOutputStream(str(zst), "zstd") as out:
        out.write(text.read_bytes())
    csv_urls = tmp / "urls.csv"
    pd.DataFrame({"id": range(len(by_url)), "URL": by_url}).to_csv(csv_urls, index=False)
    csv_hashes = tmp / "optout.csv"
    pd.DataFrame({"url_sha256": [sha(u) for u in by_hash]}).to_csv(csv_hashes, index=False)
    pq_both = tmp / "relaion-diff.parquet"
    pq.write_table(
        pa.table(
            {"url": by_url + [None] * len(by_hash), "url_sha256": [None] * len(by_url) + [sha(u) for u in by_hash]}
        ),
        pq_both,
    )
    pq_digest = tmp / "digests.parquet"
    pq.write_table(
        pa.table({"sha256": pa.array([hashlib.sha256(u.encode()).digest() for u in by_hash + by_url], pa.binary(32))}),
        pq_digest,
    )
    return {
        "text": [text],
        "text.gz": [gz],
        "text.zst": [zst],
        "csv": [csv_urls, csv_hashes],
        "parquet": [pq_both],
        "parquet digests": [pq_digest],
    }


@pytest.mark.parametrize("shape", ["text", "text.gz", "text.zst", "csv", "parquet", "parquet digests"])
def test_each_shape_drops_listed_urls_and_counts_them(tmp_path, metadata, shape):
    source, df = metadata
    by_url, by_hash = listed_urls(df)
    lists = write_lists(tmp_path, by_url, by_hash)[shape]
    check_run(spec_for(source, tmp_path / "out", [str(p) for p in lists]), df, set(by_url) | set(by_hash))


def test_lists_from_s3_and_http(tmp_path, metadata, s3):
    source, df = metadata
    by_url, by_hash = listed_urls(df)
    lists = write_lists(tmp_path, by_url, by_hash)
    bucket = s3.create_bucket("removal-lists")
    s3.client().upload_file(str(lists["csv"][0]), bucket, "lists/urls.csv")
    served = tmp_path / "served"
    served.mkdir()
    (served / "optout.txt").write_bytes(lists["text"][0].read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        exclude = [f"s3://{bucket}/lists/urls.csv", f"http://127.0.0.1:{server.server_address[1]}/optout.txt"]
        spec = spec_for(source, f"s3://{bucket}/out", exclude, endpoint=s3.endpoint, region="us-east-1", pathStyle=True)
        check_run(spec, df, set(by_url) | set(by_hash))
    finally:
        server.shutdown()
        server.server_close()


def test_excluded_count_without_dedupe_or_shuffle_counts_every_listed_row(tmp_path, metadata):
    source, df = metadata
    by_url, _ = listed_urls(df)
    lists = write_lists(tmp_path, by_url, [])
    spec = PartSpec.from_dict(
        {
            "partId": "x",
            "source": {"urls": [str(source)]},
            "filter": {**FILTER, "exclude": [str(lists["text"][0])], "dedupeUrls": False, "shuffle": False},
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    keep, excluded = expected(df, set(by_url))
    store = Store(spec.output)
    result = run_filter(spec, store)
    assert result.dropped_by["excluded"] == excluded
    assert set(shard_urls(store, result.shards)) == keep
    assert plan(spec).dropped_by["excluded"] == excluded


def test_exclude_is_part_of_the_fingerprint_and_unset_changes_nothing(tmp_path, metadata):
    source, _ = metadata
    plain = PartSpec.from_dict({"partId": "x", "source": {"urls": [str(source)]}, "output": {"uri": "o"}})
    assert "exclude" not in plain.to_dict()["filter"]  # outputs filtered before the option resume as before
    a = spec_for(source, "o", [str(tmp_path / "a.txt")])
    b = spec_for(source, "o", [str(tmp_path / "b.txt")])
    assert len({fingerprint(plain), fingerprint(a), fingerprint(b)}) == 3


def test_bad_lists_are_named_with_the_line_or_column(tmp_path, metadata):
    source, _ = metadata
    cases = {}
    text = tmp_path / "list.txt"
    text.write_text("https://a.example/1.jpg\n# ok\nnot a url\n")
    cases[text] = ["list.txt", "line 3", "'not a url'"]
    csv = tmp_path / "list.csv"
    csv.write_text("url_sha256\n" + sha("x") + "\n" + "abc123\n")
    cases[csv] = ["list.csv", "line 3", "url_sha256", "'abc123'"]
    laion = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"hash": [1, 2], "caption": ["a", "b"]}), laion)
    cases[laion] = ["laion.parquet", "`hash` column", "hash, caption"]
    short = tmp_path / "short.parquet"
    pq.write_table(pa.table({"sha256": [b"\x01" * 32, b"\x02" * 20]}), short)
    cases[short] = ["short.parquet", "row 2", "20-byte"]
    missing = tmp_path / "missing.csv"
    cases[missing] = ["missing.csv", "no such removal list"]
    binary = tmp_path / "list.lst"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    cases[binary] = ["list.lst", "not UTF-8"]
    for path, words in cases.items():
        with pytest.raises(ExclusionListError) as err:
            run_filter(
                spec_for(source, tmp_path / f"out-{path.name}", [str(path)]),
                Store(spec_for(source, tmp_path / f"out-{path.name}", []).output),
            )
        for word in words:
            assert word in str(err.value), (path, str(err.value))


def test_dry_run_plan_shows_the_excluded_rows(tmp_path, metadata):
    source, df = metadata
    by_url, by_hash = listed_urls(df)
    lists = write_lists(tmp_path, by_url, by_hash)
    part = tmp_path / "part.yaml"
    part.write_text(
        yaml.safe_dump(
            {
                "partId": "x",
                "source": {"urls": [str(source)]},
                "filter": {**FILTER, "exclude": [str(p) for p in lists["csv"]]},
                "output": {"uri": str(tmp_path / "out")},
            }
        )
    )
    _, excluded = expected(df, set(by_url) | set(by_hash))
    done = subprocess.run([CLI, "run", "--dry-run", str(part)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{excluded:>10,} dropped by excluded" in done.stdout
    assert not (tmp_path / "out").exists()

    (tmp_path / "bad.txt").write_text("nonsense\n")
    part.write_text(
        yaml.safe_dump(
            {
                "partId": "x",
                "source": {"urls": [str(source)]},
                "filter": {"exclude": [str(tmp_path / "bad.txt")]},
                "output": {"uri": str(tmp_path / "out")},
            }
        )
    )
    done = subprocess.run([CLI, "run", "--dry-run", str(part)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "bad.txt: line 1" in done.stderr, (done.returncode, done.stderr)
