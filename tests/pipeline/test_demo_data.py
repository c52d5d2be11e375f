"""Demo metadata looks like LAION's files and its URLs behave as outcome_of says."""

import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_operator.testbed.demo_data import DEFAULT_FAILURE_MIX, TINY_MAX, write_metadata
from laion_operator.testbed.fakeweb import parse_spec
from tests.support.failing_web import ImageServer, outcome_of

OPERATOR_DIR = Path(__file__).resolve().parents[2] / "operator"

BASE = "http://127.0.0.1:9999"
S, I, F = pa.string(), pa.int64(), pa.float64()  # noqa: E741 - one letter a type, to keep the schemas one line each
EXPECTED_SCHEMAS = {
    "aesthetics": [
        ("URL", S),
        ("TEXT", S),
        ("WIDTH", I),
        ("HEIGHT", I),
        ("similarity", F),
        ("hash", I),
        ("punsafe", F),
        ("pwatermark", F),
        ("AESTHETIC_SCORE", F),
    ],
    "laion-art": [
        ("URL", S),
        ("TEXT", S),
        ("WIDTH", I),
        ("HEIGHT", I),
        ("similarity", F),
        ("LANGUAGE", S),
        ("hash", I),
        ("pwatermark", F),
        ("punsafe", F),
        ("aesthetic", F),
    ],
    "lowercase": [
        ("url", S),
        ("caption", S),
        ("width", I),
        ("height", I),
        ("similarity", F),
        ("hash", I),
        ("punsafe", F),
        ("pwatermark", F),
        ("language", S),
        ("aesthetic", F),
    ],
}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """20k rows: enough for distributions to show, small enough to be quick."""
    path = tmp_path_factory.mktemp("demo") / "2B-en-4.5_0.parquet"
    return write_metadata(path, 20_000, BASE, seed=3, slow_seconds=3)


@pytest.mark.parametrize("variant", list(EXPECTED_SCHEMAS))
def test_columns_and_types_per_variant(tmp_path, variant):
    path = tmp_path / "m.parquet"
    table = write_metadata(path, 500, BASE, variant=variant)
    expected = pa.schema(EXPECTED_SCHEMAS[variant])
    assert table.schema == expected
    assert pq.read_schema(path).remove_metadata() == expected
    assert pq.read_table(path).equals(table)
    assert table.num_rows == 500


def test_language_distribution_per_variant(tmp_path):
    art = write_metadata(tmp_path / "a.parquet", 5000, BASE, variant="laion-art").column("LANGUAGE")
    low = write_metadata(tmp_path / "l.parquet", 5000, BASE, variant="lowercase").column("language")

    def share_en(col):
        return pc.sum(pc.equal(col, "en")).as_py() / len(col)

    assert 0.4 < share_en(art) < 0.65 and len(pc.unique(art)) > 10
    assert share_en(low) > 0.85


def test_deterministic_for_a_seed_and_independent_of_row_groups(tmp_path):
    a = write_metadata(tmp_path / "a.parquet", 3000, BASE, seed=7, row_group_size=1000)
    b = write_metadata(tmp_path / "b.parquet", 3000, BASE, seed=7, row_group_size=700)
    c = write_metadata(tmp_path / "c.parquet", 3000, BASE, seed=8)
    assert a.equals(b)
    assert not a.equals(c)
    meta = pq.ParquetFile(tmp_path / "b.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [700] * 4 + [200]


def test_streams_large_files_in_row_groups(tmp_path):
    path = tmp_path / "m.parquet"
    assert write_metadata(path, 600_000, BASE, row_group_size=250_000, return_table=False) is None
    meta = pq.ParquetFile(path).metadata
    assert meta.num_rows == 600_000
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [250_000, 250_000, 100_000]


def test_realistic_distributions(big):
    w = big.column("WIDTH").to_numpy(zero_copy_only=False)
    h = big.column("HEIGHT").to_numpy(zero_copy_only=False)
    short = np.fmin(w, h)
    assert 0.2 < np.nanmean(short < 512) < 0.8  # size filters matter
    assert np.nanmean((np.fmax(w, h) >= 200) & (np.fmax(w, h) <= 2000)) > 0.85
    aes = big.column("AESTHETIC_SCORE").drop_null().to_numpy()
    assert abs(aes.mean() - 5) < 0.05 and abs(aes.std() - 0.8) < 0.05
    punsafe = big.column("punsafe").drop_null().to_numpy()
    assert np.median(punsafe) < 0.05 and 0.01 < (punsafe > 0.9).mean() < 0.06
    pw = big.column("pwatermark").drop_null().to_numpy()
    assert pw.min() >= 0 and pw.max() <= 1 and 0.2 < pw.mean() < 0.5
    sim = big.column("similarity").drop_null().to_numpy()
    assert sim.min() >= 0.25 and sim.max() <= 0.45
    for name in ("TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE"):
        assert 0 < big.column(name).null_count < 0.01 * big.num_rows, name
    assert big.column("URL").null_count == 0
    assert len(pc.unique(big.column("hash"))) == big.num_rows


def test_duplicate_urls_are_rare_but_present(big):
    urls = big.column("URL").to_pylist()
    dup_share = 1 - len(set(urls)) / len(urls)
    assert 0.008 < dup_share < 0.025


def test_captions_contain_what_breaks_naive_csv(big):
    caps = [c for c in big.column("TEXT").to_pylist() if c is not None]
    assert 2 <= np.mean([len(c.split()) for c in caps]) <= 12
    for needle in [",", '"', "\n", "'"]:
        assert any(needle in c for c in caps), repr(needle)
    assert any(not c.isascii() for c in caps)


def test_failure_mix_matches_outcomes(big):
    urls = big.column("URL").to_pylist()
    got = Counter(outcome_of(u, timeout=2, min_image_size=TINY_MAX) for u in urls)
    mix = dict(DEFAULT_FAILURE_MIX)
    mix["ok"] += mix.pop("redirect")
    # A few honest rows are small enough to count as too_small too; the rest must match the mix.
    for outcome, fraction in mix.items():
        assert abs(got[outcome] / len(urls) - fraction) < 0.012, (outcome, got)
    assert sum("/redirect/" in u for u in urls) / len(urls) == pytest.approx(0.03, abs=0.008)
    assert Counter(outcome_of(u, timeout=5) for u in urls)["timeout"] == 0  # /slow/ waits 3 s


def test_declared_size_matches_url_for_most_served_images(big):
    hits = total = 0
    for url, w, h in zip(
        big.column("URL").to_pylist(), big.column("WIDTH").to_pylist(), big.column("HEIGHT").to_pylist()
    ):
        if "/img/" in url and w is not None and h is not None:
            spec = parse_spec(url.rsplit("/", 1)[1])
            total += 1
            hits += (spec.width, spec.height) == (w, h)
    assert 0.9 < hits / total < 0.99  # mostly equal; mismatches and tiny placeholders exist


def test_custom_mix_and_validation(tmp_path):
    t = write_metadata(tmp_path / "m.parquet", 2000, BASE + "/", failure_mix={"ok": 3, "connection": 1})
    got = Counter(outcome_of(u) for u in t.column("URL").to_pylist())
    assert set(got) == {"ok", "connection"} and 0.2 < got["connection"] / 2000 < 0.3
    assert all(u.startswith(BASE + "/") and "//img" not in u for u in t.column("URL").to_pylist())
    with pytest.raises(ValueError):
        write_metadata(tmp_path / "x.parquet", 10, BASE, failure_mix={"bogus": 1.0})
    with pytest.raises(ValueError):
        write_metadata(tmp_path / "x.parquet", 10, BASE, variant="nope")


def test_urls_behave_as_predicted_against_a_live_server(tmp_path):
    """img2dataset's own download function fetches every URL; failures land where outcome_of says."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports it; no network checks
    from img2dataset.downloader import download_image

    timeout = 1.5
    directives = ["noai", "noimageai", "noindex", "noimageindex"]

    def observe(url):
        _, stream, err = download_image((0, url), timeout, "img2dataset", directives)
        if err is not None:
            if "X-Robots-Tag" in err:
                return "opt_out"
            if err.startswith("HTTP Error 4"):
                return "http_4xx"
            if err.startswith("HTTP Error 5"):
                return "http_5xx"
            if "timed out" in err:
                return "timeout"
            if err.startswith("IncompleteRead"):
                return "decode"
            return "connection"
        try:
            img = Image.open(stream)
            img.load()
        except Exception:  # noqa: BLE001 - whatever Pillow raises, the image does not decode
            return "decode"
        return "too_small" if min(img.size) < TINY_MAX else "ok"

    with ImageServer() as server:
        table = write_metadata(
            tmp_path / "m.parquet",
            200,
            server.base_url,
            seed=2,
            slow_seconds=3,
            failure_mix={**DEFAULT_FAILURE_MIX, "connection": 0.02},
        )
        urls = table.column("URL").to_pylist()
        # Pre-rendered, so a busy machine's render time cannot turn an "ok" into a timeout.
        assert server.warm(urls) > 150
        with ThreadPoolExecutor(64) as pool:
            observed = list(pool.map(observe, urls))
    expected = [outcome_of(u, timeout=timeout, min_image_size=TINY_MAX) for u in urls]
    assert observed == expected
    assert {"ok", "http_4xx", "http_5xx", "timeout", "decode", "opt_out", "too_small"} <= set(expected)


def test_cli_writes_the_file(tmp_path):
    out = tmp_path / "laion-art.parquet"
    env = dict(os.environ, PYTHONPATH=str(OPERATOR_DIR))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "laion_operator.testbed.demo_data",
            str(out),
            "--rows",
            "1234",
            "--base-url",
            BASE,
            "--variant",
            "laion-art",
            "--seed",
            "5",
            "--mix",
            "ok=1",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    table = pq.read_table(out)
    assert table.num_rows == 1234 and "LANGUAGE" in table.column_names
    assert table.equals(
        write_metadata(tmp_path / "same.parquet", 1234, BASE, variant="laion-art", seed=5, failure_mix={"ok": 1})
    )
