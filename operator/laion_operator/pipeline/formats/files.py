"""files: img2dataset's `<shard>/` folder of `key.jpg`, `key.txt`, `key.json` per sample, listed with
their captions in `part_<id>.csv`.

Written by img2dataset's `FilesSampleWriter`; read as webdataset groups a tar (by key), the project's
own shards and, for convert, anyone's folders.
"""

from __future__ import annotations

from typing import Iterator

import fsspec

from ...contract import ShardStats, shard_name
from ...spec import Download
from ...storage import Store
from .base import IMAGE_FILES, Format, Sample, group, read_metadata, successes


class Files(Format):
    name = "files"

    def sample_writer(self) -> type:
        from img2dataset.writer import FilesSampleWriter

        return FilesSampleWriter
    image_extensions = IMAGE_FILES
    reads_datasets = True

    def read_samples(self, store: Store, shard: int) -> Iterator[Sample]:
        yield from read_folder(store.fs, store.path(shard_name(shard)), shard_name(shard), self.image_extensions)

    def read_dataset(self, path: str) -> Iterator[Sample]:
        fs, folder = fsspec.core.url_to_fs(path.rstrip("/"))
        yield from read_folder(fs, folder, path, self.image_extensions)

    def annotation_rows(self, store: Store, opts: Download, shards: list[ShardStats]):
        """A row an image: its path and caption."""
        def rows():
            for s in shards:
                for row in successes(read_metadata(store, s.shard)):
                    yield store.url(shard_name(s.shard), f"{row['key']}.{opts.encode_format}"), row.get("caption") or ""
        return ["image_path", "caption"], rows()

    def annotated(self, row: dict, prefix: str) -> tuple[str, int]:
        return row["image_path"].removeprefix(prefix).rsplit("/", 1)[0], 1


def read_folder(fs, folder: str, where: str, image_extensions: tuple[str, ...]) -> Iterator[Sample]:
    def members():
        for path in sorted(fs.ls(folder, detail=False)):
            with fs.open(path, "rb") as f:
                yield path.rsplit("/", 1)[-1], f.read()

    yield from group(members(), where, image_extensions)


FORMAT = Files()
