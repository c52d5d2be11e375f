"""URL lists in img2dataset's input formats (csv, tsv, json, jsonl, txt; plain, .gz, .bz2, .xz, .zst):
the filter reads each into the same shards and counts as the same rows in parquet, streamed, and a
broken file's error names it."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from laion_operator.pipeline.columns import ColumnError
from laion_operator.pipeline.filter import MetadataError, plan, run_filter
from laion_operator.pipeline.sources import delimited, json_array, open_list, text
from laion_operator.pipeline.sources.urls import reader_for
from laion_operator.spec import PartSpec, SpecError
from laion_operator.storage import Store
from laion_operator.testbed.demo_data import write_metadata

BASE = "http://127.0.0.1:9"  # never contacted: the filter reads metadata only
FILTER = {"minWidth": 512, "maxPunsafe": 0.9, "minAesthetic": 4.5, "samplesPerShard": 300}
OPEN = {"samplesPerShard": 300}  # lists without the columns FILTER reads


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(data)
    if suffix == ".bz2":
        return bz2.compress(data)
    if suffix == ".xz":
        return lzma.compress(data)
    if suffix == ".zst":  # Arrow's codec: the zstandard module is not a dependency
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as out:
            out.write(data)
        return sink.getvalue().to_pybytes()
    return data


def encode(table: pa.Table, fmt: str, header: bool = True) -> bytes:
    """The table in a text format, as img2dataset's users have it."""
    if fmt in ("csv", "tsv"):
        sink = pa.BufferOutputStream()
        options = pcsv.WriteOptions(include_header=header, delimiter="," if fmt == "csv" else "\t")
        pcsv.write_csv(table, sink, options)
        return sink.getvalue().to_pybytes()
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in table.to_pylist()).encode()
    if fmt == "json":
        return json.dumps(table.to_pylist(), indent=1).encode()
    assert fmt == "txt"
    return "".join(url + "\n" for url in table.column(0).to_pylist()).encode()


def write(path: Path, table: pa.Table, fmt: str, suffix: str = "", header: bool = True) -> Path:
    path = path.with_name(path.name + suffix)
    path.write_bytes(compress(encode(table, fmt, header), suffix))
    return path


def spec_for(files, out, source: dict | None = None, base: dict = FILTER, **flt) -> PartSpec:
    return PartSpec.from_dict(
        {
            "partId": "3",
            "source": {"urls": [str(f) for f in files], **(source or {})},
            "filter": {**base, **flt},
            "output": {"uri": str(out)},
        }
    )


def shards(spec: PartSpec) -> tuple[list[dict], dict]:
    store = Store(spec.output)
    result = run_filter(spec, store)
    rows = []
    for shard in range(result.shards):
        with store.fs.open(store.path("_laion/shards", f"{shard:05d}.parquet"), "rb") as f:
            rows += pq.read_table(f).to_pylist()
    counts = {k: v for k, v in result.to_json().items() if k not in ("fingerprint", "columns")}
    return rows, counts


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> tuple[Path, pa.Table]:
    path = tmp_path_factory.mktemp("meta") / "m.parquet"
    table = write_metadata(path, 3000, BASE, row_group_size=700)
    assert table is not None
    return path, table


CASES = [
    ("csv", ""),
    ("csv", ".gz"),
    ("tsv", ".bz2"),
    ("json", ""),
    ("json", ".xz"),
    ("jsonl", ".zst"),
    ("jsonl", ".gz"),
]


@pytest.mark.parametrize("fmt,suffix", CASES, ids=[f + s for f, s in CASES])
def test_each_format_gives_the_parquet_shards(tmp_path, metadata, fmt, suffix):
    parquet, table = metadata
    listed = write(tmp_path / f"m.{fmt}", table, fmt, suffix)
    want = shards(spec_for([parquet], tmp_path / "from-parquet"))
    assert want[0] and want[1]["dropped_by"]["minWidth"] > 0
    assert shards(spec_for([listed], tmp_path / "out")) == want
    assert plan(spec_for([listed], tmp_path / "plan")).rows_kept == want[1]["rows_kept"]
    # Without the shuffle too: straight from the list to the shards, in read order.
    assert shards(spec_for([listed], tmp_path / "o2", shuffle=False)) == shards(
        spec_for([parquet], tmp_path / "p2", shuffle=False)
    )


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz"])
def test_txt_is_one_url_a_line(tmp_path, metadata, suffix):
    _, table = metadata
    urls = table.select(["URL"]).rename_columns(["url"])
    parquet = tmp_path / "urls.parquet"
    pq.write_table(urls, parquet)
    listed = write(tmp_path / "urls.txt", urls, "txt", suffix)
    assert open_list(spec_for([listed], tmp_path / "x", base=OPEN), str(listed)).columns == ["url"]
    assert shards(spec_for([listed], tmp_path / "o", base=OPEN)) == shards(
        spec_for([parquet], tmp_path / "p", base=OPEN)
    )


def test_header_less_tsv_takes_its_names_from_the_spec(tmp_path, metadata):
    """CC12M's TSV: url<TAB>caption, no header line."""
    _, table = metadata
    pairs = table.select(["URL", "TEXT"]).rename_columns(["url", "caption"])
    parquet = tmp_path / "cc12m.parquet"
    pq.write_table(pairs, parquet)
    listed = write(tmp_path / "cc12m.tsv", pairs, "tsv", ".gz", header=False)
    spec = spec_for([listed], tmp_path / "o", {"header": ["url", "caption"]}, base=OPEN)
    assert open_list(spec, str(listed)).columns == ["url", "caption"]
    got = shards(spec)
    assert got == shards(spec_for([parquet], tmp_path / "p", base=OPEN))
    assert got[1]["rows_kept"] == 3000 - got[1]["dropped_by"]["duplicateUrl"]
    # Read as if it had a header, its first row would name the columns: nothing is called url.
    as_headed = spec_for([listed], tmp_path / "o2", base=OPEN)
    with pytest.raises(ColumnError, match="cc12m.tsv.gz: no column for 'url'"):
        run_filter(as_headed, Store(as_headed.output))


def test_format_from_the_spec_whatever_the_name(tmp_path, metadata):
    parquet, table = metadata
    listed = write(tmp_path / "export.data", table, "jsonl", ".bz2")
    assert reader_for(str(listed)).name == "parquet"  # the name says nothing: parquet, LAION's format
    spec = spec_for([listed], tmp_path / "o", {"format": "jsonl"})
    assert shards(spec) == shards(spec_for([parquet], tmp_path / "p"))
    assert spec.to_dict()["source"] == {"urls": [str(listed)], "format": "jsonl"}
    with pytest.raises(SpecError, match="spec.source.format: 'xlsx' is not one of the allowed values"):
        spec_for([listed], tmp_path / "o", {"format": "xlsx"})


@pytest.mark.parametrize(
    "name,fmt",
    [
        ("a.parquet", "parquet"),
        ("s3://b/cc12m.tsv.gz", "tsv"),
        ("https://h/x.CSV.zst?sig=1", "csv"),
        ("x.json.xz", "json"),
        ("x.jsonl.bz2", "jsonl"),
        ("x.ndjson", "jsonl"),
        ("urls.txt", "txt"),
        ("2B-en-4.5_7", "parquet"),
    ],
)
def test_the_format_is_told_by_the_name_less_its_compression(name, fmt):
    assert reader_for(name).name == fmt


def test_columns_are_detected_and_named_in_csv_as_in_parquet(tmp_path, metadata):
    _, table = metadata
    renamed = table.rename_columns(["link", "alt", *table.column_names[2:]])
    parquet = tmp_path / "r.parquet"
    pq.write_table(renamed, parquet)
    listed = write(tmp_path / "r.csv", renamed, "csv", ".gz")
    columns = {"url": "link", "caption": "alt"}
    spec = PartSpec.from_dict({**spec_for([listed], tmp_path / "o").to_dict(), "columns": columns})
    like = PartSpec.from_dict({**spec_for([parquet], tmp_path / "p").to_dict(), "columns": columns})
    got = shards(spec)
    assert got == shards(like)
    assert set(got[0][0]) == {"url", "caption"}
    store = Store(spec.output)
    assert run_filter(spec, store).columns[str(listed)]["width"] == "WIDTH"  # detected, as in parquet
    with pytest.raises(ColumnError, match=r"r.csv.gz: no column for 'url' .*its columns are: link, alt, WIDTH"):
        run_filter(spec_for([listed], tmp_path / "o3"), Store(spec_for([listed], tmp_path / "o3").output))


def test_a_broken_file_is_named_with_where_it_breaks(tmp_path, metadata):
    _, table = metadata
    small = table.slice(0, 50)

    def fails(path: Path, match: str, source: dict | None = None) -> None:
        spec = spec_for([path], tmp_path / f"o-{path.name}", source)
        with pytest.raises(MetadataError, match=match):
            run_filter(spec, Store(spec.output))

    csv = tmp_path / "ragged.csv"
    csv.write_bytes(encode(small, "csv") + b'"http://x/a.jpg","cap"\n')
    fails(csv, r"ragged.csv: not readable as csv: .*Expected 9 columns, got 2")
    json_file = tmp_path / "broken.json"
    json_file.write_bytes(encode(small, "json").replace(b'"URL"', b'"URL" "', 1))
    fails(json_file, r"broken.json: not readable as json at line 3 column \d+")
    not_array = tmp_path / "object.json"
    not_array.write_text('{"url": "http://x/a.jpg"}')
    fails(not_array, r"object.json: not readable as json at line 1 column 1: expected a JSON array")
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_bytes(encode(small, "jsonl") + b'{"URL": "http://x/a.jpg", \n')
    fails(jsonl, r"broken.jsonl: not readable as jsonl")
    cut = tmp_path / "cut.csv.gz"
    data = write(tmp_path / "whole.csv", table, "csv", ".gz").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    fails(cut, r"cut.csv.gz: not readable as csv")
    not_xz = tmp_path / "plain.tsv.xz"
    not_xz.write_bytes(encode(small, "tsv"))
    fails(not_xz, r"plain.tsv.xz: not readable as tsv")
    fails(tmp_path / "absent.csv", r"absent.csv: no such metadata file")
    parquet = tmp_path / "p.parquet"
    pq.write_table(small, parquet)
    fails(parquet, r"p.parquet: spec.source.header names the columns of csv and tsv files", {"header": ["url"]})


def test_a_dataset_source_takes_no_format(tmp_path):
    with pytest.raises(SpecError, match="format and header describe the files of urls"):
        PartSpec.from_dict(
            {"partId": "1", "source": {"dataset": {"uri": "/d"}, "format": "csv"}, "output": {"uri": "/o"}}
        )


class Recording:
    """open_stream, with the stored files it opened kept to ask how far each was read."""

    def __init__(self):
        self.raw: list[tuple[pa.NativeFile, int]] = []
        self.open_stream = text.open_stream  # before the test puts this recording in its place

    def __call__(self, url: str):
        stream, raw, size = self.open_stream(url)
        self.raw.append((raw, size))
        return stream, raw, size


@pytest.mark.parametrize("fmt,suffix", [("csv", ".gz"), ("tsv", ""), ("jsonl", ".bz2"), ("json", ".gz")])
def test_a_list_is_streamed_not_read_whole(tmp_path, metadata, monkeypatch, fmt, suffix):
    _, table = metadata
    big = pa.concat_tables([table] * 20)  # 60,000 rows: several blocks and batches
    listed = write(tmp_path / f"big.{fmt}", big, fmt, suffix)
    monkeypatch.setattr(delimited, "BLOCK_BYTES", 64 << 10)
    monkeypatch.setattr(text, "BLOCK_BYTES", 64 << 10)
    monkeypatch.setattr(json_array, "BATCH_ROWS", 5000)
    monkeypatch.setattr(json_array, "CHUNK_BYTES", 64 << 10)
    from laion_operator.pipeline.sources import jsonl

    monkeypatch.setattr(jsonl, "BLOCK_BYTES", 64 << 10)
    recording = Recording()
    for module in (text, json_array):
        monkeypatch.setattr(module, "open_stream", recording)
    spec = spec_for([listed], tmp_path / "o")
    opened = open_list(spec, str(listed))
    assert opened.columns == table.column_names
    seen: list[int] = []
    for rows in opened.batches(["URL", "WIDTH"], lambda batch: batch.num_rows):
        raw, size = recording.raw[-1]
        if not seen:  # the first batch comes while most of the file is still unread
            assert raw.tell() < size / 2
        seen.append(rows)
    assert sum(seen) == big.num_rows and len(seen) >= 4
    # The row count the shuffle sizes its spill by: from the first MiB, within a factor of 1.5.
    assert big.num_rows / 1.5 < opened.rows < big.num_rows * 1.5


def test_a_small_list_counts_its_rows_exactly(tmp_path, metadata):
    _, table = metadata
    for fmt in ("csv", "jsonl", "json"):
        listed = write(tmp_path / f"s.{fmt}", table.slice(0, 123), fmt, ".gz")
        assert open_list(spec_for([listed], tmp_path / "o"), str(listed)).rows == 123
    headerless = write(tmp_path / "s.tsv", table.slice(0, 77), "tsv", header=False)
    spec = spec_for([headerless], tmp_path / "o", {"header": table.column_names})
    assert open_list(spec, str(headerless)).rows == 77
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert open_list(spec_for([empty], tmp_path / "o"), str(empty)).rows == 0


@pytest.mark.parametrize("suffix", ["", ".bz2"])
def test_a_remote_list_is_read_through_its_filesystem(tmp_path, metadata, suffix):
    """Not a local path (fsspec's memory filesystem stands for http(s):// and s3://): read through a
    Python file object, decompressed by Arrow as it comes."""
    import fsspec

    parquet, table = metadata
    url = f"memory://lists/m-{suffix.strip('.') or 'plain'}.tsv{suffix}"
    with fsspec.open(url, "wb") as f:
        f.write(compress(encode(table, "tsv"), suffix))
    spec = spec_for([url], tmp_path / "o")
    assert shards(spec) == shards(spec_for([parquet], tmp_path / "p"))
    assert 3000 / 1.5 < open_list(spec, url).rows < 3000 * 1.5


def test_a_threshold_on_a_column_of_text_names_the_column(tmp_path):
    listed = tmp_path / "w.csv"
    listed.write_text("url,width\n" + "".join(f"http://x/{i}.jpg,{i}\n" for i in range(10)) + "http://y.jpg,wide\n")
    spec = spec_for([listed], tmp_path / "o", base={"minWidth": 5})
    with pytest.raises(
        ColumnError, match=r"w.csv: not numbers.*column 'width' \(width, spec.filter.minWidth\) is string"
    ):
        run_filter(spec, Store(spec.output))
