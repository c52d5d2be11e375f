"""The captions of an archive's images from an annotations file (`source.archives.captions`): JSONL,
JSON (records found by a path expression), CSV or parquet, a file of its own, a member of another
archive (JourneyDB's `train_anno_realease_repath.jsonl.tgz`) or a member of each archive (DiffusionDB's
`part-NNNNNN.json`), or an archive of one caption file per image (`files`: SA-1B's captions, sa_1.txt …,
read member by member), joined to the images on the member's path, base name, stem or an image id. A
URL with `{stem}` in it is one annotations file per archive (the archive's name without its suffix).

A record's other fields (DiffusionDB's image_nsfw, width, seed …) come with its image as typed
metadata columns: the filter's thresholds read them (spec.columns names one for a logical field) and
they are written in each sample's row. Nested fields (objects, lists) are left out.

An annotation without the key or caption field raises an ArchiveError naming the file and its line
(or record); an image whose key no annotation names has no caption, which the source counts.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any, Protocol

import pyarrow as pa

from ...spec import Captions, Download
from ..fetch.errors import FetchError
from . import annotation_index
from .archive_files import Archive, ArchiveError, Member, fetch_failed, is_archive, open_raw
from .base import scalar_type

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FIELD = "spec.source.archives.captions"
MEMBER_KEY = "_member"  # a caption file's record: its path in the archive
SYNTHETIC = ("_key", MEMBER_KEY)  # fields the reader adds (a member's name): no column of their own


def join_key(member: str, join_on: str) -> str:
    """What of a member's path (or an annotation's key) the join compares."""
    path = member.replace("\\", "/").removeprefix("./")
    if join_on == "member":
        return path
    base = path.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if join_on == "stem" else base


def split(annotations: str) -> tuple[str, str | None]:
    """`<file>#<member>` into the file (empty: each archive itself) and the member."""
    where, _, member = annotations.partition("#")
    return where, member or None


def format_of(captions: Captions, name: str) -> str:
    """The annotations' format: set, or told by the name (an archive named without a member: `files`)."""
    if captions.format:
        return captions.format
    if is_archive(name):
        return "files"
    found = next((fmt for suffix, fmt in FORMATS.items() if name.lower().endswith(suffix)), None)
    if found is None:
        raise ArchiveError(
            f"{FIELD}.format: cannot tell the format of {name} by its name; set it ({', '.join(FORMATS.values())})"
        )
    return found


class Index(Protocol):
    """An annotations file indexed: the record's other fields as typed columns (`fields`), which become
    the metadata columns of the images they caption, and each join key's caption and fields (`find`)."""

    fields: list[pa.Field]

    def find(self, key: str) -> tuple[str | None, dict] | None: ...


class Annotations:
    """An Index in memory: each join key's row, its caption, and the other fields' columns."""

    def __init__(self, rows: dict[str, int], captions: list[str | None], table: pa.Table):
        self.rows, self.captions, self.table = rows, captions, table.combine_chunks()
        self.fields: list[pa.Field] = list(table.schema)

    def find(self, key: str) -> tuple[str | None, dict] | None:
        """The caption and the fields of the annotation naming `key`, or None."""
        row = self.rows.get(key)
        if row is None:
            return None
        return self.captions[row], {f.name: self.table.column(f.name)[row].as_py() for f in self.fields}


def index(captions: Captions, data: bytes, where: str) -> Annotations:
    """An annotations file's records by join key (the first annotation naming a key wins)."""
    fmt = format_of(captions, where.rsplit("#", 1)[-1])
    ids = _image_files(captions, data, where) if captions.join_on == "id" else None
    if fmt in ("csv", "parquet"):
        return _index_table(captions, _table(fmt, data, where), where, ids)
    return _index_records(captions, _records(captions, fmt, data, where), where, ids)


def index_members(captions: Captions, members: Iterator[Member], where: str) -> Annotations:
    """An archive of one caption file per image (SA-1B's sa_1.txt …), read member by member: a .txt
    member is its caption, a .json member a record; either one's key is its path (`_member`)."""
    return _index_records(captions, _member_records(captions, members, where), where, None)


def _member_records(captions: Captions, members: Iterator[Member], where: str) -> Iterator[tuple[str, Any]]:
    for member in members:
        suffix = member.name.rsplit(".", 1)[-1].lower()
        if suffix not in ("txt", "json"):
            continue
        label = f"member {member.name}"
        if member.data is None:
            raise ArchiveError(f"{where} {label}: {member.size} bytes, over download.maxImageBytes")
        if suffix == "txt":
            record: Any = {captions.caption: member.data.decode("utf-8", "replace").strip()}
        else:
            record = json_of(member.data, f"{where} {label}")
        yield label, {**record, MEMBER_KEY: member.name} if isinstance(record, dict) else record


def _join(captions: Captions, key: Any, ids: dict[str, str] | None) -> str | None:
    if ids is not None:
        return ids.get(str(key))  # None: an annotation of an image the table does not list
    return join_key(str(key), captions.join_on)


def _entries(
    captions: Captions, records: Iterator[tuple[str, Any]], where: str, ids: dict[str, str] | None
) -> Iterator[tuple[str, str | None, dict]]:
    """Each record's join key, caption and other fields, checked (a record without its key or caption
    field raises, naming the file and the record)."""
    for label, record in records:
        for field, name in ((captions.key, "key"), (captions.caption, "caption")):
            if not isinstance(record, dict) or field not in record:
                has = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ArchiveError(f"{where} {label}: no {field!r} field ({FIELD}.{name}); it has {has}")
        key = _join(captions, record[captions.key], ids)
        if key is not None:
            fields = {k: v for k, v in record.items() if k != captions.caption and k not in SYNTHETIC}
            yield key, text_of(record[captions.caption]), fields


def _index_records(
    captions: Captions, records: Iterator[tuple[str, Any]], where: str, ids: dict[str, str] | None
) -> Annotations:
    rows: dict[str, int] = {}
    texts: list[str | None] = []
    columns: dict[str, list] = {}
    nested: set[str] = set()  # fields holding objects or lists: no column of a sample's row
    for key, caption, fields in _entries(captions, records, where, ids):
        if key in rows:
            continue
        row = rows[key] = len(texts)
        texts.append(caption)
        for name, value in fields.items():
            if name in nested:
                continue
            if isinstance(value, (dict, list)):
                nested.add(name)
                columns.pop(name, None)
                continue
            columns.setdefault(name, [None] * row).append(value)
        for values in columns.values():
            if len(values) == row:
                values.append(None)  # a field this record lacks
    typed = {name: _typed(values) for name, values in columns.items()}
    table = pa.table({name: array for name, array in typed.items() if scalar_type(array.type)})
    return Annotations(rows, texts, table)


def _typed(values: list) -> pa.Array:
    """A field's values as one typed column; mixed kinds (a number here, a string there) as strings."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _index_table(captions: Captions, table: pa.Table, where: str, ids: dict[str, str] | None) -> Annotations:
    for field, name in ((captions.key, "key"), (captions.caption, "caption")):
        if field not in table.column_names:
            raise ArchiveError(f"{where}: no {field!r} column ({FIELD}.{name}); it has {table.column_names}")
    rows: dict[str, int] = {}
    for row, value in enumerate(table.column(captions.key).to_pylist()):
        key = _join(captions, value, ids)
        if key is not None:
            rows.setdefault(key, row)
    texts = [text_of(v) for v in table.column(captions.caption).to_pylist()]
    kept = [f.name for f in table.schema if f.name != captions.caption and scalar_type(f.type)]
    return Annotations(rows, texts, table.select(kept))


def _table(fmt: str, data: bytes, where: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if fmt == "csv":  # an empty cell is no value, of a string column too
            return pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
        return pq.read_table(io.BytesIO(data))
    except pa.ArrowException as err:
        raise ArchiveError(f"{where}: not readable as {fmt}: {err}") from None


def lookup(captions: Captions, notes: Index, member: str) -> tuple[str | None, dict] | None:
    """The caption and fields of the annotation naming an image member, or None."""
    return notes.find(join_key(member, "basename" if captions.join_on == "id" else captions.join_on))


def text_of(value: Any) -> str | None:
    if isinstance(value, list):  # a list of reference captions: the first
        value = value[0] if value else None
    return None if value is None else str(value)


def _image_files(captions: Captions, data: bytes, where: str) -> dict[str, str]:
    """joinOn id: the images table's id → base name of its file."""
    table = captions.images
    if table is None:
        raise ArchiveError(f"{FIELD}.images: required for joinOn id (the table mapping an id to its file)")
    files = {}
    for label, record in _walk(json_of(data, where), table.path.split("."), "record"):
        if not isinstance(record, dict) or table.id not in record or table.file not in record:
            has = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ArchiveError(
                f"{where} {table.path} {label}: no {table.id!r} or {table.file!r} field ({FIELD}.images); it has {has}"
            )
        files[str(record[table.id])] = join_key(str(record[table.file]), "basename")
    return files


def json_of(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as err:
        raise ArchiveError(f"{where}: not JSON: {err}") from None


def _records(captions: Captions, fmt: str, data: bytes, where: str) -> Iterator[tuple[str, Any]]:
    if fmt == "jsonl":
        for number, line in enumerate(data.splitlines(), 1):
            if line.strip():
                try:
                    yield f"line {number}", json.loads(line)
                except ValueError as err:
                    raise ArchiveError(f"{where} line {number}: not JSON: {err}") from None
    else:
        yield from _walk(json_of(data, where), captions.path.split(".") if captions.path else ["[]"], "record")


def _walk(node: Any, path: list[str], label: str) -> Iterator[tuple[str, Any]]:
    """The records at `path` under `node`: `name` steps into a field, `name[]` / `[]` iterates a list,
    `*` an object's members (each its value, with its name as `_key`)."""
    if not path:
        yield label, node
        return
    step, rest = path[0], path[1:]
    name = step.removesuffix("[]")
    if name and name != "*":
        if not isinstance(node, dict) or name not in node:
            raise ArchiveError(f"{FIELD}.path: no field {name!r} at {label}")
        node = node[name]
    if step.endswith("[]"):
        if not isinstance(node, list):
            raise ArchiveError(f"{FIELD}.path: {step} at {label} is not a list")
        for i, item in enumerate(node):
            yield from _walk(item, rest, f"{name or 'record'} {i}")
    elif step == "*":
        if not isinstance(node, dict):
            raise ArchiveError(f"{FIELD}.path: * at {label} is not an object")
        for key, value in node.items():
            yield from _walk({**value, "_key": key} if isinstance(value, dict) else value, rest, f"member {key!r}")
    else:
        yield from _walk(node, rest, label)


def load(
    captions: Captions, opts: Download, limit: int, member_limit: int, headers: dict[str, str], stem: str
) -> Index:
    """The annotations of the archive whose name without suffix is `stem`: a file every archive shares,
    indexed once a worker process, or the archive's own file where the URL pairs them by `{stem}`
    (SA-1B's captions in one archive per image archive), read for this archive alone."""
    try:
        if "{stem}" in (captions.annotations or ""):
            return _load(captions, opts, limit, member_limit, headers, stem)
        return _shared(captions, opts, limit, member_limit, tuple(sorted(headers.items())))
    except FetchError as err:
        raise fetch_failed(f"{FIELD}.annotations", err) from None


@functools.lru_cache(maxsize=1)
def _shared(
    captions: Captions, opts: Download, limit: int, member_limit: int, headers: tuple[tuple[str, str], ...]
) -> Index:
    where, member = split(captions.annotations or "")
    name = where.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    if member is None and format_of(captions, name) == "files":  # millions of caption files: on disk
        ident = hashlib.sha256(repr((captions, limit, member_limit)).encode()).hexdigest()[:32]
        return annotation_index.shared(ident, _file_entries(captions, opts, limit, member_limit, dict(headers), where))
    return _load(captions, opts, limit, member_limit, dict(headers), "")


def _file_entries(
    captions: Captions, opts: Download, limit: int, member_limit: int, headers: dict, where: str
) -> Iterator[tuple[str, str | None, dict]]:
    """An archive of caption files' entries, the archive opened when the first is asked for."""
    name = where.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    with Archive(name, where, opts, limit, member_limit, headers) as archive:
        yield from _entries(captions, _member_records(captions, archive.members(), name), name, None)


def _load(captions: Captions, opts: Download, limit: int, member_limit: int, headers: dict, stem: str) -> Annotations:
    where, member = split((captions.annotations or "").replace("{stem}", stem))
    name = where.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    if member is None and format_of(captions, name) == "files":
        with Archive(name, where, opts, limit, member_limit, headers) as archive:
            return index_members(captions, archive.members(), name)
    if member is None:
        with open_raw(where, opts, limit, headers, FIELD + ".annotations") as f:
            return index(captions, f.read(), where)
    with Archive(name, where, opts, limit, limit, headers) as archive:
        for found in archive.members():
            if found.name.removeprefix("./") == member.removeprefix("./") and found.data is not None:
                return index(captions, found.data, f"{name}#{member}")
    raise ArchiveError(f"{FIELD}.annotations: {name} has no member {member}")
