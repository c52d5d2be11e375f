"""The filter stage against an independent pandas computation, for each LAION column variant."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from laion_operator.pipeline.columns import ColumnError
from laion_operator.pipeline.filter import MetadataError, plan, run_filter
from laion_operator.spec import PartSpec
from laion_operator.storage import Store
from laion_operator.testbed.demo_data import write_metadata

BASE = "http://127.0.0.1:9"  # never contacted: the filter reads metadata only
LOGICAL = {
    "aesthetics": {
        "url": "URL",
        "caption": "TEXT",
        "width": "WIDTH",
        "height": "HEIGHT",
        "punsafe": "punsafe",
        "pwatermark": "pwatermark",
        "aesthetic": "AESTHETIC_SCORE",
        "similarity": "similarity",
    },
    "laion-art": {
        "url": "URL",
        "caption": "TEXT",
        "width": "WIDTH",
        "height": "HEIGHT",
        "punsafe": "punsafe",
        "pwatermark": "pwatermark",
        "aesthetic": "aesthetic",
        "similarity": "similarity",
        "language": "LANGUAGE",
    },
    "lowercase": {
        "url": "url",
        "caption": "caption",
        "width": "width",
        "height": "height",
        "punsafe": "punsafe",
        "pwatermark": "pwatermark",
        "aesthetic": "aesthetic",
        "similarity": "similarity",
        "language": "language",
    },
}
FILTER = {
    "minWidth": 512,
    "minHeight": 400,
    "maxPunsafe": 0.9,
    "maxPwatermark": 0.8,
    "minAesthetic": 4.5,
    "minSimilarity": 0.28,
    "samplesPerShard": 400,
}


def make_spec(source, out, **filter_overrides) -> PartSpec:
    return PartSpec.from_dict(
        {
            "partId": "7",
            "source": {"urls": [str(s) for s in source]},
            "filter": {**FILTER, **filter_overrides},
            "output": {"uri": str(out)},
        }
    )


def expected(frames: list[pd.DataFrame], variant: str, flt: dict) -> tuple[list[str], dict[str, int]]:
    """The seeds' way: pandas, condition by condition, first failing condition counted."""
    df = pd.concat(frames, ignore_index=True)
    c = LOGICAL[variant]
    checks = [
        ("missing_url", df[c["url"]].notna() & (df[c["url"]].str.len() > 0)),
        ("minWidth", df[c["width"]] >= flt["minWidth"]),
        ("minHeight", df[c["height"]] >= flt["minHeight"]),
        ("maxPunsafe", df[c["punsafe"]] <= flt["maxPunsafe"]),
        ("maxPwatermark", df[c["pwatermark"]] <= flt["maxPwatermark"]),
        ("minAesthetic", df[c["aesthetic"]] >= flt["minAesthetic"]),
        ("minSimilarity", df[c["similarity"]] >= flt["minSimilarity"]),
    ]
    if "languages" in flt:
        checks.append(("languages", df[c["language"]].isin(flt["languages"])))
    alive = pd.Series(True, index=df.index)
    dropped = {}
    for name, ok in checks:
        ok = ok.fillna(False).astype(bool)
        dropped[name] = int((alive & ~ok).sum())
        alive &= ok
    kept = df[alive]
    deduped = kept.drop_duplicates(subset=[c["url"]], keep="first")
    dropped["duplicateUrl"] = len(kept) - len(deduped)
    return deduped[c["url"]].tolist(), dropped


def shard_urls(store: Store, shards: int) -> list[str]:
    urls = []
    for shard in range(shards):
        with store.fs.open(store.path("_laion/shards", f"{shard:05d}.parquet"), "rb") as f:
            urls += pq.read_table(f).column("url").to_pylist()
    return urls


@pytest.mark.parametrize("variant", ["aesthetics", "laion-art", "lowercase"])
def test_filter_equals_independent_computation(tmp_path, variant):
    files = [tmp_path / f"part-{i}.parquet" for i in range(2)]
    frames = [write_metadata(f, 3000, BASE, variant=variant, seed=i).to_pandas() for i, f in enumerate(files)]
    flt = dict(FILTER)
    if variant != "aesthetics":
        flt["languages"] = ["en", "de"]
    spec = make_spec(files, tmp_path / "out", **flt)
    store = Store(spec.output)
    result = run_filter(spec, store)
    want_urls, want_dropped = expected(frames, variant, flt)

    got = shard_urls(store, result.shards)
    assert sorted(got) == sorted(want_urls)
    assert len(got) == len(set(got)) == result.rows_kept
    assert got != want_urls, "kept rows are shuffled by default"
    assert result.rows_read == 6000
    assert {k: v for k, v in result.dropped_by.items()} == want_dropped
    assert result.rows_read == result.rows_kept + sum(result.dropped_by.values())
    sizes = [pq.read_metadata(store.path("_laion/shards", f"{s:05d}.parquet")).num_rows for s in range(result.shards)]
    assert all(n == 400 for n in sizes[:-1]) and 0 < sizes[-1] <= 400
    assert result.columns[str(files[0])]["url"] == LOGICAL[variant]["url"]


def test_shuffle_is_deterministic_by_seed(tmp_path):
    src = tmp_path / "m.parquet"
    table = write_metadata(src, 2000, BASE, seed=3)
    orders = {}
    for name, overrides in {"a": {"seed": 1}, "b": {"seed": 1}, "c": {"seed": 2}, "plain": {"shuffle": False}}.items():
        spec = make_spec([src], tmp_path / name, **overrides)
        orders[name] = shard_urls(Store(spec.output), run_filter(spec, Store(spec.output)).shards)
    assert orders["a"] == orders["b"]
    assert orders["a"] != orders["c"] and sorted(orders["a"]) == sorted(orders["c"])
    in_read_order, _ = expected([table.to_pandas()], "aesthetics", FILTER)
    assert orders["plain"] == in_read_order


def test_sample_fraction_is_a_deterministic_subset(tmp_path):
    src = tmp_path / "m.parquet"
    write_metadata(src, 20000, BASE, seed=5)
    full = plan(make_spec([src], tmp_path / "x"))
    spec = make_spec([src], tmp_path / "s", sampleFraction=0.1)
    sampled = shard_urls(Store(spec.output), run_filter(spec, Store(spec.output)).shards)
    again = plan(make_spec([src], tmp_path / "y", sampleFraction=0.1))
    assert again.rows_kept == len(sampled)
    assert abs(len(sampled) / full.rows_kept - 0.1) < 0.02
    whole = make_spec([src], tmp_path / "w")
    assert set(sampled) <= set(shard_urls(Store(whole.output), run_filter(whole, Store(whole.output)).shards))


def test_explicit_columns_and_missing_column_message(tmp_path):
    src = tmp_path / "m.parquet"
    table = write_metadata(src, 100, BASE, variant="aesthetics")
    renamed = table.rename_columns(["link" if n == "URL" else n for n in table.column_names])
    pq.write_table(renamed, tmp_path / "r.parquet")
    with pytest.raises(ColumnError) as err:
        run_filter(
            make_spec([tmp_path / "r.parquet"], tmp_path / "o1"), Store(make_spec([src], tmp_path / "o1").output)
        )
    message = str(err.value)
    assert "r.parquet" in message and "'url'" in message and "link" in message and "spec.columns.url" in message

    spec = PartSpec.from_dict(
        {**make_spec([tmp_path / "r.parquet"], tmp_path / "o2").to_dict(), "columns": {"url": "link"}}
    )
    assert run_filter(spec, Store(spec.output)).rows_read == 100

    bad = PartSpec.from_dict({**spec.to_dict(), "columns": {"url": "nope"}, "output": {"uri": str(tmp_path / "o3")}})
    with pytest.raises(ColumnError, match=r"'nope' \(spec.columns.url\) is not in the file; its columns are: link"):
        run_filter(bad, Store(bad.output))


def test_corrupt_and_missing_parquet_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    write_metadata(corrupt, 500, BASE)
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    spec = make_spec([corrupt], tmp_path / "o")
    with pytest.raises(MetadataError, match="corrupt.parquet"):
        run_filter(spec, Store(spec.output))
    spec = make_spec([tmp_path / "absent.parquet"], tmp_path / "o")
    with pytest.raises(MetadataError, match="absent.parquet: no such metadata file"):
        run_filter(spec, Store(spec.output))


def test_rerun_with_another_filter_is_refused_and_keeps_shards(tmp_path):
    src = tmp_path / "m.parquet"
    write_metadata(src, 500, BASE)
    spec = make_spec([src], tmp_path / "o")
    first = run_filter(spec, Store(spec.output))
    assert run_filter(spec, Store(spec.output)).to_json() == first.to_json()  # reused, not recomputed
    other = make_spec([src], tmp_path / "o", minWidth=100)
    with pytest.raises(MetadataError, match="different source, columns or filter"):
        run_filter(other, Store(other.output))
    assert len(shard_urls(Store(spec.output), first.shards)) == first.rows_kept


def test_url_hash_dedupes_equal_urls_only(tmp_path):
    import pyarrow as pa

    from laion_operator.pipeline.filter import url_hashes

    urls = pa.array([f"http://x/{i}" for i in range(50000)] + ["http://x/1"])
    h = url_hashes(urls, seed=0)
    assert h[1] == h[-1]
    assert len(np.unique(h)) == 50000
