"""Archives of images (`source.archives`): tar and zip files listed by URL, by a numbered pattern or by
a link file (SA-1B's `file_name<TAB>url`), each archive one input shard, its images captioned from a
sidecar member or an annotations file (sources/annotation_files.py), read member by member
(sources/archive_files.py).

An archive is known by its file name, never its URL: the manifest lists names, and each shard looks
its URL up in the spec it runs with, so a part whose signed links expired (reason `expired`) is given
a new link file and its re-run fetches only the archives without a finished shard.
`filter.sampleFraction` picks whole archives (the same ones for the same seed); what became of each
image is counted in its shard's stats: `no_caption` for an image no caption names, `decode` for a
member that is not an image, `too_large` for one over download.maxImageBytes, `filtered` for one whose
metadata (its sidecar json's, its annotation's other fields) fails spec.filter. An archive that cannot
be fetched fails its shard with the reason (ArchiveFailed, ArchiveLost), which the part counts.

The annotations' columns are known once they are read, which for an archive's own annotations member
is once the archive is open: `open_archive` opens it once for both (SampleSource.open_input).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator

from ...credentials import ARCHIVE_HEADERS
from ...spec import Archives, PartSpec
from ...spec.patterns import numbered
from ..fetch.errors import FetchError
from ..fetch.stream import shown
from ..formats import Sample
from ..formats.base import CAPTION_FILES, IMAGE_FILES
from . import annotation_files
from .annotation_files import Index
from .archive_files import Archive, ArchiveError, Member, fetch_failed, is_archive, open_raw
from .base import Opened, Refused, SampleSource

FIELD = "spec.source.archives"
MAX_LINK_FILE = 256 << 20
META_BYTES = 64 << 10


class ArchiveSource(SampleSource):
    name = "archives"

    def selected(self, spec: PartSpec) -> bool:
        return spec.archives is not None

    def describe(self, spec: PartSpec) -> str:
        where = _archives(spec)
        first = where.links or where.pattern or (where.urls or ("",))[0]
        return f"archives from {shown(first)}"

    def list_inputs(self, spec: PartSpec) -> list[dict]:
        names = list(locations(_archives(spec), spec))
        fraction, seed = spec.filter.sample_fraction, spec.filter.seed
        return [{"archive": name} for name in names if picked(name, fraction, seed)]

    def read_input(self, spec: PartSpec, entry: dict) -> Iterator[tuple[Sample, bytes | Refused]]:
        return read_archive(spec, entry["archive"])

    def open_input(self, spec: PartSpec, entry: dict) -> Opened:
        return open_archive(spec, entry["archive"])


SOURCE = ArchiveSource()


def _archives(spec: PartSpec) -> Archives:
    if spec.archives is None:
        raise ArchiveError(f"{FIELD}: required field is missing")
    return spec.archives


def picked(name: str, fraction: float, seed: int) -> bool:
    """Whether sampleFraction keeps the archive: a hash of seed and name, so the same seed keeps the
    same archives whatever their order or URLs."""
    if fraction >= 1:
        return True
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def headers() -> dict[str, str]:
    """The headersSecret's headers, from the job's environment (never from the spec)."""
    found = {}
    for line in os.environ.get(ARCHIVE_HEADERS, "").splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip():
            found[name.strip()] = value.strip()
    return found


def locations(archives: Archives, spec: PartSpec) -> dict[str, str]:
    """Each archive's URL by its name, in order."""
    return dict(_locations(archives, spec.download))


@functools.lru_cache(maxsize=2)
def _locations(archives: Archives, opts) -> tuple[tuple[str, str], ...]:
    if archives.links:
        pairs = _links(archives, opts)
    elif archives.pattern:
        urls = numbered(archives.pattern, archives.first, archives.last, archives.digits)
        pairs = [(u.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0], u) for u in urls]
    else:
        pairs = [(u.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0], u) for u in archives.urls or ()]
    seen: dict[str, str] = {}
    for name, url in pairs:
        if not is_archive(name):
            raise ArchiveError(f"{FIELD}: {shown(url)}: {name!r} is not a .tar, .tar.gz, .tgz or .zip name")
        if name in seen:
            raise ArchiveError(f"{FIELD}: two archives named {name} ({shown(seen[name])}, {shown(url)})")
        seen[name] = url
    return tuple(seen.items())


def _links(archives: Archives, opts) -> list[tuple[str, str]]:
    """A link file's (name, url) lines; a first line whose second field is no URL is its header."""
    where = f"{FIELD}.links"
    try:
        with open_raw(archives.links or "", opts, MAX_LINK_FILE, headers(), where) as f:
            text = f.read().decode("utf-8")
    except FetchError as err:
        raise fetch_failed(where, err) from None
    except UnicodeDecodeError as err:
        raise ArchiveError(f"{where}: {shown(archives.links or '')}: not UTF-8 text: {err}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise ArchiveError(f"{where} line {number}: expected file_name<TAB>url, got {line[:80]!r}")
        name, url = fields[0].strip(), fields[1].strip()
        if number == 1 and "://" not in url and not url.startswith("/"):
            continue  # the header (SA-1B's file_name, cdn_link)
        pairs.append((name, url))
    if not pairs:
        raise ArchiveError(f"{where}: no archives in {shown(archives.links or '')}")
    return pairs


# --- reading one archive -----------------------------------------------------------------------


def open_archive(spec: PartSpec, name: str) -> Opened:
    """The archive `name`, open, its annotations read: its samples and the annotations' columns."""
    archives = _archives(spec)
    url = locations(archives, spec).get(name)
    if url is None:
        raise ArchiveError(
            f"{FIELD}: archive {name}, listed by this output's manifest, is no longer in the spec's archives"
        )
    captions = archives.captions
    where, member = annotation_files.split(captions.annotations or "")
    sent = headers()
    limit, most = spec.download.max_image_bytes, archives.max_archive_bytes
    notes = None
    if captions.annotations and where:
        notes = annotation_files.load(captions, spec.download, most, limit, sent, _stem(name))
    inside = (member or "").replace("{stem}", _stem(name)) if captions.annotations and not where else None
    archive = Archive(name, url, spec.download, most, limit, sent, spool=inside is not None)
    try:
        if inside is not None:
            notes = annotation_files.index(captions, archive.member(inside), f"{name}#{inside}")
    except BaseException:
        archive.close()
        raise
    skip = {inside.removeprefix("./")} if inside is not None else set()
    members = (m for m in archive.members() if m.name.removeprefix("./") not in skip)
    samples = (_sample(name, group, captions, notes, limit) for group in _grouped(members))
    return Opened(notes.fields if notes is not None else [], samples, archive.close)


def read_archive(spec: PartSpec, name: str) -> Iterator[tuple[Sample, bytes | Refused]]:
    with open_archive(spec, name) as opened:
        yield from opened.samples


def _stem(name: str) -> str:
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0]


def _grouped(members: Iterator[Member]) -> Iterator[list[Member]]:
    """Consecutive members of one key (the path up to the base name's first dot), as webdataset groups."""
    group: list[Member] = []
    key = None
    for member in members:
        prefix, _, base = member.name.rpartition("/")
        if base.startswith((".", "_")):
            continue  # macOS resource forks, img2dataset's own _stats.json
        this = f"{prefix}/{base.split('.', 1)[0]}"
        if group and this != key:
            yield group
            group = []
        key = this
        group.append(member)
    if group:
        yield group


def _ext(member: Member) -> str:
    base = member.name.rsplit("/", 1)[-1]
    return base.split(".", 1)[1].lower() if "." in base else ""


def _sample(
    archive: str, group: list[Member], captions, notes: Index | None, limit: int
) -> tuple[Sample, bytes | Refused]:
    images = [m for m in group if _ext(m) in IMAGE_FILES]
    image = images[0] if images else group[0]
    where = f"{archive}: member {image.name}"
    sample = Sample(key=image.name.removeprefix("./"), caption=None, image=None, meta={}, file=archive)
    if not images:
        return sample, Refused("decode", f"{where}: not an image (one of .{', .'.join(IMAGE_FILES)})")
    if image.data is None:
        return sample, Refused("too_large", f"{where}: {image.size} bytes, over download.maxImageBytes ({limit})")
    caption, fields = _caption(archive, group, captions, notes, image)
    sample = sample._replace(caption=caption, meta={**_meta(group), **fields})
    if caption is None:
        how = (
            f"no .{captions.sidecar} beside it"
            if captions.sidecar
            else f"no annotation names it ({captions.annotations})"
        )
        return sample, Refused("no_caption", f"{where}: no caption, {how}")
    return sample, image.data


def _meta(group: list[Member]) -> dict:
    """A small json member beside the image (webdataset's key.json: its url), as the sample's metadata;
    SA-1B's masks (megabytes of them) are not read for it."""
    found = next((m for m in group if _ext(m) == "json" and m.data is not None and m.size <= META_BYTES), None)
    if found is None or found.data is None:
        return {}
    try:
        value = json.loads(found.data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _caption(
    archive: str, group: list[Member], captions, notes: Index | None, image: Member
) -> tuple[str | None, dict]:
    """The image's caption, and the fields of the annotation that gave it."""
    if notes is not None:
        return annotation_files.lookup(captions, notes, image.name) or (None, {})
    wanted = CAPTION_FILES if captions.sidecar == "txt" else ("json",)
    sidecar = next((m for m in group if _ext(m) in wanted and m.data is not None), None)
    if sidecar is None or sidecar.data is None:
        return None, {}
    if captions.sidecar == "txt":
        return sidecar.data.decode("utf-8", "replace").strip(), {}
    value = annotation_files.json_of(sidecar.data, f"{archive}: member {sidecar.name}")
    if not isinstance(value, dict) or captions.field not in value:
        has = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ArchiveError(
            f"{archive}: member {sidecar.name}: no {captions.field!r} field ({FIELD}.captions.field); it has {has}"
        )
    return annotation_files.text_of(value[captions.field]), {}
