"""One archive opened and its members read, safely: `.tar`, `.tar.gz`/`.tgz` (any tarfile compression)
streamed from wherever the archive is, `.zip` spooled to a temporary file first (its index is at its
end) of at most `maxArchiveBytes`, removed when the archive is closed, so a task holds at most one
archive on disk.

Nothing here writes a member anywhere, and still a member whose name is absolute or climbs out with
`..` is refused, as is a decompression bomb (a zip member unpacking to more than MAX_RATIO times its
compressed size, or an archive unpacking to more than MAX_EXPANSION times what was read of it) and an
archive over `maxArchiveBytes`: each an ArchiveError naming the archive and the member.
"""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

import fsspec

from ...errors import InputError
from ..fetch.errors import FINAL, FetchError
from ..fetch.stream import Stream, shown

# Images hardly compress: a member this much smaller than its content is a bomb, not a photo.
MAX_RATIO = 100
# What an archive may unpack to, against what was read of it (JSON sidecars compress ~10x).
MAX_EXPANSION = 50
FLOOR = 64 << 10  # below this many bytes nothing is a bomb (tar headers of tiny members expand well)
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".tbz2", ".txz")
_DAMAGED = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, zipfile.BadZipFile)


class ArchiveError(InputError):
    """An archive that is refused or cannot be read: the message names the archive and the member."""


class Member(NamedTuple):
    name: str  # its path in the archive
    size: int
    data: bytes | None  # None: over the member limit, not read


def is_archive(name: str) -> bool:
    return name.lower().endswith(ZIP_SUFFIXES + TAR_SUFFIXES)


def check_name(archive: str, name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise ArchiveError(f"{archive}: member {name!r}: refused, its path leads outside the archive (absolute or ..)")


class _Counted(io.RawIOBase):
    """A file read through, its bytes counted and bounded by `limit`."""

    def __init__(self, raw: BinaryIO, archive: str, limit: int):
        self.raw, self.archive, self.limit, self.position = raw, archive, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.position += len(data)
        if self.position > self.limit:
            raise ArchiveError(f"{self.archive}: more than spec.source.archives.maxArchiveBytes ({self.limit} bytes)")
        return len(data)


def open_raw(url: str, opts, limit: int, headers: dict[str, str], what: str) -> BinaryIO:
    """The bytes at `url` (http(s) through the guarded stream, else fsspec: a local path, s3://), after
    checking the size where it is known; `what` names the file in errors."""
    if url.split("://", 1)[0] in ("http", "https"):
        return Stream(url, opts, limit, headers)  # type: ignore[return-value]  # a RawIOBase is a binary file
    fs, path = fsspec.core.url_to_fs(url)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise ArchiveError(f"{what}: {shown(url)} does not exist") from None
    if size is not None and size > limit:
        raise ArchiveError(f"{what}: {size} bytes, more than spec.source.archives.maxArchiveBytes ({limit})")
    return fs.open(path, "rb")


class Archive:
    """An archive, open: `members()` in archive order, `member(name)` of a zip by name."""

    def __init__(self, name: str, url: str, opts, limit: int, member_limit: int, headers: dict[str, str]):
        self.name, self.url, self.limit, self.member_limit = name, url, limit, member_limit
        self.zip: zipfile.ZipFile | None = None
        self._spool: BinaryIO | None = None
        try:
            raw = open_raw(url, opts, limit, headers, name)
        except FetchError as err:
            raise fetch_failed(name, err) from None
        self.raw = _Counted(raw, name, limit)
        if name.lower().endswith(ZIP_SUFFIXES):
            try:
                self._open_zip(raw)
            except BaseException:
                self.close()  # the spool's disk, the connection
                raise

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()
        if self._spool is not None:
            self._spool.close()  # a TemporaryFile: its disk is freed here
        self.raw.raw.close()

    def _open_zip(self, raw: BinaryIO) -> None:
        self._spool = tempfile.TemporaryFile(prefix="laion-archive-")
        try:
            shutil.copyfileobj(self.raw, self._spool, 1 << 20)
        except FetchError as err:
            raise fetch_failed(self.name, err) from None
        self._spool.seek(0)
        try:
            self.zip = zipfile.ZipFile(self._spool)
        except zipfile.BadZipFile as err:
            raise ArchiveError(
                f"{self.name}: {self.raw.position} bytes, not a readable zip ({err}): cut short?"
            ) from None
        total = 0
        for info in self.zip.infolist():
            check_name(self.name, info.filename)
            total += info.file_size
            if info.file_size > FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise ArchiveError(
                    f"{self.name}: member {info.filename}: refused, {info.file_size} bytes packed in "
                    f"{info.compress_size} (over {MAX_RATIO}x: a decompression bomb)"
                )
        if total > MAX_EXPANSION * max(self.raw.position, FLOOR):
            raise ArchiveError(
                f"{self.name}: refused, its members unpack to {total} bytes from {self.raw.position} "
                f"(over {MAX_EXPANSION}x: a decompression bomb)"
            )

    def member(self, name: str) -> bytes:
        """A zip's member by name (an annotations file inside each archive)."""
        if self.zip is None:
            raise ArchiveError(
                f"{self.name}: a member named by spec.source.archives.captions.annotations (#{name}) is read "
                "from zip archives only (a tar is read as a stream, once)"
            )
        try:
            return self.zip.read(name)
        except KeyError:
            raise ArchiveError(f"{self.name}: no member {name} (spec.source.archives.captions.annotations)") from None

    def members(self) -> Iterator[Member]:
        try:
            if self.zip is not None:
                yield from self._zip_members(self.zip)
            else:
                yield from self._tar_members()
        except FetchError as err:
            raise fetch_failed(self.name, err) from None

    def _zip_members(self, archive: zipfile.ZipFile) -> Iterator[Member]:
        for info in archive.infolist():
            if info.is_dir():
                continue
            if info.file_size > self.member_limit:
                yield Member(info.filename, info.file_size, None)
                continue
            try:
                data = archive.read(info)
            except (*_DAMAGED, ValueError) as err:
                raise ArchiveError(f"{self.name}: member {info.filename}: cannot be read: {err}") from None
            yield Member(info.filename, info.file_size, data)

    def _tar_members(self) -> Iterator[Member]:
        last = "its first member"
        try:
            with tarfile.open(fileobj=self.raw, mode="r|*") as tar:
                for info in tar:
                    check_name(self.name, info.name)
                    unpacked = info.offset_data + info.size
                    if unpacked > MAX_EXPANSION * max(self.raw.position, FLOOR):
                        raise ArchiveError(
                            f"{self.name}: member {info.name}: refused, the archive unpacks to {unpacked} "
                            f"bytes from {self.raw.position} read (over {MAX_EXPANSION}x: a decompression bomb)"
                        )
                    if not info.isfile():
                        continue  # folders, and links: never followed, nothing is extracted
                    last = f"member {info.name}"
                    if info.size > self.member_limit:
                        yield Member(info.name, info.size, None)
                        continue
                    body = tar.extractfile(info)
                    yield Member(info.name, info.size, body.read() if body else b"")
        except _DAMAGED as err:
            raise ArchiveError(
                f"{self.name}: damaged or cut short after {last}, at byte {self.raw.position}: {err}"
            ) from None


def fetch_failed(name: str, err: FetchError) -> Exception:
    """A fetch that no retry of the shard can mend is bad input (an expired link, a refused address, an
    archive too large); the rest (timeouts, lost connections) is raised for Ray to retry the shard."""
    message = f"{name}: {err.reason}: {err}"
    if err.reason in FINAL:
        return ArchiveFailed(err.reason, message)
    return OSError(message)


class ArchiveFailed(ArchiveError):
    """An archive that cannot be fetched, for good: `reason` is one of contract.FAILURE_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # Ray sends a task's exception to the driver pickled
        return type(self), (self.reason, str(self))
