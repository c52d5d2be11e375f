"""Our TensorFlow-free TFRecord writer writes what img2dataset's TFRecordSampleWriter would.

Read back with independent code: the `tfrecord` package's reader, records split and CRCs checked
with the `crc32c` package (not google-crc32c, which the writer uses), and the expected Examples built
by img2dataset's own writer code running on the tfrecord package's protobuf classes.
"""

import math
import struct
import sys
from pathlib import Path

import crc32c
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from img2dataset import writer as i2d_writer
from tfrecord import example_pb2
from tfrecord.reader import tfrecord_iterator, tfrecord_loader

OPERATOR_DIR = Path(__file__).resolve().parents[2] / "operator"
if str(OPERATOR_DIR) not in sys.path:
    sys.path.insert(0, str(OPERATOR_DIR))

from laion_operator.pipeline.formats.tfrecord import (  # noqa: E402 - once operator/ is on sys.path
    TFRecordSampleWriter,
    example_for,
    feature_for,
    serialize,
)

SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("similarity", pa.float64()),
        ("NSFW", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("sizes", pa.list_(pa.int64())),
        ("scores", pa.list_(pa.float64())),
    ]
)


def jpeg(seed: int, size=(24, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".jpg", pixels)
    assert ok
    return encoded.tobytes()


def samples():
    """(img_str, key, caption, meta) as download.py hands them to the writer; one failed download."""
    return [
        (
            jpeg(1),
            "000000000",
            "Ein Hund im Schnee ❄️ — 雪の中の犬",
            {
                "url": "http://a.example/1.jpg",
                "caption": "Ein Hund im Schnee ❄️ — 雪の中の犬",
                "key": "000000000",
                "status": "success",
                "error_message": None,
                "width": 32,
                "height": 24,
                "similarity": 0.3125678,
                "NSFW": "UNLIKELY",
                "tags": ["dog", "snow ❄"],
                "sizes": [1, -2, 2**40],
                "scores": [0.5, 1e-3],
            },
        ),
        (
            None,
            "000000001",
            "never arrives",
            {
                "url": "http://a.example/2.jpg",
                "caption": "never arrives",
                "key": "000000001",
                "status": "failed_to_download",
                "error_message": "HTTP Error 404: Not Found",
                "width": None,
                "height": None,
                "similarity": None,
                "NSFW": None,
                "tags": None,
                "sizes": None,
                "scores": None,
            },
        ),
        (
            jpeg(3, (40, 20)),
            "000000002",
            None,
            {
                "url": "http://a.example/3.jpg",
                "caption": None,
                "key": "000000002",
                "status": "success",
                "error_message": None,
                "width": 20,
                "height": 40,
                "similarity": -1.5e-7,
                "NSFW": None,
                "tags": ["ünïcödé", "ok"],
                "sizes": [0],
                "scores": [2.0],
            },
        ),
        (
            jpeg(4),
            "000000003",
            "",
            {
                "url": "http://a.example/4.jpg",
                "caption": "",
                "key": "000000003",
                "status": "success",
                "error_message": None,
                "width": 32,
                "height": 24,
                "similarity": 1e300,
                "NSFW": "NSFW",
                "tags": ["x"],
                "sizes": [-(2**63), 2**63 - 1],
                "scores": [math.inf, -0.0],
            },
        ),
    ]


def reference_examples(save_caption=True, encode_format="jpg"):
    """The Examples img2dataset's own TFRecordSampleWriter.write builds, on the tfrecord package's classes."""
    ref = object.__new__(i2d_writer.TFRecordSampleWriter)
    ref._BytesList, ref._Int64List, ref._FloatList = (
        example_pb2.BytesList,
        example_pb2.Int64List,
        example_pb2.FloatList,
    )
    ref._Example, ref._Features, ref._Feature = example_pb2.Example, example_pb2.Features, example_pb2.Feature
    records = []
    ref.tf_writer = type("Collect", (), {"write": staticmethod(records.append)})()
    ref.buffered_parquet_writer = type("Drop", (), {"write": staticmethod(lambda meta: None)})()
    ref.save_caption, ref.encode_format = save_caption, encode_format
    for img_str, key, caption, meta in samples():
        ref.write(img_str, key, caption, meta)
    return [example_pb2.Example.FromString(r) for r in records]


def write_shard(folder, save_caption=True, encode_format="jpg"):
    writer = TFRecordSampleWriter(7, str(folder), save_caption, 5, SCHEMA, encode_format)
    for sample in samples():
        writer.write(*sample)
    writer.close()
    return Path(folder) / "00007.tfrecord", Path(folder) / "00007.parquet"


def masked(data) -> int:
    crc = crc32c.crc32c(bytes(data))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def check_records(blob: bytes):
    """Split a TFRecord file, verifying both CRCs of every record; returns the record payloads."""
    records, pos = [], 0
    while pos < len(blob):
        if len(blob) - pos < 12:
            raise ValueError(f"truncated record header at {pos}")
        length_bytes = blob[pos : pos + 8]
        (length,), (length_crc,) = struct.unpack("<Q", length_bytes), struct.unpack("<I", blob[pos + 8 : pos + 12])
        if masked(length_bytes) != length_crc:
            raise ValueError(f"length CRC mismatch at {pos}")
        data = blob[pos + 12 : pos + 12 + length]
        if len(data) != length or len(blob) < pos + 16 + length:
            raise ValueError(f"truncated record at {pos}")
        (data_crc,) = struct.unpack("<I", blob[pos + 12 + length : pos + 16 + length])
        if masked(data) != data_crc:
            raise ValueError(f"data CRC mismatch at {pos}")
        records.append(data)
        pos += 16 + length
    return records


@pytest.mark.parametrize("save_caption,encode_format", [(True, "jpg"), (False, "webp")])
def test_examples_equal_img2dataset_and_read_back(tmp_path, save_caption, encode_format):
    tfrecord_path, parquet_path = write_shard(tmp_path / "out", save_caption, encode_format)
    expected = reference_examples(save_caption, encode_format)
    blob = tfrecord_path.read_bytes()

    records = check_records(blob)
    assert [bytes(r) for r in tfrecord_iterator(str(tfrecord_path))] == records
    got = [example_pb2.Example.FromString(r) for r in records]
    assert len(got) == 3  # the failed download is in the parquet only
    assert got == expected  # same feature names, kinds and values as img2dataset's writer

    ok = [s for s in samples() if s[0] is not None]
    for example, (img_str, key, caption, meta) in zip(got, ok):
        feature = example.features.feature
        assert set(feature) == {"key", encode_format, *(["txt"] if save_caption else []), *meta}
        assert feature[encode_format].bytes_list.value == [img_str]
        assert cv2.imdecode(np.frombuffer(feature[encode_format].bytes_list.value[0], np.uint8), 1) is not None
        assert feature["key"].bytes_list.value == [key.encode()]
        if save_caption:
            assert feature["txt"].bytes_list.value == [(caption or "").encode()]
        assert feature["url"].bytes_list.value == [meta["url"].encode()]
        assert feature["error_message"].bytes_list.value == [b""]  # None → empty bytes
        assert feature["width"].int64_list.value == [meta["width"]]
        assert feature["sizes"].int64_list.value == meta["sizes"]
        assert feature["tags"].bytes_list.value == [t.encode() for t in meta["tags"]]
        assert feature["similarity"].WhichOneof("kind") == "float_list"
        assert list(feature["scores"].float_list.value) == list(np.float32(meta["scores"]))

    # the tfrecord package's high-level loader agrees
    loaded = list(tfrecord_loader(str(tfrecord_path), None))
    assert [row[encode_format] for row in loaded] == [s[0] for s in ok]
    assert loaded[0]["txt" if save_caption else "url"] == (
        ok[0][2].encode() if save_caption else ok[0][3]["url"].encode()
    )
    assert loaded[0]["similarity"][0] == np.float32(0.3125678)
    assert loaded[2]["similarity"][0] == np.inf  # 1e300 overflows float32, as protobuf does
    assert list(loaded[2]["sizes"]) == [-(2**63), 2**63 - 1]

    table = pq.read_table(parquet_path)
    assert table.schema == SCHEMA
    assert table.to_pylist() == [s[3] for s in samples()]


def test_framing_matches_tfrecord_package_writer(tmp_path):
    from tfrecord.writer import TFRecordWriter as Reference

    tfrecord_path, _ = write_shard(tmp_path)
    blob = tfrecord_path.read_bytes()
    rebuilt = b"".join(
        struct.pack("<Q", len(r)) + Reference.masked_crc(struct.pack("<Q", len(r))) + r + Reference.masked_crc(r)
        for r in check_records(blob)
    )
    assert rebuilt == blob


@pytest.mark.parametrize("where", ["length", "length_crc", "data", "data_crc", "second_record"])
def test_corrupted_byte_is_detected(tmp_path, where):
    tfrecord_path, _ = write_shard(tmp_path)
    blob = bytearray(tfrecord_path.read_bytes())
    check_records(bytes(blob))
    first_len = struct.unpack("<Q", blob[:8])[0]
    offset = {
        "length": 0,
        "length_crc": 9,
        "data": 12 + first_len // 2,
        "data_crc": 12 + first_len + 2,
        "second_record": 16 + first_len + 12 + 40,
    }[where]
    blob[offset] ^= 0x01
    with pytest.raises(ValueError, match="CRC mismatch|truncated"):
        check_records(bytes(blob))


@pytest.mark.parametrize(
    "value,expected",
    [
        (5, example_pb2.Feature(int64_list=example_pb2.Int64List(value=[5]))),
        (-1, example_pb2.Feature(int64_list=example_pb2.Int64List(value=[-1]))),
        (True, example_pb2.Feature(int64_list=example_pb2.Int64List(value=[1]))),
        (0, example_pb2.Feature(int64_list=example_pb2.Int64List(value=[0]))),
        (0.25, example_pb2.Feature(float_list=example_pb2.FloatList(value=[0.25]))),
        (-1e300, example_pb2.Feature(float_list=example_pb2.FloatList(value=[-math.inf]))),
        (None, example_pb2.Feature(bytes_list=example_pb2.BytesList(value=[b""]))),
        ("", example_pb2.Feature(bytes_list=example_pb2.BytesList(value=[b""]))),
        ("naïve ☃", example_pb2.Feature(bytes_list=example_pb2.BytesList(value=["naïve ☃".encode()]))),
        (b"\x00\xff", example_pb2.Feature(bytes_list=example_pb2.BytesList(value=[b"\x00\xff"]))),
        ([3, 1, 2], example_pb2.Feature(int64_list=example_pb2.Int64List(value=[3, 1, 2]))),
        ([1.5, 2], example_pb2.Feature(float_list=example_pb2.FloatList(value=[1.5, 2.0]))),
        (["a", None, b"c"], example_pb2.Feature(bytes_list=example_pb2.BytesList(value=[b"a", b"", b"c"]))),
        ([], example_pb2.Feature(bytes_list=example_pb2.BytesList())),
        (np.int64(7), example_pb2.Feature(int64_list=example_pb2.Int64List(value=[7]))),
        (np.float32(0.5), example_pb2.Feature(float_list=example_pb2.FloatList(value=[0.5]))),
        (np.array([1, 2]), example_pb2.Feature(int64_list=example_pb2.Int64List(value=[1, 2]))),
    ],
)
def test_feature_types(value, expected):
    got = example_pb2.Feature.FromString(feature_for(value).SerializeToString())
    assert got == expected
    assert got.WhichOneof("kind") == expected.WhichOneof("kind")


@pytest.mark.parametrize(
    "value,error",
    [
        (2**63, ValueError),
        (-(2**63) - 1, ValueError),
        ([1, 2.5], TypeError),
        ({"a": 1}, TypeError),
        ([b"a", 1], TypeError),
        ([1.0, "x"], TypeError),
    ],
)
def test_values_protobuf_rejects_are_rejected(value, error):
    with pytest.raises(error):
        feature_for(value)


def test_failed_sample_writes_nothing(tmp_path):
    writer = TFRecordSampleWriter(0, str(tmp_path), True, 5, SCHEMA, "jpg")
    writer.write(*samples()[1])
    writer.close()
    writer.close()  # idempotent
    assert (tmp_path / "00000.tfrecord").read_bytes() == b""
    assert pq.read_table(tmp_path / "00000.parquet").num_rows == 1


def test_empty_example_round_trips():
    assert example_pb2.Example.FromString(serialize(example_for({}))) == example_pb2.Example(
        features=example_pb2.Features()
    )


def test_sample_keys_are_img2datasets():
    from img2dataset.downloader import compute_key

    from laion_operator.contract import SHARD_DIGITS, sample_key

    for samples_per_shard in (2, 10, 11, 100, 1000, 10_000):
        digits = math.ceil(math.log10(samples_per_shard))
        for shard in (0, 1, 7, 123, 99_999):
            for index in {0, 1, 9, samples_per_shard // 2, samples_per_shard - 1}:
                if index < samples_per_shard:
                    assert sample_key(shard, index, samples_per_shard) == compute_key(
                        index, shard, digits, SHARD_DIGITS
                    ), (samples_per_shard, shard, index)


def test_the_same_samples_give_the_same_bytes_in_every_process():
    """protobuf orders a map's entries (an Example's features) by a hash seeded per process unless it
    serializes deterministically: two runs of one part would otherwise differ byte for byte."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    code = (
        "from laion_operator.pipeline.formats.tfrecord import example_for, feature_for, serialize; "
        f"print(serialize(example_for({{n: feature_for(n) for n in {list(SCHEMA.names)!r}}})).hex())"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(root / "operator"), "PATH": "/usr/bin:/bin"},
        ).stdout
        for _ in range(3)
    ]
    assert runs[0] == runs[1] == runs[2]
    example = example_pb2.Example.FromString(bytes.fromhex(runs[0]))
    assert set(example.features.feature) == set(SCHEMA.names)
