"""An annotations index on disk, for the one annotations archive every image archive shares that holds
a caption file per image (SA-1B's SA1B_caption.tar.gz: ten million files, gigabytes of text): held in
memory it would cost each worker process that much, so it is built once a node into an SQLite file in
the temporary folder, under a lock the node's other workers wait on and then read, and looked up a key
at a time. Its other fields' types are told from the values, as an in-memory index's are by Arrow: a
number of one kind keeps it, ints and floats together are floats, anything mixed is a string, objects
and lists are left out. Each process that opened the index removes the file when it exits: a later
task on the node builds it again rather than trusting a file whose source may have changed since.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator

import pyarrow as pa

BATCH = 10_000  # rows inserted a statement
_SCALARS: dict[type, pa.DataType] = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}


class DiskAnnotations:
    """annotation_files.Annotations' interface (`fields`, `find`) over the SQLite index at `path`."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        kinds = self.db.execute("SELECT name, kind FROM fields ORDER BY position").fetchall()
        self.fields = [pa.field(name, pa.type_for_alias(kind)) for name, kind in kinds]

    def find(self, key: str) -> tuple[str | None, dict] | None:
        found = self.db.execute("SELECT caption, fields FROM notes WHERE key = ?", (key,)).fetchone()
        if found is None:
            return None
        values = json.loads(found[1])
        return found[0], {f.name: _as(f.type, values.get(f.name)) for f in self.fields}


def _as(kind: pa.DataType, value):
    if value is None:
        return None
    if kind == pa.string():
        return value if isinstance(value, str) else str(value)
    return float(value) if kind == pa.float64() else value


def shared(ident: str, entries: Iterator[tuple[str, str | None, dict]]) -> DiskAnnotations:
    """The index named `ident` (what it is built from), built from `entries` (join key, caption,
    other fields; the first entry of a key wins) unless another process of the node has built it."""
    path = os.path.join(tempfile.gettempdir(), f"laion-annotations-{ident}.sqlite")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other workers wait for the one building it
        if not os.path.exists(path):
            _build(path, entries)
        index = DiskAnnotations(path)
    atexit.register(_remove, path)
    return index


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _build(path: str, entries: Iterator[tuple[str, str | None, dict]]) -> None:
    part = f"{path}.{os.getpid()}.part"
    db = sqlite3.connect(part)
    try:
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("CREATE TABLE notes (key TEXT PRIMARY KEY, caption TEXT, fields TEXT) WITHOUT ROWID")
        kinds: dict[str, set[type]] = {}
        nested: set[str] = set()
        batch: list[tuple[str, str | None, str]] = []
        for key, caption, fields in entries:
            for name, value in fields.items():
                if isinstance(value, (dict, list)):
                    nested.add(name)
                elif value is not None:
                    kinds.setdefault(name, set()).add(type(value))
            kept = {k: v for k, v in fields.items() if not isinstance(v, (dict, list))}
            batch.append((key, caption, json.dumps(kept)))
            if len(batch) >= BATCH:
                db.executemany("INSERT OR IGNORE INTO notes VALUES (?, ?, ?)", batch)
                batch = []
        db.executemany("INSERT OR IGNORE INTO notes VALUES (?, ?, ?)", batch)
        db.execute("CREATE TABLE fields (position INTEGER, name TEXT, kind TEXT)")
        typed = [(name, _kind(seen)) for name, seen in kinds.items() if name not in nested]
        db.executemany("INSERT INTO fields VALUES (?, ?, ?)", [(i, n, str(k)) for i, (n, k) in enumerate(typed)])
        db.commit()
        db.close()
        os.replace(part, path)  # whole or not there: a build cut short is done again
    except BaseException:
        db.close()
        _remove(part)
        raise


def _kind(seen: set[type]) -> pa.DataType:
    """A field's type from the kinds of its values."""
    if len(seen) == 1:
        return _SCALARS.get(next(iter(seen)), pa.string())
    return pa.float64() if seen == {int, float} else pa.string()
