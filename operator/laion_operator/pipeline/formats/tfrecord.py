"""tfrecord: `<shard>.tfrecord`, one `tf.train.Example` a sample, as img2dataset's
`TFRecordSampleWriter` writes them, without TensorFlow.

img2dataset's writer imports tensorflow and tensorflow_io (gigabytes) only to build `tf.train.Example`
messages and to frame them as TFRecords. Here the messages are protobuf's, through the classes the
`tfrecord` package generates from TensorFlow's example.proto, serialized deterministically (map
entries sorted by feature name, so that the same samples give the same bytes); the framing is
TFRecord's: `uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)`, all
little-endian, where masked_crc32c(x) = ((c >> 15 | c << 17) + 0xa282ead8) mod 2**32 with c the
CRC-32C of x. Read back with the `tfrecord` package's record iterator.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
import google_crc32c
import numpy as np

from ...storage import Store
from .base import BrokenShard, Format, Sample, local_copy

_MASK_DELTA = 0xA282EAD8
_HEADER, _FOOTER = 12, 4  # a record's length and its CRC; the data's CRC


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return b"".join((length, struct.pack("<I", masked_crc32c(length)), data, struct.pack("<I", masked_crc32c(data))))


def pb():
    """The tfrecord package's generated tf.train.Example classes, imported when used: the package
    imports torch where it can, which the pipeline's processes need not (pipeline.load_light)."""
    from tfrecord import example_pb2

    return example_pb2


def _as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    # tf.train.BytesList rejects anything else the same way
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in a tf.train.BytesList")


def feature_for(value: Any):
    """The tf.train.Feature of one value, typed as img2dataset's `_feature` types it.

    list → by its first element: int → int64_list, float → float_list, else bytes_list (str UTF-8
    encoded, None → b""); int (bool included) → int64_list; float → float_list; anything else
    → bytes_list of one value (str UTF-8 encoded, None → b""). Where img2dataset raises instead, this
    writes: an empty list as an empty bytes_list, None inside a list of strings as b"", numpy
    scalars/arrays as their Python values, bytearray/memoryview as bytes, bools as 0 and 1. What protobuf rejects
    otherwise (a dict, an int beyond int64) raises its TypeError/ValueError.
    """
    example_pb2 = pb()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic) and not isinstance(value, (np.bytes_, np.str_)):
        value = value.item()
    if not isinstance(value, list):
        value = [value]
        if not isinstance(value[0], (int, float)):
            return example_pb2.Feature(bytes_list=example_pb2.BytesList(value=[_as_bytes(value[0])]))
    if value and isinstance(value[0], int):  # bools too, as 0 and 1 (protobuf takes no bool for an int64)
        return example_pb2.Feature(
            int64_list=example_pb2.Int64List(value=[int(v) if isinstance(v, bool) else v for v in value])
        )
    if value and isinstance(value[0], float):
        return example_pb2.Feature(float_list=example_pb2.FloatList(value=value))
    return example_pb2.Feature(bytes_list=example_pb2.BytesList(value=[_as_bytes(v) for v in value]))


def example_for(features: Mapping[str, Any]):
    """A tf.train.Example of feature name → tf.train.Feature."""
    return pb().Example(features=pb().Features(feature=features))


def serialize(example) -> bytes:
    return example.SerializeToString(deterministic=True)


class TFRecordSampleWriter:
    """img2dataset's TFRecordSampleWriter (same constructor, methods and files), minus TensorFlow."""

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        from img2dataset.writer import BufferedParquetWriter

        shard_name = f"{shard_id:0{oom_shard_count}d}"
        self.shard_id = shard_id
        # fsspec.open creates the local parent folder, which BufferedParquetWriter below relies on
        self.tf_writer = fsspec.open(f"{output_folder}/{shard_name}.tfrecord", "wb").open()
        try:
            self.buffered_parquet_writer = BufferedParquetWriter(f"{output_folder}/{shard_name}.parquet", schema, 100)
        except BaseException:
            self.tf_writer.close()
            raise
        self.save_caption = save_caption
        self.encode_format = encode_format

    def write(self, img_str, key, caption, meta):
        """Write a sample: a record in the .tfrecord if it has an image, its metadata in the .parquet."""
        if img_str is not None:
            sample = {"key": feature_for(key.encode()), self.encode_format: feature_for(bytes(img_str))}
            if self.save_caption:
                sample["txt"] = feature_for(str(caption) if caption is not None else "")
            for k, v in meta.items():
                sample[k] = feature_for(v)
            self.tf_writer.write(frame_record(serialize(example_for(sample))))
        self.buffered_parquet_writer.write(meta)

    def close(self):
        try:
            self.buffered_parquet_writer.close()
        finally:
            if not self.tf_writer.closed:
                self.tf_writer.close()


def value_of(feature) -> Any:
    """A feature's value: one value as itself (bytes as str where they are UTF-8), several as a list."""
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    if kind == "bytes_list":
        values = [_text(v) for v in values]
    return values[0] if len(values) == 1 else values


def _text(value: bytes) -> str | bytes:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


class TFRecord(Format):
    name = "tfrecord"
    suffix = ".tfrecord"

    def sample_writer(self) -> type:
        return TFRecordSampleWriter

    def read_samples(self, store: Store, shard: int) -> Iterator[Sample]:
        from tfrecord.reader import tfrecord_iterator

        name = self.data_file(shard)
        with local_copy(store, name) as path:
            offset, count = 0, 0
            try:
                for record in tfrecord_iterator(path, None):
                    example = pb().Example.FromString(bytes(record))
                    offset, count = offset + _HEADER + len(record) + _FOOTER, count + 1
                    features = dict(example.features.feature)
                    image = self.image_of(
                        {
                            k: f.bytes_list.value[0]
                            for k, f in features.items()
                            if k in self.image_extensions and f.bytes_list.value
                        }
                    )
                    key = features.pop("key").bytes_list.value[0].decode() if "key" in features else ""
                    caption = features.pop("txt").bytes_list.value[0].decode() if "txt" in features else None
                    meta = {k: value_of(f) for k, f in features.items() if k not in self.image_extensions}
                    yield Sample(key=key, caption=caption, image=image, meta=meta, file=name)
            except RuntimeError as err:  # the tfrecord package's words for a record cut short
                raise BrokenShard(describe(name, path, offset, count, err)) from None


def describe(name: str, path: str, offset: int, count: int, err: Exception) -> str:
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(offset)
        header = f.read(8)
    where = f"{name}: cut short: {size} bytes, after {count} whole records"
    if len(header) < 8:
        return f"{where}: record {count + 1} at byte {offset} has {len(header)} of the 8 bytes of its length"
    (length,) = struct.unpack("<Q", header)
    need = _HEADER + length + _FOOTER
    return (
        f"{where}: record {count + 1} at byte {offset} needs {need} bytes (its {length} bytes of data, "
        f"length and CRCs), {size - offset} are there ({err})"
    )


FORMAT = TFRecord()
