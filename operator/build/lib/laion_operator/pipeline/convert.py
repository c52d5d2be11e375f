"""Convert: a dataset that already exists, read shard by shard and written again in the part's
outputFormat — the download stage's sibling for parts whose source is `source.dataset`.

Inputs, one Ray task per input shard:

- `webdataset`: img2dataset-style `NNNNN.tar` files of `key.jpg` / `key.txt` / `key.json` (the
  project's own output, or anyone's): each tar is a shard;
- `files`: img2dataset's `files` layout, `NNNNN/` folders of the same three files: each folder a shard;
- `images`: image files and a captions JSONL naming them (micro_diffusion's JourneyDB style,
  `{"img_path": "./000/abc.jpg", "prompt": "…"}`): every `filter.samplesPerShard` lines a shard.

The input shards are listed once into the part's manifest (`contract.MANIFEST`), so that a resumed run
maps shard N to the same input; a shard is finished when its `_stats.json` exists, exactly as for a
download, and a redone shard starts from nothing. Images go through the same Resizer as downloaded
ones (`resizeMode: no` with `skipReencode: true` keeps their bytes). A sample whose image does not
decode is counted as a failure with reason `decode`, its error message naming the file and sample; an
input that cannot be read at all (a broken tar, a JSONL line without its fields, a missing image
file) raises ConvertError naming the file and the sample.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import fsspec
import pyarrow as pa

from ..contract import MANIFEST, ShardStats, fingerprint, sample_key
from ..errors import InputError
from ..spec import Dataset, PartSpec
from ..storage import Store
from .download import clear_shard, finish_shard, make_resizer, make_writer, resize_reason

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_EXTENSIONS = ("txt", "caption")

# Every sample's metadata row (the shard's `.parquet`), whatever the input's own json held.
SCHEMA = pa.schema([
    ("key", pa.string()), ("caption", pa.string()), ("url", pa.string()), ("source_file", pa.string()),
    ("source_key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
    ("failure_reason", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()),
])


class ConvertError(InputError):
    """An input dataset that cannot be read; the message names the file and the sample."""


@dataclass
class Sample:
    key: str  # the key in the input (a tar member's or file's base name, or the JSONL line)
    file: str  # where it came from, as a person finds it: the tar, folder or JSONL line
    image: bytes
    caption: str | None
    url: str | None


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
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    if any(n.isdigit() and fs.isdir(_join(root, n)) for n in names):
        return "files"
    raise ConvertError(f"spec.source.dataset: cannot tell the format of {dataset.uri} (no NNNNN.tar files, no "
                       f"NNNNN/ folders, no captions JSONL); found {sorted(names)[:10]}; set format")


def list_inputs(spec: PartSpec) -> list[dict]:
    """The input shards, in order: what output shard N reads."""
    dataset = spec.dataset
    fmt = detect(dataset)
    fs, root = _fs(dataset.uri)
    if fmt == "images":
        if not dataset.captions:
            raise ConvertError("spec.source.dataset.captions: required for format images (the JSONL naming "
                               "each image and its caption)")
        path = _resolve(dataset, dataset.captions)
        rows = _caption_lines(dataset, _read_bytes(path, "spec.source.dataset.captions"))
        per = spec.filter.samples_per_shard
        # each shard reads its own byte range of the file, not the whole of it
        return [{"format": fmt, "path": path, "line": chunk[0]["line"], "offset": chunk[0]["offset"],
                 "end": chunk[-1]["end"]} for chunk in (rows[i:i + per] for i in range(0, len(rows), per))]
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        raise ConvertError(f"spec.source.dataset.uri: {dataset.uri} does not exist") from None
    names = sorted(p.rsplit("/", 1)[-1] for p in entries)
    if fmt == "webdataset":
        shards = [n for n in names if n.endswith(".tar")]
    else:
        shards = [n for n in names if n.isdigit() and fs.isdir(_join(root, n))]
    if not shards:
        what = "NNNNN.tar files" if fmt == "webdataset" else "NNNNN/ folders"
        raise ConvertError(f"spec.source.dataset.uri: no {what} in {dataset.uri}")
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
            raise ConvertError(f"{path} line {number}: no {dataset.image_field!r} field naming the image "
                               f"(spec.source.dataset.imageField); it has {fields}")
        if dataset.caption_field not in row:
            raise ConvertError(f"{path} line {number}: no {dataset.caption_field!r} field with the caption "
                               f"(spec.source.dataset.captionField); it has {sorted(row)}")
        rows.append({"line": number, "offset": start, "end": offset, "image": row[dataset.image_field],
                     "caption": row[dataset.caption_field]})
    if not rows and first_line == 1:
        raise ConvertError(f"{path}: no lines")
    return rows


def plan(spec: PartSpec, store: Store) -> dict:
    """List the input shards into the manifest, or reuse an earlier run's list (same fingerprint)."""
    fp = fingerprint(spec)
    done = store.read_json(MANIFEST)
    if done is not None:
        if done.get("fingerprint") != fp:
            raise ConvertError(f"output {store.uri} holds shards of a different source or filter; use a new "
                               "output.uri or remove the old output first")
        return done
    inputs = list_inputs(spec)
    manifest = {"fingerprint": fp, "shards": len(inputs), "inputs": inputs}
    store.write_json(manifest, MANIFEST)
    return manifest


# --- reading one input shard -------------------------------------------------------------------


def _group(members: Iterator[tuple[str, bytes]], where: str) -> Iterator[dict]:
    """Files grouped by key (all before the first dot of the base name), as webdataset groups them."""
    current: dict | None = None
    for name, data in members:
        prefix, _, base = name.rpartition("/")
        if "." not in base or base.startswith("_"):
            continue  # img2dataset's own _stats.json and the like
        stem, ext = base.split(".", 1)
        key, ext = (f"{prefix}/{stem}" if prefix else stem), ext.lower()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key}
        if ext in current:
            raise ConvertError(f"{where}: sample {key}: two files named {key}.{ext}")
        current[ext] = data
    if current is not None:
        yield current


def _sample(files: dict, where: str) -> Sample:
    key = files["__key__"]
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if image_ext is None:
        raise ConvertError(f"{where}: sample {key}: no image (one of .{', .'.join(IMAGE_EXTENSIONS)}); "
                           f"it has {sorted(k for k in files if k != '__key__')}")
    meta = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError as err:
            raise ConvertError(f"{where}: sample {key}: {key}.json is not JSON: {err}") from None
    caption = next((files[e].decode("utf-8", "replace") for e in CAPTION_EXTENSIONS if e in files), None)
    if caption is None and isinstance(meta, dict):
        caption = meta.get("caption")
    url = meta.get("url") if isinstance(meta, dict) else None
    return Sample(key=key.rsplit("/", 1)[-1], file=where, image=files[image_ext], caption=caption,
                  url=url if isinstance(url, str) else None)


def read_tar(path: str) -> Iterator[Sample]:
    fs, file = _fs(path)
    try:
        with fs.open(file, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            def members():
                for info in tar:
                    if info.isfile():
                        yield info.name, tar.extractfile(info).read()
            for files in _group(members(), path):
                yield _sample(files, path)
    except tarfile.TarError as err:
        raise ConvertError(f"{path}: not a readable tar: {err}") from None


def read_folder(path: str) -> Iterator[Sample]:
    fs, folder = _fs(path)

    def members():
        for name in sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)):
            with fs.open(_join(folder, name), "rb") as f:
                yield name, f.read()

    for files in _group(members(), path):
        yield _sample(files, path)


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
        yield Sample(key=str(row["image"]).rsplit("/", 1)[-1].rsplit(".", 1)[0], file=f"{path} line {row['line']}",
                     image=content, caption=caption if caption is None else str(caption), url=None)


def read_input(spec: PartSpec, entry: dict) -> Iterator[Sample]:
    if entry["format"] == "webdataset":
        return read_tar(entry["path"])
    if entry["format"] == "files":
        return read_folder(entry["path"])
    return read_captioned(spec.dataset, entry)


# --- writing one output shard ------------------------------------------------------------------


def convert_shard(spec: PartSpec, shard: int,
                  report: Callable[[ShardStats], None] | None = None, report_every: float = 2.0) -> ShardStats:
    """Convert input shard `shard` into output shard `shard`; returns its stats (also its _stats.json)."""
    opts = spec.download
    store = Store(spec.output)
    clear_shard(store, shard)
    entry = store.read_json(MANIFEST)["inputs"][shard]
    stats = ShardStats(shard=shard, start_time=time.time())
    reasons: Counter[str] = Counter()
    resizer = make_resizer(opts)
    writer = make_writer(opts, shard, store.uri, True, SCHEMA)
    last_report = time.monotonic()
    try:
        for index, sample in enumerate(read_input(spec, entry)):
            stats.count += 1
            key = sample_key(shard, index, spec.filter.samples_per_shard)
            meta = {"key": key, "caption": sample.caption, "url": sample.url, "source_file": sample.file,
                    "source_key": sample.key, "status": None, "error_message": None, "failure_reason": None,
                    "width": None, "height": None, "original_width": None, "original_height": None}
            image, width, height, orig_w, orig_h, message = resizer(io.BytesIO(sample.image))
            if message is not None:
                image = None
                reason = resize_reason(message)
                stats.failed_to_resize += 1
                meta.update(status="failed_to_resize", failure_reason=reason,
                            error_message=f"{sample.file}: sample {sample.key}: {message}")
                reasons[reason] += 1
            else:
                stats.successes += 1
                meta.update(status="success", width=width, height=height, original_width=orig_w,
                            original_height=orig_h)
            writer.write(image, key, sample.caption, meta)
            if report and time.monotonic() - last_report >= report_every:
                stats.failed_by_reason = dict(reasons)
                report(stats)
                last_report = time.monotonic()
    finally:
        writer.close()
    return finish_shard(store, stats, reasons)
