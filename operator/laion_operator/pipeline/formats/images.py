"""images: image files and a captions JSONL naming them (micro_diffusion's JourneyDB style,
`{"img_path": "./000/abc.jpg", "prompt": "…"}`), a dataset convert reads; never written.

Every `filter.samplesPerShard` lines of the JSONL are an input shard, which reads its own byte range
of the file, not the whole of it. A line without its fields or naming a missing image raises
ConvertError naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import fsspec

from ...spec import Dataset
from .base import ConvertError, Format, Sample


class CaptionedImages(Format):
    name = "images"
    reads_datasets = True
    dataset_shards = "captions JSONL"

    def claims(self, dataset: Dataset) -> bool:
        return bool(dataset.captions)

    def dataset_inputs(self, dataset: Dataset, samples_per_shard: int) -> list[dict]:
        if not dataset.captions:
            raise ConvertError(
                "spec.source.dataset.captions: required for format images (the JSONL naming each image and its caption)"
            )
        path = resolve(dataset, dataset.captions)
        rows = caption_lines(dataset, read_bytes(path, "spec.source.dataset.captions"))
        return [
            {"path": path, "line": chunk[0]["line"], "offset": chunk[0]["offset"], "end": chunk[-1]["end"]}
            for chunk in (rows[i : i + samples_per_shard] for i in range(0, len(rows), samples_per_shard))
        ]

    def read_input(self, dataset: Dataset, entry: dict) -> Iterator[Sample]:
        path = entry["path"]
        data = read_bytes(path, "spec.source.dataset.captions", entry["offset"], entry["end"])
        for row in caption_lines(dataset, data, entry["line"], entry["offset"]):
            image = resolve(dataset, row["image"])
            fs, file = fsspec.core.url_to_fs(image.rstrip("/"))
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


def resolve(dataset: Dataset, path: str) -> str:
    """A path named by the dataset (captions file, image), relative to its uri unless absolute."""
    if "://" in path or path.startswith("/"):
        return path
    return f"{dataset.uri.rstrip('/')}/{path.removeprefix('./')}"


def read_bytes(path: str, field: str, start: int = 0, end: int | None = None) -> bytes:
    fs, file = fsspec.core.url_to_fs(path.rstrip("/"))
    try:
        with fs.open(file, "rb") as f:
            f.seek(start)
            return f.read() if end is None else f.read(end - start)
    except FileNotFoundError:
        raise ConvertError(f"{field}: {path} does not exist") from None


def caption_lines(dataset: Dataset, data: bytes, first_line: int = 1, offset: int = 0) -> list[dict]:
    """The lines of (a byte range of) the captions JSONL, each checked to name its image and caption."""
    path = resolve(dataset, dataset.captions or "")
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


FORMAT = CaptionedImages()
