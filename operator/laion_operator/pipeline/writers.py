"""Sample writers img2dataset does not have, in its writers' shape: a TensorFlow-free drop-in for its
`TFRecordSampleWriter`, and `MDSSampleWriter` (MosaicML streaming's format) at the end.

img2dataset's TFRecord writer imports tensorflow and tensorflow_io (gigabytes) only to build
`tf.train.Example` messages and to frame them as TFRecords. Both are small, stable formats, so this
module writes them by hand and produces the same files: `<shard>.tfrecord` holding one serialized
`tf.train.Example` per successfully downloaded sample, plus img2dataset's `<shard>.parquet` with the
metadata of every sample.

tf.train.Example, from tensorflow/core/example/{example,feature}.proto (proto3):

    message BytesList { repeated bytes value = 1; }
    message FloatList { repeated float value = 1 [packed = true]; }
    message Int64List { repeated int64 value = 1 [packed = true]; }
    message Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                                     Int64List int64_list = 3; } }
    message Features  { map<string, Feature> feature = 1; }
    message Example   { Features features = 1; }

A TFRecord file is a sequence of records, each
`uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)`, all little-endian,
where masked_crc32c(x) = ((c >> 15 | c << 17) + 0xa282ead8) mod 2**32 with c the CRC-32C of x.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import tempfile
from typing import Any, Mapping

import fsspec
import google_crc32c
import numpy as np
from img2dataset.writer import BufferedParquetWriter

__all__ = ["MDSSampleWriter", "TFRecordSampleWriter", "encode_example", "feature_for", "frame_record", "masked_crc32c"]

_LEN = 2  # protobuf wire type of length-delimited fields
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_MASK_DELTA = 0xA282EAD8

# Feature.kind field numbers
BYTES_LIST, FLOAT_LIST, INT64_LIST = 1, 2, 3


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return b"".join((length, struct.pack("<I", masked_crc32c(length)), data,
                     struct.pack("<I", masked_crc32c(data))))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (sub-message, bytes, string or packed repeated scalars)."""
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    # tf.train.BytesList (protobuf) rejects anything else the same way
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in a tf.train.BytesList")


def _as_int64(value: Any) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int):
        raise TypeError(f"cannot store {type(value).__name__} {value!r} in a tf.train.Int64List")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"value out of int64 range: {value}")
    return value & 0xFFFFFFFFFFFFFFFF  # negative numbers are sent as their 64-bit two's complement


def _pack_float(value: Any) -> bytes:
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"cannot store {type(value).__name__} {value!r} in a tf.train.FloatList")
    try:
        return struct.pack("<f", value)
    except OverflowError:  # a C double→float cast, as protobuf does, gives ±inf
        return struct.pack("<f", math.copysign(math.inf, value))


def _bytes_list(values: list) -> bytes:
    return _field(BYTES_LIST, b"".join(_field(1, _as_bytes(v)) for v in values))


def _float_list(values: list) -> bytes:
    packed = b"".join(_pack_float(v) for v in values)
    return _field(FLOAT_LIST, _field(1, packed) if packed else b"")


def _int64_list(values: list) -> bytes:
    packed = b"".join(_varint(_as_int64(v)) for v in values)
    return _field(INT64_LIST, _field(1, packed) if packed else b"")


def feature_for(value: Any) -> bytes:
    """A serialized tf.train.Feature for one value, typed as img2dataset's `_feature` types it.

    list → by its first element: int → int64_list, float → float_list, else bytes_list (str
    UTF-8 encoded, None → b""); int (bool included) → int64_list; float → float_list; anything else
    → bytes_list of one value (str UTF-8 encoded, None → b""). Where img2dataset (through protobuf)
    raises instead, this writes: an empty list as an empty bytes_list, None inside a list of strings as
    b"", numpy scalars/arrays as their Python values, bytearray/memoryview as bytes. Values protobuf
    rejects otherwise (say a dict, or an int beyond int64) raise TypeError/ValueError here too.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic) and not isinstance(value, (np.bytes_, np.str_)):
        value = value.item()
    if isinstance(value, list):
        if value and isinstance(value[0], int):
            return _int64_list(value)
        if value and isinstance(value[0], float):
            return _float_list(value)
        return _bytes_list(value)
    if isinstance(value, int):
        return _int64_list([value])
    if isinstance(value, float):
        return _float_list([value])
    return _bytes_list([value])


def encode_example(features: Mapping[str, bytes]) -> bytes:
    """A serialized tf.train.Example from feature name → serialized tf.train.Feature."""
    entries = []
    for name, feature in features.items():
        if not isinstance(name, str):
            raise TypeError(f"feature names must be str, not {type(name).__name__} {name!r}")
        entries.append(_field(1, _field(1, name.encode()) + _field(2, feature)))
    return _field(1, b"".join(entries))


class TFRecordSampleWriter:
    """img2dataset's TFRecordSampleWriter (same constructor, methods and files), minus TensorFlow."""

    def __init__(
        self,
        shard_id,
        output_folder,
        save_caption,
        oom_shard_count,
        schema,
        encode_format,
    ):
        self.oom_shard_count = oom_shard_count
        shard_name = f"{shard_id:0{oom_shard_count}d}"
        self.shard_id = shard_id
        # fsspec.open creates the local parent folder, which BufferedParquetWriter below relies on
        self.tf_writer = fsspec.open(f"{output_folder}/{shard_name}.tfrecord", "wb").open()
        try:
            self.buffered_parquet_writer = BufferedParquetWriter(
                output_folder + "/" + shard_name + ".parquet", schema, 100)
        except BaseException:
            self.tf_writer.close()
            raise
        self.save_caption = save_caption
        self.encode_format = encode_format

    def write(self, img_str, key, caption, meta):
        """Write a sample: a record in the .tfrecord if it has an image, its metadata in the .parquet."""
        if img_str is not None:
            sample = {
                "key": _bytes_list([key.encode()]),
                self.encode_format: _bytes_list([img_str]),
            }
            if self.save_caption:
                sample["txt"] = _bytes_list([str(caption) if caption is not None else ""])
            for k, v in meta.items():
                sample[k] = feature_for(v)
            self.tf_writer.write(frame_record(encode_example(sample)))
        self.buffered_parquet_writer.write(meta)

    def close(self):
        try:
            self.buffered_parquet_writer.close()
        finally:
            if not self.tf_writer.closed:
                self.tf_writer.close()


class MDSSampleWriter:
    """MosaicML streaming's MDS format, written by streaming's own `MDSWriter`, in img2dataset's
    writer shape: `<shard>/` holds the shard's MDS files (index.json, shard.00000.mds, …) and
    `<shard>.parquet` the metadata of every sample, as img2dataset's writers do.

    Columns: the image (`jpg`/`png`/`webp`, encoded bytes), `key` and `caption` (str), and every other
    metadata field as `json` (MDS's scalar encodings cannot hold a missing value; json keeps None,
    ints and floats as they were). The MDS files are written to a local folder and, for an s3://
    output, put into the bucket through the process's fsspec options, so they travel with the same
    credentials, endpoint and addressing as every other file of the part (streaming's own uploader
    reads only boto3's environment).
    """

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format,
                 size_limit=None):
        from streaming import MDSWriter  # torch and streaming: only for parts that write MDS

        from ..spec import MDS_SHARD_SIZE

        self.shard_name = f"{shard_id:0{oom_shard_count}d}"
        self.output_folder = output_folder
        self.remote = "://" in output_folder
        self.local = tempfile.mkdtemp(prefix="laion-mds-") if self.remote else f"{output_folder}/{self.shard_name}"
        self.encode_format = encode_format
        self.save_caption = save_caption
        self.columns = {encode_format: "bytes", "key": "str"}
        if save_caption:
            self.columns["caption"] = "str"
        for name in schema.names:
            self.columns.setdefault(name, "json")
        self.buffered_parquet_writer = BufferedParquetWriter(
            output_folder + "/" + self.shard_name + ".parquet", schema, 100)
        self.mds = MDSWriter(columns=self.columns, out=self.local, size_limit=size_limit or MDS_SHARD_SIZE,
                             exist_ok=True)

    def write(self, img_str, key, caption, meta):
        if img_str is not None:
            sample = {name: meta.get(name) for name, kind in self.columns.items() if kind == "json"}
            sample.update({self.encode_format: bytes(img_str), "key": key})
            if self.save_caption:
                sample["caption"] = str(caption) if caption is not None else ""
            self.mds.write(sample)
        self.buffered_parquet_writer.write(meta)

    def close(self):
        try:
            self.buffered_parquet_writer.close()
            self.mds.finish()
            if self.remote:
                fs, root = fsspec.core.url_to_fs(f"{self.output_folder}/{self.shard_name}")
                for name in sorted(os.listdir(self.local)):
                    fs.put_file(os.path.join(self.local, name), f"{root}/{name}")
        finally:
            if self.remote:
                shutil.rmtree(self.local, ignore_errors=True)
