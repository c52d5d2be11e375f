"""webdataset: img2dataset's `<shard>.tar` of `key.jpg` / `key.txt` / `key.json` per sample.

Written by img2dataset's `WebDatasetSampleWriter`; read as webdataset reads a tar (members grouped by
key), the project's own shards and, for convert, anyone's.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from .base import BrokenShard, Grouped, Sample, group

_BLOCK = 512  # a tar header, and the unit its members' data is padded to
_HEADERS = 4 * _BLOCK  # a member's headers: its own, and a PAX header with its data before it


class WebDataset(Grouped):
    name = "webdataset"
    suffix = ".tar"
    img2dataset_writer = "WebDatasetSampleWriter"
    dataset_shards = "NNNNN.tar files"

    def is_dataset_shard(self, fs, path: str) -> bool:
        return path.endswith(".tar")

    def read(self, fs, path: str, where: str) -> Iterator[Sample]:
        with fs.open(path, "rb") as f:
            yield from read_tar(f, where, fs.size(path), self.image_extensions)


def read_tar(f: BinaryIO, where: str, size: int, image_extensions: tuple[str, ...]) -> Iterator[Sample]:
    last: list[tarfile.TarInfo] = []  # the member read last, to say where a broken tar breaks

    def members(tar: tarfile.TarFile):
        for info in tar:
            last[:] = [info]
            data = tar.extractfile(info) if info.isfile() else None  # None for links, folders and devices
            if data is not None:
                yield info.name, data.read()

    try:
        with tarfile.open(fileobj=f, mode="r|*") as tar:
            yield from group(members(tar), where, image_extensions)
    except tarfile.TarError as err:
        raise BrokenShard(describe(where, size, last[0] if last else None, err)) from None


def describe(where: str, size: int, last: tarfile.TarInfo | None, err: Exception) -> str:
    if last is not None and last.offset_data + last.size > size:
        return (
            f"{where}: cut short: {size} bytes, but its member {last.name} (header at byte {last.offset}) "
            f"holds {last.size} bytes up to byte {last.offset_data + last.size}"
        )
    after = 0 if last is None else last.offset_data + -(-last.size // _BLOCK) * _BLOCK
    member = f"the member after {last.name}" if last else "its first member"
    if size - after < _HEADERS:
        return (
            f"{where}: cut short: {size} bytes, ending {size - after} bytes into the headers of {member}, "
            f"which start at byte {after}"
        )
    return f"{where}: {size} bytes, whose headers of {member}, at byte {after}, do not read as a tar's: {err}"


FORMAT = WebDataset()
