"""Removal lists (`filter.exclude`): URLs that must never be fetched, read once per filter run.

A list is a Re-LAION-style diff, a file of takedown requests or an opt-out registry's export. Each
source is a local path, an http(s):// URL or an s3:// URL (s3 with the output's endpoint options),
optionally compressed (.gz, .bz2, .xz, .zst: inferred from the name), in one of three shapes chosen by
its name:

- `*.parquet`: a column `url` and/or a column `url_sha256` (or `sha256`); column names in any case.
- `*.csv`: the same columns, named on a header line.
- anything else: text, one entry a line; blank lines and lines starting with `#` are skipped.

An entry is a URL, matched against the metadata's URL string exactly (no normalisation: registries
list the URL as it appears in the metadata), or the SHA-256 of that URL's UTF-8 bytes as 64 hex
digits (what opt-out registries publish to avoid republishing the URLs). In text files a line of 64
hex digits is a hash, anything else must be a URL (`scheme://…`). A parquet hash column may also hold
the 32 raw digest bytes. LAION's own `hash` column is not a URL hash (it hashes URL and caption
together), so a file whose only candidate column is `hash` is refused rather than guessed at.

Memory and speed: each entry is kept as a 64-bit key in a sorted numpy array (8 bytes an entry; ten
million entries are 80 MB), and rows are matched with a binary search per batch. URLs are keyed by a
fixed-key SipHash (pandas' `hash_array`, vectorised); hashes by the first 8 bytes of the SHA-256. The
metadata's URLs are SHA-256 hashed only when some list holds hashes, and only the rows that passed
every earlier condition. CPU measured on the 2-core test machine: ~0.6 µs a row for URL lists, ~2 µs
more when some list holds hashes; loading ~2-3 µs an entry. Two different URLs share a 64-bit key
with probability 2**-64 per pair: at ten million entries and a hundred million rows, one row in
~18,000 runs is dropped that should not have been, and never the other way round.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import InputError

URL_COLUMNS = ("url",)
HASH_COLUMNS = ("url_sha256", "sha256")
_SIP_KEY = "laion-exclude-01"  # 16 bytes: the SipHash key of listed and metadata URLs alike
_HEX64 = r"^[0-9A-Fa-f]{64}$"
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_TEXT_CHUNK_BYTES = 32 << 20  # lines read at once from a text list


def _zstd(f, mode: str = "rb", **_kwargs):
    return pa.CompressedInputStream(pa.PythonFile(f, mode="r"), "zstd")


# fsspec infers .gz, .bz2 and .xz, but .zst only through the zstandard package, which the pipeline does
# not install: Arrow's own codec decompresses it instead (a .zst list was read as raw bytes before).
if "zstd" not in fsspec.available_compressions():
    fsspec.compression.register_compression("zstd", _zstd, "zst")


class ExclusionListError(InputError):
    """A removal list that cannot be read; the message names the file (and line, row or column)."""


def url_keys(urls: pa.Array) -> np.ndarray:
    values = np.asarray(urls.to_numpy(zero_copy_only=False), dtype=object)
    return pd.util.hash_array(values, hash_key=_SIP_KEY, categorize=False)


def sha256_keys(urls: pa.Array) -> np.ndarray:
    sha = hashlib.sha256
    digests = b"".join([sha(u.encode()).digest()[:8] for u in urls.to_pylist()])
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def _hex_keys(hexes: pa.Array) -> np.ndarray:
    """The first 8 bytes of each (validated, non-null) 64-hex-digit string as a big-endian integer."""
    if len(hexes) == 0:
        return np.empty(0, np.uint64)
    heads = pc.utf8_slice_codeunits(hexes.cast(pa.string()), 0, 16)  # int32 offsets below
    offsets = np.frombuffer(heads.buffers()[1], np.int32)[heads.offset : heads.offset + len(heads) + 1]
    text = heads.buffers()[2].to_pybytes()[offsets[0] : offsets[-1]]
    return np.frombuffer(bytes.fromhex(text.decode("ascii")), dtype=">u8").astype(np.uint64)


def _first_bad(valid: pa.Array) -> int:
    return int(np.flatnonzero(~np.asarray(valid.to_numpy(zero_copy_only=False), dtype=bool))[0])


@dataclass
class Exclusions:
    """The listed URLs and URL hashes as sorted 64-bit keys."""

    urls: np.ndarray
    hashes: np.ndarray
    sources: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.urls) + len(self.hashes)

    def matches(self, urls: pa.Array) -> np.ndarray:
        """True for each URL that a list names, by URL or by hash. `urls` holds no nulls."""
        hit = np.zeros(len(urls), dtype=bool)
        if len(urls) == 0:
            return hit
        if len(self.urls):
            hit |= _member(url_keys(urls), self.urls)
        if len(self.hashes):
            hit |= _member(sha256_keys(urls), self.hashes)
        return hit


def _member(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    at = np.minimum(np.searchsorted(table, keys), len(table) - 1)
    return table[at] == keys


class _Collector:
    def __init__(self, source: str):
        self.source = source
        self.urls: list[np.ndarray] = []
        self.hashes: list[np.ndarray] = []

    def add_urls(self, urls: pa.Array) -> None:
        urls = urls.drop_null()
        if len(urls):
            self.urls.append(np.unique(url_keys(urls)))

    def add_hex(self, hexes: pa.Array, where) -> None:
        """`where(i)` names the i-th value's place in the file, for the error."""
        hexes = hexes.drop_null() if hexes.null_count else hexes
        if not len(hexes):
            return
        valid = pc.match_substring_regex(hexes, _HEX64)
        if valid.false_count:
            i = _first_bad(valid)
            raise ExclusionListError(
                f"{self.source}: {where(i)}: {str(hexes[i])[:80]!r} is not a SHA-256 hash of a URL (64 hex digits)"
            )
        self.hashes.append(np.unique(_hex_keys(hexes)))

    def add_digests(self, digests: pa.Array, where) -> None:
        digests = digests.drop_null()
        lengths = pc.binary_length(digests)
        ok = pc.equal(lengths, 32)
        if ok.false_count:
            i = _first_bad(ok)
            raise ExclusionListError(
                f"{self.source}: {where(i)}: a {lengths[i]}-byte value is not a SHA-256 digest (32 bytes)"
            )
        raw = b"".join(pc.binary_slice(digests, 0, 8).to_pylist())
        self.hashes.append(np.unique(np.frombuffer(raw, dtype=">u8").astype(np.uint64)))


def _shape(source: str) -> str:
    name = source.split("?", 1)[0].lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    return "text"


def _columns(source: str, names: list[str]) -> tuple[str | None, str | None]:
    lower = {n.lower(): n for n in names}
    url = next((lower[c] for c in URL_COLUMNS if c in lower), None)
    hashed = next((lower[c] for c in HASH_COLUMNS if c in lower), None)
    if url is None and hashed is None:
        hint = (
            (
                " (LAION's `hash` column hashes URL and caption together and cannot name a URL; give the "
                "URLs or their SHA-256 as `url_sha256`)"
            )
            if "hash" in lower
            else ""
        )
        raise ExclusionListError(
            f"{source}: no `url` or `url_sha256` column{hint}; its columns are: {', '.join(names) or '(none)'}"
        )
    return url, hashed


def _read_parquet(source: str, f, into: _Collector) -> None:
    pf = pq.ParquetFile(f)
    url, hashed = _columns(source, pf.schema_arrow.names)
    row = 0
    for batch in pf.iter_batches(batch_size=1 << 20, columns=[c for c in (url, hashed) if c]):
        if url:
            column = batch.column(url)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise ExclusionListError(f"{source}: column {url!r} holds {column.type}, not URL strings")
            into.add_urls(column)
        if hashed:
            column = batch.column(hashed)
            start = row

            def where(i: int, start: int = start) -> str:
                return f"column {hashed!r}, row {start + i + 1}"

            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                into.add_hex(column, where)
            elif (
                pa.types.is_binary(column.type)
                or pa.types.is_fixed_size_binary(column.type)
                or pa.types.is_large_binary(column.type)
            ):
                into.add_digests(column.cast(pa.binary()), where)
            else:
                raise ExclusionListError(
                    f"{source}: column {hashed!r} holds {column.type}, not SHA-256 hashes "
                    "(hex strings or 32-byte digests)"
                )
        row += batch.num_rows


def _read_csv(source: str, opener, into: _Collector) -> None:
    with opener() as f:
        header = pacsv.open_csv(f).schema.names
    url, hashed = _columns(source, header)
    wanted = [c for c in (url, hashed) if c]
    convert = pacsv.ConvertOptions(
        include_columns=wanted, column_types={c: pa.string() for c in wanted}, strings_can_be_null=True
    )
    row = 0
    with opener() as f:
        reader = pacsv.open_csv(f, convert_options=convert, read_options=pacsv.ReadOptions(block_size=16 << 20))
        for batch in reader:
            if url:
                into.add_urls(batch.column(url))
            if hashed:
                start = row
                # Line numbers count the header and assume no quoted line breaks (URLs and hashes have none).
                into.add_hex(batch.column(hashed), lambda i, start=start: f"line {start + i + 2}, column {hashed!r}")
            row += batch.num_rows


def _read_text(source: str, f, into: _Collector) -> None:
    line_no = 0
    while True:
        lines = f.readlines(_TEXT_CHUNK_BYTES)
        if not lines:
            return
        entries = pc.utf8_trim_whitespace(pa.array(lines, pa.string()))
        skip = pc.or_(pc.equal(entries, ""), pc.starts_with(entries, "#"))
        is_hash = pc.match_substring_regex(entries, _HEX64)
        is_url = pc.match_substring_regex(entries, r"^[A-Za-z][A-Za-z0-9+.-]*://\S")
        bad = pc.invert(pc.or_(skip, pc.or_(is_hash, is_url)))
        if bad.true_count:
            i = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            raise ExclusionListError(
                f"{source}: line {line_no + i + 1}: {str(entries[i])[:80]!r} is neither a URL (scheme://…) nor the "
                "SHA-256 of one (64 hex digits); a CSV list needs a name ending in .csv"
            )
        into.add_hex(entries.filter(pc.and_(is_hash, pc.invert(skip))), lambda i: "a line")
        into.add_urls(entries.filter(pc.and_(is_url, pc.invert(pc.or_(skip, is_hash)))))
        line_no += len(lines)


def load(sources: tuple[str, ...] | list[str]) -> Exclusions:
    """Read every list into sorted keys; raise ExclusionListError naming the file that cannot be read."""
    urls: list[np.ndarray] = []
    hashes: list[np.ndarray] = []
    for source in sources:
        into = _Collector(source)
        shape = _shape(source)

        def opener(mode="rb", source=source):
            return fsspec.open(
                source, mode, compression="infer", **({"encoding": "utf-8", "newline": None} if mode == "r" else {})
            )

        try:
            if shape == "parquet":
                with opener() as f:
                    _read_parquet(source, f, into)
            elif shape == "csv":
                _read_csv(source, opener, into)
            else:
                with opener("r") as f:
                    _read_text(source, f, into)
        except ExclusionListError:
            raise
        except FileNotFoundError:
            raise ExclusionListError(f"{source}: no such removal list (spec.filter.exclude)") from None
        except UnicodeDecodeError as err:
            raise ExclusionListError(
                f"{source}: not UTF-8 text ({err.reason} at byte {err.start} of a chunk); "
                "a parquet list needs a name ending in .parquet"
            ) from None
        except (pa.ArrowInvalid, OSError, ValueError) as err:
            raise ExclusionListError(f"{source}: not a readable {shape} removal list: {err}") from None
        urls += into.urls
        hashes += into.hashes
    return Exclusions(_sorted_unique(urls), _sorted_unique(hashes), tuple(sources))


def _sorted_unique(chunks: list[np.ndarray]) -> np.ndarray:
    if not chunks:
        return np.empty(0, np.uint64)
    return np.unique(np.concatenate(chunks)) if len(chunks) > 1 else chunks[0]
