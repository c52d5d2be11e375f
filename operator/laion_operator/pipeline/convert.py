"""Convert: a dataset that already exists, read shard by shard and written again in the part's
outputFormat — the download stage's sibling for parts whose source is `source.dataset`.

Inputs, one Ray task per input shard:

- `webdataset`: img2dataset-style `NNNNN.tar` files of `key.jpg` / `key.txt` / `key.json` (the
  project's own output, or anyone's): each tar is a shard;
- `files`: img2dataset's `files` layout, `NNNNN/` folders of the same three files: each folder a shard
  (both read by their output formats' `read_dataset`, pipeline/formats/);
- `images`: image files and a captions JSONL naming them (micro_diffusion's JourneyDB style,
  `{"img_path": "./000/abc.jpg", "prompt": "…"}`): every `filter.samplesPerShard` lines a shard.

The input shards are listed once into the part's manifest (`contract.MANIFEST`), so that a resumed run
maps shard N to the same input; a shard is finished when its `_stats.json` exists, exactly as for a
download, and a redone shard starts from nothing. Samples are recorded as downloaded ones are
(record.Recorder: the same Resizer, metadata columns and counts; `resizeMode: no` with
`skipReencode: true` keeps their bytes). A sample whose image does not decode is counted as a failure
with reason `decode`, its error message naming the file and sample; an input that cannot be read at
all raises an InputError naming the file and the sample: formats.BrokenShard for a broken tar,
ConvertError for a sample without an image, a JSONL line without its fields, a missing image file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import fsspec
import pyarrow as pa

from ..contract import MANIFEST, ShardStats, fingerprint, sample_key
from ..errors import InputError
from ..spec import Dataset, PartSpec
from ..storage import Store
from . import formats
from .formats import Sample
from .record import KEY, Recorder, clear_shard

# The leading columns of every sample's metadata row (the shard's `.parquet`), whatever the input's
# own json held; record.OUTCOME follows them.
SOURCE = pa.schema(
    [KEY, ("caption", pa.string()), ("url", pa.string()), ("source_file", pa.string()), ("source_key", pa.string())]
)


class ConvertError(InputError):
    """An input dataset that cannot be read; the message names the file and the sample."""


def _fs(uri: str):
    """The input's filesystem; s3:// uses the options Store registered for the part's output."""
    return fsspec.core.url_to_fs(uri.rstrip("/"))


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _resolve(dataset: Dataset, path: str) -> str:
    """A path named by the dataset (captions file, image), relative to its uri unless absolute."""
    if "://" in path or path.startswith("/"):
        return path
    return _join(dataset.uri, path.removeprefix("./"))


# --- listing the input shards ------------------------------------------------------------------


def detect(dataset: Dataset) -> str:
    if dataset.format:
        return dataset.format
    if dataset.captions:
        return "images"
    fs, root = _fs(dataset.uri)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        raise ConvertError(f"spec.source.dataset.uri: {dataset.uri} does not exist") from None
    readers = [f for f in formats.FORMATS.values() if f.reads_datasets]
    for fmt in readers:
        if any(fmt.is_dataset_shard(fs, _join(root, n)) for n in names):
            return fmt.name
    looked = "".join(f"no {fmt.dataset_shards}, " for fmt in readers)
    raise ConvertError(
        f"spec.source.dataset: cannot tell the format of {dataset.uri} ({looked}no captions "
        f"JSONL); found {sorted(names)[:10]}; set format"
    )


def list_inputs(spec: PartSpec) -> list[dict]:
    """The input shards, in order: what output shard N reads."""
    dataset = spec.dataset
    fmt = detect(dataset)
    fs, root = _fs(dataset.uri)
    if fmt == "images":
        if not dataset.captions:
            raise ConvertError(
                "spec.source.dataset.captions: required for format images (the JSONL naming each image and its caption)"
            )
        path = _resolve(dataset, dataset.captions)
        rows = _caption_lines(dataset, _read_bytes(path, "spec.source.dataset.captions"))
        per = spec.filter.samples_per_shard
        # each shard reads its own byte range of the file, not the whole of it
        return [
            {
                "format": fmt,
                "path": path,
                "line": chunk[0]["line"],
                "offset": chunk[0]["offset"],
                "end": chunk[-1]["end"],
            }
            for chunk in (rows[i : i + per] for i in range(0, len(rows), per))
        ]
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        raise ConvertError(f"spec.source.dataset.uri: {dataset.uri} does not exist") from None
    names = sorted(p.rsplit("/", 1)[-1] for p in entries)
    reader = formats.get(fmt)
    shards = [n for n in names if reader.is_dataset_shard(fs, _join(root, n))]
    if not shards:
        raise ConvertError(f"spec.source.dataset.uri: no {reader.dataset_shards} in {dataset.uri}")
    return [{"format": fmt, "path": _join(dataset.uri, n)} for n in shards]


def _read_bytes(path: str, field: str, start: int = 0, end: int | None = None) -> bytes:
    fs, file = _fs(path)
    try:
        with fs.open(file, "rb") as f:
            f.seek(start)
            return f.read() if end is None else f.read(end - start)
    except FileNotFoundError:
        raise ConvertError(f"{field}: {path} does not exist") from None


def _caption_lines(dataset: Dataset, data: bytes, first_line: int = 1, offset: int = 0) -> list[dict]:
    """The lines of (a byte range of) the captions JSONL, each checked to name its image and caption."""
    path = _resolve(dataset, dataset.captions)
    rows = []
    for number, line in enumerate(data.splitlines(keepends=True), first_line):
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ConvertError(f"{path} line {number}: not JSON: {err}") from None
        if not isinstance(row, dict) or not isinstance(row.get(dataset.image_field), str):
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ConvertError(
                f"{path} line {number}: no {dataset.image_field!r} field naming the image "
                f"(spec.source.dataset.imageField); it has {fields}"
            )
        if dataset.caption_field not in row:
            raise ConvertError(
                f"{path} line {number}: no {dataset.caption_field!r} field with the caption "
                f"(spec.source.dataset.captionField); it has {sorted(row)}"
            )
        rows.append(
            {
                "line": number,
                "offset": start,
                "end": offset,
                "image": row[dataset.image_field],
                "caption": row[dataset.caption_field],
            }
        )
    if not rows and first_line == 1:
        raise ConvertError(f"{path}: no lines")
    return rows


def plan(spec: PartSpec, store: Store) -> dict:
    """List the input shards into the manifest, or reuse an earlier run's list (same fingerprint)."""
    fp = fingerprint(spec)
    done = store.read_json(MANIFEST)
    if done is not None:
        if done.get("fingerprint") != fp:
            raise ConvertError(
                f"output {store.uri} holds shards of a different source or filter; use a new "
                "output.uri or remove the old output first"
            )
        return done
    inputs = list_inputs(spec)
    manifest = {"fingerprint": fp, "shards": len(inputs), "inputs": inputs}
    store.write_json(manifest, MANIFEST)
    return manifest


# --- reading one input shard -------------------------------------------------------------------


def read_captioned(dataset: Dataset, entry: dict) -> Iterator[Sample]:
    path = entry["path"]
    data = _read_bytes(path, "spec.source.dataset.captions", entry["offset"], entry["end"])
    for row in _caption_lines(dataset, data, entry["line"], entry["offset"]):
        image = _resolve(dataset, row["image"])
        fs, file = _fs(image)
        try:
            with fs.open(file, "rb") as f:
                content = f.read()
        except FileNotFoundError:
            raise ConvertError(f"{path} line {row['line']}: image {image} does not exist") from None
        caption = row["caption"]
        yield Sample(
            key=str(row["image"]).rsplit("/", 1)[-1].rsplit(".", 1)[0],
            caption=caption if caption is None else str(caption),
            image=content,
            meta={},
            file=f"{path} line {row['line']}",
        )


def read_input(spec: PartSpec, entry: dict) -> Iterator[Sample]:
    """The samples of one input shard, keyed by their base names; each has its image (ConvertError
    naming the sample otherwise)."""
    if entry["format"] == "images":
        yield from read_captioned(spec.dataset, entry)
        return
    fmt = formats.get(entry["format"])
    for sample in fmt.read_dataset(entry["path"]):
        key = sample.key.rsplit("/", 1)[-1]
        if sample.image is None:
            raise ConvertError(f"{sample.file}: sample {key}: no image (one of .{', .'.join(fmt.image_extensions)})")
        yield sample._replace(key=key)


# --- writing one output shard ------------------------------------------------------------------


def convert_shard(
    spec: PartSpec, shard: int, report: Callable[[ShardStats], None] | None = None, report_every: float = 2.0
) -> ShardStats:
    """Convert input shard `shard` into output shard `shard`; returns its stats (also its _stats.json)."""
    store = Store(spec.output)
    clear_shard(store, shard)
    entry = store.read_json(MANIFEST)["inputs"][shard]
    stats = ShardStats(shard=shard, start_time=time.time())
    recorder = Recorder(spec.download, store, stats, True, SOURCE, report=report, report_every=report_every)
    try:
        for index, sample in enumerate(read_input(spec, entry)):
            stats.count += 1
            key = sample_key(shard, index, spec.filter.samples_per_shard)
            url = sample.meta.get("url")
            leading = {
                "key": key,
                "caption": sample.caption,
                "url": url if isinstance(url, str) else None,
                "source_file": sample.file,
                "source_key": sample.key,
            }
            recorder.image(leading, sample.caption, sample.image, where=f"{sample.file}: sample {sample.key}: ")
    except BaseException:
        recorder.close()
        raise
    return recorder.finish()
