"""What every output format is, and the pieces the formats share.

A format (one module beside this one) knows everything about its shards: the file (or folder) a
shard's samples go to, the sample writer that makes them, `read_samples` that reads them back as
`Sample`s, the rows of its annotation file, the extensions its images go under and whether convert
reads datasets in it. A stage, resume and the tests ask the format
(`formats.get(spec.download.output_format)`) instead of branching on its name.

Every format also writes img2dataset's `<shard>.parquet` beside its data, the metadata and status of
every sample; `read_metadata` reads it. A shard that cannot be read raises `BrokenShard`, whose
message says in words which file is broken and how: its size, what the reader expected there.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import fsspec

from ...contract import SHARD_DIGITS, ShardStats, shard_metadata, shard_name
from ...errors import InputError
from ...spec import ENCODE_FORMATS, Dataset, Download
from ...storage import Store

# What an image file in a dataset may be called (convert reads anyone's tars and folders); our writers
# name images by download.encodeFormat, one of spec.ENCODE_FORMATS.
IMAGE_FILES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_FILES = ("txt", "caption")


class Sample(NamedTuple):
    key: str
    caption: str | None
    image: bytes | None  # None: the shard holds the sample without an image
    meta: dict  # the metadata the shard stores with the sample (empty where it stores none)
    file: str  # what it was read from: a data file relative to the output, or an input's path


class BrokenShard(InputError):
    """A shard that cannot be read: the message names the file and what is wrong with it."""


class ConvertError(InputError):
    """An input dataset that cannot be read; the message names the file and the sample."""


class Format:
    """The base of every format; a subclass names itself, gives its sample writer and reads its shards."""

    name = ""
    suffix = ""  # of the file a shard's samples go to, after its number; none: a folder of that number
    image_extensions: tuple[str, ...] = tuple(ENCODE_FORMATS)
    reads_datasets = False  # convert reads existing datasets in this format (spec.source.dataset.format)
    dataset_shards = ""  # what a dataset's input shards are, in words (`reads_datasets` formats only)
    img2dataset_writer = ""  # the name of img2dataset's sample writer for the format, where it has one
    # Modules its sample writer imports on first use, imported by the workers while Ray starts
    # (runtime.start_ray's warm-up) rather than by each worker's first shard.
    writer_imports: tuple[str, ...] = ()

    def sample_writer(self) -> type:
        """The class of the format's sample writers, in img2dataset's shape: its constructor,
        `write(img_str, key, caption, meta)` and `close()` (imported when a shard is written)."""
        from img2dataset import writer

        return getattr(writer, self.img2dataset_writer)

    def writer(self, opts: Download, shard: int, output: str, save_caption: bool, schema):
        """The sample writer of one shard."""
        return self.sample_writer()(shard, output, save_caption, SHARD_DIGITS, schema, opts.encode_format)

    def data_file(self, shard: int) -> str:
        """The file (or folder) of the output that holds the shard's samples."""
        return shard_name(shard) + self.suffix

    def shard_of(self, file_name: str) -> int | None:
        """The shard whose data file (or folder) this entry of the output is, or None (resume's pattern
        for stray shards)."""
        return numbered(file_name, self.suffix)

    def read_samples(self, store: Store, shard: int) -> Iterator[Sample]:
        """The samples one shard of the output holds, as its data file(s) hold them."""
        raise NotImplementedError

    # Reading an existing dataset (`reads_datasets` formats only): convert's input.

    def claims(self, dataset: Dataset) -> bool:
        """Whether the spec alone says the dataset is in this format (before its folder is looked at)."""
        return False

    def is_dataset_shard(self, fs, path: str) -> bool:
        """Whether `path`, an entry of a dataset's folder, is one of its shards."""
        return False

    def dataset_inputs(self, dataset: Dataset, samples_per_shard: int) -> list[dict]:
        """The dataset's input shards, in order (what output shard N reads), as the part's manifest lists them."""
        raise NotImplementedError(f"convert does not read {self.name} datasets")

    def read_input(self, dataset: Dataset, entry: dict) -> Iterator[Sample]:
        """The samples of one input shard, an entry of `dataset_inputs`."""
        raise NotImplementedError(f"convert does not read {self.name} datasets")

    def annotation_rows(self, store: Store, opts: Download, shards: list[ShardStats]) -> tuple[list[str], Iterable]:
        """The header and rows of the part's annotation file (contract.annotations): a row a data file."""
        return ["path", "num_samples"], ((store.url(self.data_file(s.shard)), s.successes) for s in shards)

    def annotated(self, row: dict, prefix: str) -> tuple[str, int]:
        """What an annotation row says: the data file it lists (relative to the output) and its samples."""
        return row["path"].removeprefix(prefix), int(row["num_samples"])

    def annotate(self, store: Store, shards: list[ShardStats]) -> None:
        """Whatever else the format writes for the whole part once its shards are done (mds: the root index)."""

    def image_of(self, fields: dict) -> bytes | None:
        """The image among a sample's fields (named by extension or column), or None."""
        return next((fields[e] for e in self.image_extensions if fields.get(e) is not None), None)


class Grouped(Format):
    """A format whose shard is a group of files per sample (a tar's members, a folder's files), read
    as webdataset groups them; convert reads anyone's datasets in it too."""

    image_extensions = IMAGE_FILES
    reads_datasets = True

    def read(self, fs, path: str, where: str) -> Iterator[Sample]:
        """The samples of the shard at `path` on `fs`, their `file` being `where`."""
        raise NotImplementedError

    def read_samples(self, store: Store, shard: int) -> Iterator[Sample]:
        name = self.data_file(shard)
        return self.read(store.fs, store.path(name), name)

    def dataset_inputs(self, dataset: Dataset, samples_per_shard: int) -> list[dict]:
        """Each of the folder's shards (a tar, a folder) is an input shard, whatever its samples."""
        fs, root = fsspec.core.url_to_fs(dataset.uri.rstrip("/"))
        try:
            entries = fs.ls(root, detail=False)
        except FileNotFoundError:
            raise ConvertError(f"spec.source.dataset.uri: {dataset.uri} does not exist") from None
        names = sorted(p.rsplit("/", 1)[-1] for p in entries)
        shards = [n for n in names if self.is_dataset_shard(fs, f"{root.rstrip('/')}/{n}")]
        if not shards:
            raise ConvertError(f"spec.source.dataset.uri: no {self.dataset_shards} in {dataset.uri}")
        return [{"path": f"{dataset.uri.rstrip('/')}/{n}"} for n in shards]

    def read_input(self, dataset: Dataset, entry: dict) -> Iterator[Sample]:
        fs, local = fsspec.core.url_to_fs(entry["path"].rstrip("/"))
        return self.read(fs, local, entry["path"])


def numbered(file_name: str, suffix: str) -> int | None:
    """The shard of a file named by its number and `suffix` (00042.tar, 00042_stats.json), or None."""
    m = re.fullmatch(rf"(\d{{{SHARD_DIGITS}}}){re.escape(suffix)}", file_name)
    return int(m.group(1)) if m else None


def read_metadata(store: Store, shard: int):
    """The shard's `<shard>.parquet`: every sample's metadata row and status."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = shard_metadata(shard)
    with store.fs.open(store.path(name), "rb") as f:
        data = f.read()
    try:
        return pq.read_table(io.BytesIO(data))
    except pa.ArrowException as err:
        raise BrokenShard(describe_parquet(name, data, err)) from None


def describe_parquet(name: str, data: bytes, err: Exception) -> str:
    # A parquet file ends with its footer, the footer's 4-byte length and the marker PAR1.
    if len(data) < 12 or data[:4] != b"PAR1":
        return f"{name}: {len(data)} bytes, not a parquet file (it does not start with the PAR1 marker)"
    if data[-4:] != b"PAR1":
        return (
            f"{name}: cut short: {len(data)} bytes, ending without the footer and PAR1 marker that end a parquet file"
        )
    footer = int.from_bytes(data[-8:-4], "little")
    if footer + 12 > len(data):
        return f"{name}: {len(data)} bytes, but its footer says it is {footer} bytes long: the file is damaged"
    return f"{name}: {len(data)} bytes, unreadable as parquet: {err}"


def successes(table) -> list[dict]:
    """The rows of the samples that were written with an image."""
    return [row for row in table.to_pylist() if row["status"] == "success"]


def group(members: Iterable[tuple[str, bytes]], where: str, image_extensions: tuple[str, ...]) -> Iterator[Sample]:
    """Files grouped into samples by key (the base name up to its first dot), as webdataset groups a
    tar's members: the image, the caption (`.txt`) and the metadata (`.json`) of each sample."""
    current: dict | None = None
    for name, data in members:
        prefix, _, base = name.rpartition("/")
        if "." not in base or base.startswith("_"):
            continue  # img2dataset's own _stats.json and the like
        stem, ext = base.split(".", 1)
        key, ext = (f"{prefix}/{stem}" if prefix else stem), ext.lower()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield _sample(current, where, image_extensions)
            current = {"__key__": key}
        if ext in current:
            raise BrokenShard(f"{where}: sample {key}: two files named {key}.{ext}")
        current[ext] = data
    if current is not None:
        yield _sample(current, where, image_extensions)


def _sample(files: dict, where: str, image_extensions: tuple[str, ...]) -> Sample:
    key = files["__key__"]
    meta = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError as err:
            raise BrokenShard(
                f"{where}: sample {key}: {key}.json ({len(files['json'])} bytes) is not JSON: {err}"
            ) from None
    meta = meta if isinstance(meta, dict) else {}
    caption = next((files[e].decode("utf-8", "replace") for e in CAPTION_FILES if e in files), None)
    if caption is None and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    image = next((files[e] for e in image_extensions if e in files), None)
    return Sample(key=key, caption=caption, image=image, meta=meta, file=where)


@contextlib.contextmanager
def local_copy(store: Store, relative: str) -> Iterator[str]:
    """A local path to a file or folder of the output, for readers that take paths only (a copy, for
    an output in an object store)."""
    if "://" not in store.uri:
        yield store.path(relative)
        return
    with tempfile.TemporaryDirectory(prefix="laion-read-") as workdir:
        target = os.path.join(workdir, relative)
        store.fs.get(store.path(relative), target, recursive=store.fs.isdir(store.path(relative)))
        yield target


def csv_text(header: list[str], rows: Iterable) -> str:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(header)
    out.writerows(rows)
    return buf.getvalue()
