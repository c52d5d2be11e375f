"""One archive opened and its members read, safely: `.tar`, `.tar.gz`/`.tgz` (any tarfile compression)
streamed from wherever the archive is, `.zip` spooled to a temporary file first (its index is at its
end) of at most `maxArchiveBytes`, removed when the archive is closed, so a task holds at most one
archive on disk. A tar one of whose members is read by name first (its own annotations file, which may
come after the images) is spooled as a zip is, and then read twice from the spool, never fetched twice.

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
            raise ArchiveFailed(
                "too_large", f"{self.archive}: more than spec.source.archives.maxArchiveBytes ({self.limit} bytes)"
            )
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
        raise ArchiveFailed("http_4xx", f"{what}: {shown(url)} does not exist") from None
    if size is not None and size > limit:
        raise ArchiveFailed(
            "too_large", f"{what}: too_large: {size} bytes, more than spec.source.archives.maxArchiveBytes ({limit})"
        )
    return fs.open(path, "rb")


class Archive:
    """An archive, open: `members()` in archive order, `member(name)` of a zip by name."""

    def __init__(
        self, name: str, url: str, opts, limit: int, member_limit: int, headers: dict[str, str], spool: bool = False
    ):
        self.name, self.url, self.limit, self.member_limit = name, url, limit, member_limit
        self.zip: zipfile.ZipFile | None = None
        self._spool: BinaryIO | None = None
        try:
            raw = open_raw(url, opts, limit, headers, name)
        except FetchError as err:
            raise fetch_failed(name, err) from None
        self.raw = _Counted(raw, name, limit)
        try:
            if name.lower().endswith(ZIP_SUFFIXES):
                self._open_zip(raw)
            elif spool:
                self._fill_spool()
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

    def _fill_spool(self) -> BinaryIO:
        spool = self._spool = tempfile.TemporaryFile(prefix="laion-archive-")
        try:
            shutil.copyfileobj(self.raw, spool, 1 << 20)
        except FetchError as err:
            raise fetch_failed(self.name, err) from None
        spool.seek(0)
        return spool

    def _open_zip(self, raw: BinaryIO) -> None:
        spool = self._fill_spool()
        try:
            self.zip = zipfile.ZipFile(spool)
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
        """A member by name (an annotations file inside each archive): of a zip, or of a spooled tar."""
        missing = f"{self.name}: no member {name} (spec.source.archives.captions.annotations)"
        if self.zip is not None:
            try:
                return self.zip.read(name)
            except KeyError:
                raise ArchiveError(missing) from None
        if self._spool is None:
            raise ArchiveError(f"{self.name}: member {name} asked by name of a tar read as a stream (not spooled)")
        wanted = name.removeprefix("./")
        for found in self._tar_members(_Counted(self._spool, self.name, self.limit), wanted):
            if found.name.removeprefix("./") == wanted and found.data is not None:
                self._spool.seek(0)
                return found.data
        raise ArchiveError(missing)

    def members(self) -> Iterator[Member]:
        try:
            if self.zip is not None:
                yield from self._zip_members(self.zip)
            else:
                spooled = None if self._spool is None else _Counted(self._spool, self.name, self.limit)
                yield from self._tar_members(spooled or self.raw)
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

    def _tar_members(self, source: _Counted, only: str | None = None) -> Iterator[Member]:
        """The tar's members read from `source`; with `only`, the others' bodies are skipped unread and
        the member limit is the archive's (an annotations file is larger than an image)."""
        last = "its first member"
        try:
            with tarfile.open(fileobj=source, mode="r|*") as tar:
                for info in tar:
                    check_name(self.name, info.name)
                    unpacked = info.offset_data + info.size
                    if unpacked > MAX_EXPANSION * max(source.position, FLOOR):
                        raise ArchiveError(
                            f"{self.name}: member {info.name}: refused, the archive unpacks to {unpacked} "
                            f"bytes from {source.position} read (over {MAX_EXPANSION}x: a decompression bomb)"
                        )
                    if not info.isfile():
                        continue  # folders, and links: never followed, nothing is extracted
                    last = f"member {info.name}"
                    if only is not None and info.name.removeprefix("./") != only:
                        continue
                    if info.size > (self.limit if only is not None else self.member_limit):
                        yield Member(info.name, info.size, None)
                        continue
                    body = tar.extractfile(info)
                    yield Member(info.name, info.size, body.read() if body else b"")
        except _DAMAGED as err:
            raise ArchiveError(
                f"{self.name}: damaged or cut short after {last}, at byte {source.position}: {err}"
            ) from None


def fetch_failed(name: str, err: FetchError) -> Exception:
    """A fetch that no retry of the shard can mend is bad input (an expired link, a refused address, an
    archive too large); the rest (timeouts, lost connections) is raised for Ray to retry the shard."""
    message = f"{name}: {err.reason}: {err}"
    if err.reason in FINAL:
        return ArchiveFailed(err.reason, message)
    return ArchiveLost(err.reason, message)


class ArchiveLost(OSError):
    """An archive whose fetch another try may mend (a timeout, a lost connection): an OSError, which
    Ray retries the shard for, with its `reason` (contract.FAILURE_REASONS) for the part's counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.reason, str(self))


class ArchiveFailed(ArchiveError):
    """An archive that cannot be fetched, for good: `reason` is one of contract.FAILURE_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # Ray sends a task's exception to the driver pickled
        return type(self), (self.reason, str(self))
