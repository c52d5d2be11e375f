"""parquet: img2dataset's `<shard>.parquet`, one row a sample, the image bytes in the column named
after download.encodeFormat and the caption in `txt`. The data file is the metadata file."""

from __future__ import annotations

from collections.abc import Iterator

from ...contract import shard_metadata
from ...storage import Store
from .base import Format, Sample, read_metadata, successes


class Parquet(Format):
    name = "parquet"
    suffix = ".parquet"  # the metadata file: it holds the images too
    img2dataset_writer = "ParquetSampleWriter"

    def read_samples(self, store: Store, shard: int) -> Iterator[Sample]:
        table = read_metadata(store, shard)
        column = next((c for c in self.image_extensions if c in table.column_names), None)
        for row in successes(table):
            image = row.pop(column) if column else None
            caption = row.pop("txt") if "txt" in row else row.get("caption")
            yield Sample(key=row["key"], caption=caption, image=image, meta=row, file=shard_metadata(shard))


FORMAT = Parquet()
