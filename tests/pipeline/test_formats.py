"""pipeline/formats: every output format's shards, written by its writer, read back by its
`read_samples` as they were written; a broken shard named with what is wrong, in words."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from laion_operator import spec as specs
from laion_operator.contract import ShardStats
from laion_operator.pipeline import formats
from laion_operator.pipeline.formats import BrokenShard
from laion_operator.pipeline.record import KEY, schema
from laion_operator.pipeline.verify import check_shard
from laion_operator.spec import PartSpec
from laion_operator.storage import Store

FORMATS = specs.OUTPUT_FORMATS


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24 + seed, 16), ((seed * 37) % 256, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


def part(out: Path, fmt: str) -> PartSpec:
    return PartSpec.from_dict(
        {
            "partId": "f",
            "source": {"urls": ["unused.parquet"]},
            "output": {"uri": str(out)},
            "download": {"outputFormat": fmt, "mdsShardSizeLimit": 1500},
        }
    )


def write_shard(out: Path, fmt: str, n: int = 8) -> tuple[Store, list[tuple[str, str, bytes | None, dict]]]:
    """Shard 0 of `n` samples, every third one failed (no image), through the format's own writer."""
    out.mkdir(parents=True)
    spec = part(out, fmt)
    store = Store(spec.output)
    leading = pa.schema([("url", pa.string()), ("caption", pa.string()), KEY])
    writer = formats.get(fmt).writer(spec.download, 0, store.uri, True, schema(leading))
    samples = []
    for i in range(n):
        image = None if i % 3 == 2 else jpeg(i)
        meta = {
            "url": f"http://x/{i}",
            "caption": f"caption {i} ✓",
            "key": f"{i:09d}",
            "status": "success" if image else "failed_to_download",
            "error_message": None if image else "404",
            "failure_reason": None if image else "http_4xx",
            "width": 24 + i if image else None,
            "height": 16 if image else None,
            "original_width": None,
            "original_height": None,
        }
        writer.write(image, meta["key"], meta["caption"], meta)
        samples.append((meta["key"], meta["caption"], image, meta))
    writer.close()
    if fmt == "mds":  # what annotate writes for the part: the root index
        formats.get(fmt).annotate(store, [ShardStats(shard=0)])
    return store, samples


def test_every_output_format_has_its_module():
    assert list(formats.FORMATS) == specs.OUTPUT_FORMATS
    assert all(formats.get(name).name == name for name in specs.OUTPUT_FORMATS)
    assert {name for name, f in formats.FORMATS.items() if f.reads_datasets} == set(specs.DATASET_FORMATS) - {"images"}
    assert list(formats.DATASETS) == specs.DATASET_FORMATS  # what convert reads, the spec's enum
    with pytest.raises(ValueError, match="no output format 'avro'"):
        formats.get("avro")


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_samples_gives_back_what_the_writer_wrote(tmp_path, fmt):
    store, written = write_shard(tmp_path / fmt, fmt)
    read = list(formats.get(fmt).read_samples(store, 0))
    expected = [(key, caption, image) for key, caption, image, _ in written if image is not None]
    assert sorted((s.key, s.caption, s.image) for s in read) == sorted(expected)
    by_key = {key: meta for key, _, _, meta in written}
    for sample in read:
        assert sample.meta["url"] == by_key[sample.key]["url"]
        assert sample.meta["width"] == by_key[sample.key]["width"]
        assert sample.file  # what verify counts per data file
    check = check_shard(store, fmt, 0)
    assert check.problems == [] and check.samples == check.decoded == len(expected)


def _truncate(path: Path, keep: float = 0.51) -> tuple[int, int]:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return int(len(data) * keep), len(data)


@pytest.mark.parametrize(
    "fmt,data_file,expected",
    [
        (
            "webdataset",
            "00000.tar",
            r"00000\.tar: cut short: {kept} bytes, ending \d+ bytes into the headers of the "
            r"member after 000000003\.txt, which start at byte 19968",
        ),
        (
            "tfrecord",
            "00000.tfrecord",
            r"00000\.tfrecord: cut short: {kept} bytes, after \d+ whole records: record \d+ "
            r"at byte \d+ needs \d+ bytes .*, \d+ are there",
        ),
        (
            "mds",
            "00000/shard.00000.mds",
            r"00000/shard\.00000\.mds: cut short: {kept} of {size} bytes \(its index\.json "
            r"lists \d+ samples in {size} bytes\)",
        ),
        (
            "parquet",
            "00000.parquet",
            r"00000\.parquet: cut short: {kept} bytes, ending without the footer and PAR1 "
            r"marker that end a parquet file",
        ),
    ],
)
def test_a_truncated_shard_is_named_with_its_size_and_what_was_expected(tmp_path, fmt, data_file, expected):
    store, _ = write_shard(tmp_path / fmt, fmt)
    kept, size = _truncate(tmp_path / fmt / data_file)
    pattern = expected.format(kept=kept, size=size)
    with pytest.raises(BrokenShard, match=pattern):
        list(formats.get(fmt).read_samples(store, 0))
    assert [p for p in check_shard(store, fmt, 0).problems if re.match(pattern, p)]  # verify's words too


def test_a_tar_cut_inside_a_member_names_the_member(tmp_path):
    store, _ = write_shard(tmp_path / "wds", "webdataset")
    tar = tmp_path / "wds" / "00000.tar"
    tar.write_bytes(tar.read_bytes()[:15000])  # inside 000000003.jpg's data, bytes 14848 to 15484
    with pytest.raises(
        BrokenShard,
        match=r"00000\.tar: cut short: 15000 bytes, but its member 000000003\.jpg "
        r"\(header at byte 13312\) holds 636 bytes up to byte 15484",
    ):
        list(formats.get("webdataset").read_samples(store, 0))


def test_a_truncated_image_of_a_files_shard_is_named_with_its_sample_and_size(tmp_path):
    store, written = write_shard(tmp_path / "files", "files")
    key = written[0][0]
    kept, _ = _truncate(tmp_path / "files" / "00000" / f"{key}.jpg", 0.3)
    problems = check_shard(store, "files", 0).problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"00000: sample {key}: image does not decode ({kept} bytes): ")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_truncated_metadata_file_is_named(tmp_path, fmt):
    store, _ = write_shard(tmp_path / fmt, fmt)
    kept, _ = _truncate(tmp_path / fmt / "00000.parquet", 0.7)
    with pytest.raises(BrokenShard, match=rf"00000\.parquet: cut short: {kept} bytes"):
        formats.read_metadata(store, 0)


def test_a_half_written_mds_index_is_named(tmp_path):
    store, _ = write_shard(tmp_path / "mds", "mds")
    _truncate(tmp_path / "mds" / "00000" / "index.json")
    with pytest.raises(BrokenShard, match=r"00000/index\.json: not JSON, as streaming's index is"):
        list(formats.get("mds").read_samples(store, 0))
