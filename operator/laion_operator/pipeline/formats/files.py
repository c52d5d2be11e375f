"""files: img2dataset's `<shard>/` folder of `key.jpg`, `key.txt`, `key.json` per sample, listed with
their captions in `part_<id>.csv`.

Written by img2dataset's `FilesSampleWriter`; read as webdataset groups a tar (by key), the project's
own shards and, for convert, anyone's folders.
"""

from __future__ import annotations

from collections.abc import Iterator

from ...contract import ShardStats, shard_name
from ...spec import Download
from ...storage import Store
from .base import Grouped, Sample, group, read_metadata, successes


class Files(Grouped):
    name = "files"  # a shard is the folder of its number (no suffix)
    img2dataset_writer = "FilesSampleWriter"
    dataset_shards = "NNNNN/ folders"

    def is_dataset_shard(self, fs, path: str) -> bool:
        return path.rsplit("/", 1)[-1].isdigit() and fs.isdir(path)

    def read(self, fs, path: str, where: str) -> Iterator[Sample]:
        def members():
            for file in sorted(fs.ls(path, detail=False)):
                with fs.open(file, "rb") as f:
                    yield file.rsplit("/", 1)[-1], f.read()

        yield from group(members(), where, self.image_extensions)

    def annotation_rows(self, store: Store, opts: Download, shards: list[ShardStats]):
        """A row an image: its path and caption."""

        def rows():
            for s in shards:
                for row in successes(read_metadata(store, s.shard)):
                    yield store.url(shard_name(s.shard), f"{row['key']}.{opts.encode_format}"), row.get("caption") or ""

        return ["image_path", "caption"], rows()

    def annotated(self, row: dict, prefix: str) -> tuple[str, int]:
        return row["image_path"].removeprefix(prefix).rsplit("/", 1)[0], 1


FORMAT = Files()
