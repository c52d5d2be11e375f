"""The captions of an archive's images from an annotations file (`source.archives.captions`): JSONL,
JSON (records found by a path expression), CSV or parquet, a file of its own, a member of another
archive (JourneyDB's `train_anno_realease_repath.jsonl.tgz`) or a member of each archive (DiffusionDB's
`part-NNNNNN.json`), joined to the images on the member's path, base name, stem or an image id.

An annotation without the key or caption field raises an ArchiveError naming the file and its line
(or record); an image whose key no annotation names has no caption, which the source counts.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterator
from typing import Any

from ...spec import Captions, Download
from ..fetch.errors import FetchError
from .archive_files import Archive, ArchiveError, fetch_failed, open_raw

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FIELD = "spec.source.archives.captions"


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
    if captions.format:
        return captions.format
    found = next((fmt for suffix, fmt in FORMATS.items() if name.lower().endswith(suffix)), None)
    if found is None:
        raise ArchiveError(
            f"{FIELD}.format: cannot tell the format of {name} by its name; set it ({', '.join(FORMATS.values())})"
        )
    return found


def index(captions: Captions, data: bytes, where: str) -> dict[str, str | None]:
    """Each join key's caption (the first annotation naming a key wins)."""
    fmt = format_of(captions, where.rsplit("#", 1)[-1])
    by_key: dict[str, str | None] = {}
    ids = _image_files(captions, data, where) if captions.join_on == "id" else None
    for label, record in _records(captions, fmt, data, where):
        for field, name in ((captions.key, "key"), (captions.caption, "caption")):
            if not isinstance(record, dict) or field not in record:
                has = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ArchiveError(f"{where} {label}: no {field!r} field ({FIELD}.{name}); it has {has}")
        key = str(record[captions.key])
        if ids is not None:
            if key not in ids:
                continue  # an annotation of an image the table does not list
            key = ids[key]
        else:
            key = join_key(key, captions.join_on)
        by_key.setdefault(key, text_of(record[captions.caption]))
    return by_key


def lookup(captions: Captions, by_key: dict[str, str | None], member: str) -> str | None:
    return by_key.get(join_key(member, "basename" if captions.join_on == "id" else captions.join_on))


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
    elif fmt == "json":
        yield from _walk(json_of(data, where), captions.path.split(".") if captions.path else ["[]"], "record")
    else:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        try:
            table = pacsv.read_csv(io.BytesIO(data)) if fmt == "csv" else pq.read_table(io.BytesIO(data))
        except pa.ArrowException as err:
            raise ArchiveError(f"{where}: not readable as {fmt}: {err}") from None
        first = 2 if fmt == "csv" else 0  # a csv's line (after its header), a parquet's row
        for number, row in enumerate(table.to_pylist(), first):
            yield (f"line {number}" if fmt == "csv" else f"row {number}"), row


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


@functools.lru_cache(maxsize=1)
def shared(captions: Captions, opts: Download, limit: int, headers: tuple[tuple[str, str], ...]) -> dict:
    """The index of an annotations file every archive shares, read once a worker process."""
    where, member = split(captions.annotations or "")
    try:
        return _shared(captions, opts, limit, dict(headers), where, member)
    except FetchError as err:
        raise fetch_failed(f"{FIELD}.annotations", err) from None


def _shared(captions: Captions, opts: Download, limit: int, headers: dict, where: str, member: str | None) -> dict:
    if member is None:
        with open_raw(where, opts, limit, headers, FIELD + ".annotations") as f:
            return index(captions, f.read(), where)
    name = where.rstrip("/").rsplit("/", 1)[-1]
    with Archive(name, where, opts, limit, limit, headers) as archive:
        for found in archive.members():
            if found.name.removeprefix("./") == member.removeprefix("./") and found.data is not None:
                return index(captions, found.data, f"{name}#{member}")
    raise ArchiveError(f"{FIELD}.annotations: {name} has no member {member}")
