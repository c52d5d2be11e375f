"""Parquet with the images inside (`source.embedded`): rows whose image column holds the image's bytes,
or the Hugging Face `{"bytes", "path"}` image struct (TextCaps, and most image datasets on the Hub),
with a caption column (a string, or a list of strings whose first is taken: TextCaps' `reference_strs`)
and the row's other scalar columns as its metadata.

Input shards are row ranges of one file, cut where row groups start: row groups are gathered until
they hold `filter.samplesPerShard` rows, and a row group larger than that is cut into ranges of that
size. A shard is read row group by row group in small batches, so memory holds a batch of images, never
a file. Files are opened as the URL list's parquet files are (local, http(s)://, s3://), listed by
`urls` or numbered by a `pattern` from `first` to `last` (spec/patterns, as archives take one).
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ...spec import PartSpec
from ...spec.model import Embedded
from ...spec.schema_source import CAPTION_COLUMNS, IMAGE_COLUMNS
from ..formats import ConvertError, Sample
from .base import MetadataError, SampleSource, scalar_type
from .parquet import open_parquet

# Rows a batch: a batch's images are in memory at once (HF image parquet: about 100-500 KB a row).
BATCH_ROWS = 32


class EmbeddedSource(SampleSource):
    name = "embedded"

    def selected(self, spec: PartSpec) -> bool:
        return spec.embedded is not None

    def describe(self, spec: PartSpec) -> str:
        files = _embedded(spec).files
        return f"{len(files)} parquet file{'s' if len(files) > 1 else ''} with the images inside"

    def list_inputs(self, spec: PartSpec) -> list[dict]:
        embedded, per_shard = _embedded(spec), spec.filter.samples_per_shard
        entries = []
        for url in embedded.files:
            file = _open(url)
            image, caption = columns_of(embedded, url, file.schema_arrow)
            sizes = [file.metadata.row_group(i).num_rows for i in range(file.metadata.num_row_groups)]
            file.close()
            entries += [
                {"file": url, "image": image, "caption": caption, "start": start, "end": end}
                for start, end in row_ranges(sizes, per_shard)
            ]
        return entries

    def read_input(self, spec: PartSpec, entry: dict) -> Iterator[tuple[Sample, bytes]]:
        return read_rows(entry)

    def columns(self, spec: PartSpec, entry: dict) -> list[pa.Field]:
        file = _open(entry["file"])
        try:
            return meta_fields(file.schema_arrow, entry)
        finally:
            file.close()


SOURCE = EmbeddedSource()


def _embedded(spec: PartSpec) -> Embedded:
    if spec.embedded is None:
        raise ConvertError("spec.source.embedded: required field is missing (the parquet files to read)")
    return spec.embedded


def _open(url: str) -> pq.ParquetFile:
    try:
        return open_parquet(url)
    except MetadataError as err:  # it names the file; say which field named the file
        raise ConvertError(f"spec.source.embedded: {err}") from None


# --- listing the input shards ------------------------------------------------------------------


def row_ranges(sizes: list[int], per_shard: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of a file whose row groups hold `sizes` rows: whole row groups until a
    range holds `per_shard` rows, a larger row group cut into ranges of `per_shard`."""
    ranges, start, row = [], 0, 0
    for size in sizes:
        if size > per_shard:
            if row > start:
                ranges.append((start, row))
            ranges += [(s, min(s + per_shard, row + size)) for s in range(row, row + size, per_shard)]
            row += size
            start = row
            continue
        row += size
        if row - start >= per_shard:
            ranges.append((start, row))
            start = row
    if row > start:
        ranges.append((start, row))
    return ranges


def _image_type(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and _image_type(kind.field(index).type)
    return False


def _text_type(kind: pa.DataType) -> bool:
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return True
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _text_type(kind.value_type)
    return False


def columns_of(embedded: Embedded, url: str, schema: pa.Schema) -> tuple[str, str]:
    """The file's image and caption columns, checked: ConvertError naming the file and column otherwise."""
    names = schema.names

    def pick(given: str | None, field: str, detected: tuple[str, ...]) -> str:
        if given is not None:
            if given not in names:
                raise ConvertError(f"{url}: no column {given!r} (spec.source.embedded.{field}); it has {names}")
            return given
        found = next((n for n in detected if n in names), None)
        if found is None:
            raise ConvertError(
                f"{url}: none of the columns {list(detected)} is there; set spec.source.embedded.{field} "
                f"to one of {names}"
            )
        return found

    image = pick(embedded.image_column, "imageColumn", IMAGE_COLUMNS)
    caption = pick(embedded.caption_column, "captionColumn", CAPTION_COLUMNS)
    if not _image_type(schema.field(image).type):
        raise ConvertError(
            f"{url}: column {image!r} holds {schema.field(image).type}, not an image's bytes "
            "(binary, or a struct with a binary `bytes` field)"
        )
    if not _text_type(schema.field(caption).type):
        raise ConvertError(
            f"{url}: column {caption!r} holds {schema.field(caption).type}, not a caption "
            "(a string, or a list of strings)"
        )
    return image, caption


# --- reading one input shard -------------------------------------------------------------------


def meta_fields(schema: pa.Schema, entry: dict) -> list[pa.Field]:
    """The row's scalar columns besides its image and caption: the samples' metadata (TextCaps' image_id)."""
    return [f for f in schema if f.name not in (entry["image"], entry["caption"]) and scalar_type(f.type)]


def read_rows(entry: dict) -> Iterator[tuple[Sample, bytes]]:
    """The samples of rows [start, end) of one file, read row group by row group, in batches."""
    url, start, end = entry["file"], entry["start"], entry["end"]
    file = _open(url)
    try:
        schema = file.schema_arrow
        image_column, caption_column = entry["image"], entry["caption"]
        if image_column not in schema.names or caption_column not in schema.names:
            raise ConvertError(
                f"{url}: no column {image_column!r} or {caption_column!r} any more; it has {schema.names}"
            )
        meta_columns = [f.name for f in meta_fields(schema, entry)]
        groups, first_row, row = [], None, 0
        for i in range(file.metadata.num_row_groups):
            size = file.metadata.row_group(i).num_rows
            if row < end and row + size > start:
                groups.append(i)
                first_row = row if first_row is None else first_row
            row += size
        if first_row is None:
            return
        row = first_row
        batches = file.iter_batches(
            batch_size=BATCH_ROWS, row_groups=groups, columns=[image_column, caption_column, *meta_columns]
        )
        for batch in batches:
            if row + batch.num_rows <= start:
                row += batch.num_rows
                continue
            for values in batch.to_pylist():
                if start <= row < end:
                    yield _sample(url, row, values, image_column, caption_column, meta_columns)
                row += 1
                if row >= end:
                    return
    except (pa.ArrowInvalid, OSError) as err:
        raise ConvertError(f"{url}: corrupt parquet data near row {row}: {err}") from None
    finally:
        file.close()


def _sample(
    url: str, row: int, values: dict, image_column: str, caption_column: str, meta_columns: list[str]
) -> tuple[Sample, bytes]:
    image = values[image_column]
    name = None
    if isinstance(image, dict):  # the Hugging Face image struct
        name, image = image.get("path"), image.get("bytes")
    if not image:
        raise ConvertError(
            f"{url}: row {row}: no image in column {image_column!r}" + (f" (path {name})" if name else "")
        )
    caption = values[caption_column]
    if isinstance(caption, list):
        caption = next((c for c in caption if c is not None), None)
    key = name.rsplit("/", 1)[-1].rsplit(".", 1)[0] if name else str(row)
    meta = {c: values[c] for c in meta_columns}
    return Sample(key=key, caption=caption, image=None, meta=meta, file=f"{url} row {row}"), image
