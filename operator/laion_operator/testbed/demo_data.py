"""LAION-like metadata parquet files whose URLs point at a `fakeweb.ImageServer`.

Columns, types and value distributions follow the real releases closely enough that filters,
column detection and CSV export meet the same awkward cases (nulls, small images, duplicate URLs,
captions with commas, quotes, newlines and non-ASCII text). Each row's download outcome is encoded
in its URL, so `fakeweb.outcome_of(url)` tells what a download must report.

Generation is vectorised (numpy + pyarrow) and streamed in chunks, so 20 M rows take well under
a minute and never exist as Python objects.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Column order and names as in the real files, mapped from the logical field each one holds.
VARIANTS: dict[str, list[tuple[str, str]]] = {
    # LAION2B-en aesthetics 4.5+ (2B-en-4.5_N.parquet)
    "aesthetics": [
        ("URL", "url"),
        ("TEXT", "caption"),
        ("WIDTH", "width"),
        ("HEIGHT", "height"),
        ("similarity", "similarity"),
        ("hash", "hash"),
        ("punsafe", "punsafe"),
        ("pwatermark", "pwatermark"),
        ("AESTHETIC_SCORE", "aesthetic"),
    ],
    # laion-art.parquet
    "laion-art": [
        ("URL", "url"),
        ("TEXT", "caption"),
        ("WIDTH", "width"),
        ("HEIGHT", "height"),
        ("similarity", "similarity"),
        ("LANGUAGE", "language"),
        ("hash", "hash"),
        ("pwatermark", "pwatermark"),
        ("punsafe", "punsafe"),
        ("aesthetic", "aesthetic"),
    ],
    # laion2B-en style, lower-case names
    "lowercase": [
        ("url", "url"),
        ("caption", "caption"),
        ("width", "width"),
        ("height", "height"),
        ("similarity", "similarity"),
        ("hash", "hash"),
        ("punsafe", "punsafe"),
        ("pwatermark", "pwatermark"),
        ("language", "language"),
        ("aesthetic", "aesthetic"),
    ],
}
FIELD_TYPES = {
    "url": pa.string(),
    "caption": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
    "similarity": pa.float64(),
    "hash": pa.int64(),
    "punsafe": pa.float64(),
    "pwatermark": pa.float64(),
    "aesthetic": pa.float64(),
    "language": pa.string(),
}

# Fractions of rows per outcome. "redirect" rows succeed (after a 302); "too_small" rows serve a
# thumbnail (short side < 64 px) while declaring a normal size, as placeholder images do.
DEFAULT_FAILURE_MIX = {
    "ok": 0.75,
    "http_4xx": 0.06,
    "http_5xx": 0.03,
    "timeout": 0.02,
    "decode": 0.04,
    "opt_out": 0.03,
    "redirect": 0.03,
    "too_small": 0.04,
}
MIX_KEYS = ("ok", "redirect", "too_small", "http_4xx", "http_5xx", "timeout", "decode", "opt_out", "connection")

TINY_MAX = 64  # too_small rows' URL short side is below this
DUPLICATE_RATE = 0.015
NULL_RATE = 0.003  # per numeric column, and for captions
MISMATCH_RATE = 0.02  # declared WIDTH/HEIGHT differs from the served image
_CHUNK = 262_144  # generation unit; fixed so output does not depend on row_group_size

FORMATS = ["jpg", "png", "webp"]
FORMAT_P = [0.85, 0.10, 0.05]
LANGS_ART = ["en", "de", "fr", "es", "it", "ja", "zh", "ru", "nl", "pt", "pl", "ko", "sv", "tr", "ar"]
LANGS_ART_P = [0.51, 0.08, 0.07, 0.06, 0.04, 0.05, 0.04, 0.04, 0.03, 0.03, 0.01, 0.01, 0.01, 0.01, 0.01]
LANGS_EN_P = [0.92] + [0.08 / 14] * 14

_WORDS = """photo of a the and with for in on at by from vintage modern red blue green black white
gold silver wooden old new beautiful small large cute happy woman man girl boy child dog cat bird
horse flower tree garden house kitchen room wall art painting print poster canvas design pattern
logo icon vector illustration drawing sketch watercolor abstract landscape mountain sea beach sky
sunset city street car bike shoes dress shirt jacket bag ring necklace watch table chair sofa lamp
bed book cover card wedding birthday christmas summer winter spring autumn day night light dark
portrait close up view background texture stock image hd 4k free sale set best top style home
decor fashion food cake pizza coffee tea bottle glass cup""".split()
# Low-frequency tokens that break naive CSV writers and ASCII assumptions.
_SPECIAL = [
    "café",
    "naïve",
    "Straße",
    "Zürich",
    "東京",
    "猫の写真",
    "Москва",
    "ελληνικά",
    "مرحبا",
    "🎨",
    "🐶",
    '"quoted"',
    "it's",
    '12" x 16"',
    "black, white",
    "a,b,c",
    "line\nbreak",
    "tab\there",
    "semi;colon",
    "back\\slash",
    "<b>bold</b>",
    "100%",
    "|pipe|",
]


def _phrases(rng: np.random.Generator, n: int) -> pa.Array:
    """A pool of short phrases; a caption is one or two of them joined."""
    p = 1.0 / (np.arange(len(_WORDS)) + 3.0)
    p = np.concatenate([p / p.sum() * 0.985, np.full(len(_SPECIAL), 0.015 / len(_SPECIAL))])
    vocab = _WORDS + _SPECIAL
    lengths = rng.integers(1, 7, n)
    picks = rng.choice(len(vocab), size=int(lengths.sum()), p=p)
    out, i = [], 0
    for k in lengths:
        out.append(" ".join(vocab[j] for j in picks[i : i + k]))
        i += k
    return pa.array(out, pa.string())


def _beta_mix(rng, n, parts):
    """Draw from a mixture of beta distributions: parts = [(weight, a, b), ...]."""
    which = rng.choice(len(parts), n, p=[w for w, _, _ in parts])
    out = np.empty(n)
    for i, (_, a, b) in enumerate(parts):
        m = which == i
        out[m] = rng.beta(a, b, int(m.sum()))
    return out


def _nullable(values: np.ndarray, rng: np.random.Generator, rate: float = NULL_RATE) -> pa.Array:
    return pa.array(values, mask=rng.random(len(values)) < rate)


def _sizes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Web image sizes: median long side ~640 px, so a good share is under 512; ~1 % banners."""
    long_side = np.clip(np.rint(rng.lognormal(math.log(640), 0.5, n)), 100, 4000)
    ratio = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 5 / 4, 2.0, 4.5], n, p=[0.30, 0.27, 0.20, 0.10, 0.08, 0.04, 0.01])
    short = np.maximum(np.rint(long_side / ratio), 16)
    portrait = rng.random(n) < 0.35
    w = np.where(portrait, short, long_side).astype(np.int64)
    h = np.where(portrait, long_side, short).astype(np.int64)
    return w, h


def _mix(failure_mix: dict[str, float] | None) -> tuple[list[str], np.ndarray]:
    mix = dict(DEFAULT_FAILURE_MIX if failure_mix is None else failure_mix)
    unknown = set(mix) - set(MIX_KEYS)
    if unknown:
        raise ValueError(f"unknown failure_mix keys {sorted(unknown)}; known: {', '.join(MIX_KEYS)}")
    keys = [k for k in MIX_KEYS if mix.get(k, 0) > 0]
    p = np.array([mix[k] for k in keys], dtype=float)
    if not keys or (p < 0).any():
        raise ValueError("failure_mix needs at least one positive fraction and none negative")
    return keys, p / p.sum()


def _prefixes(keys: list[str], base_url: str, slow_seconds: float) -> tuple[list[str], list[list[int]]]:
    """URL path prefixes, and for each mix key the prefixes it picks among (uniformly)."""
    routes = {
        "ok": ["/img/"],
        "redirect": ["/redirect/"],
        "too_small": ["/img/"],
        "opt_out": ["/noai/"],
        "http_4xx": ["/status/404/", "/status/404/", "/status/403/", "/status/410/"],
        "http_5xx": ["/status/500/", "/status/502/", "/status/503/"],
        "timeout": [f"/slow/{slow_seconds:g}/"],
        "decode": ["/truncated/", "/garbage/"],
        "connection": ["/reset/"],
    }
    table: list[str] = []
    choices = []
    for k in keys:
        idx = []
        for r in routes[k]:
            if base_url + r not in table:
                table.append(base_url + r)
            idx.append(table.index(base_url + r))
        choices.append(idx)
    return table, choices


def _chunk(rng, start, n, seed, keys, probs, prefix_table, prefix_choices, phrases, langs_p):
    kind = rng.choice(len(keys), n, p=probs)
    # Prefix: pick among the kind's routes (e.g. 404/403/410) with one uniform draw.
    u = rng.random(n)
    prefix = np.empty(n, np.int64)
    for k, idx in enumerate(prefix_choices):
        m = kind == k
        prefix[m] = np.asarray(idx)[(u[m] * len(idx)).astype(np.int64)]
    fmt = rng.choice(len(FORMATS), n, p=FORMAT_P)
    fmt[np.isin(prefix, [i for i, p in enumerate(prefix_table) if p.endswith("/truncated/")])] = 0  # jpg
    w, h = _sizes(rng, n)
    uw, uh = w.copy(), h.copy()  # served size
    if "too_small" in keys:
        tiny = kind == keys.index("too_small")
        uw[tiny] = rng.integers(8, TINY_MAX, int(tiny.sum()))
        uh[tiny] = np.maximum(np.rint(uw[tiny] * h[tiny] / w[tiny]), 4).astype(np.int64)
        uh[tiny] = np.minimum(uh[tiny], TINY_MAX - 1)
    mismatch = rng.random(n) < MISMATCH_RATE
    scale = rng.uniform(0.5, 2.0, n)
    w = np.where(mismatch, np.maximum(np.rint(w * scale), 1), w).astype(np.int64)
    h = np.where(mismatch, np.maximum(np.rint(h * scale), 1), h).astype(np.int64)

    # Duplicates copy an earlier row's URL and declared size (same image, another caption).
    src = np.arange(n)
    dup = (rng.random(n) < DUPLICATE_RATE) & (src > 0)
    src[dup] = (rng.random(int(dup.sum())) * src[dup]).astype(np.int64)
    while True:  # follow chains so a duplicate of a duplicate points at the original
        nxt = src[src]
        if np.array_equal(nxt, src):
            break
        src = nxt
    ids = seed * 10**10 + start + src
    prefix, fmt, uw, uh, w, h = prefix[src], fmt[src], uw[src], uh[src], w[src], h[src]

    url = pc.binary_join_element_wise(
        pa.array(prefix_table).take(pa.array(prefix)),
        pc.cast(pa.array(ids), pa.string()),
        "_",
        pc.cast(pa.array(uw), pa.string()),
        "x",
        pc.cast(pa.array(uh), pa.string()),
        ".",
        pa.array(FORMATS).take(pa.array(fmt)),
        "",
    )

    first = phrases.take(pa.array(rng.integers(0, len(phrases), n)))
    second = phrases.take(pa.array(rng.integers(0, len(phrases), n), mask=rng.random(n) < 0.35))
    caption = pc.binary_join_element_wise(first, second, " ", null_handling="skip")
    caption = pc.if_else(pa.array(rng.random(n) < NULL_RATE), pa.scalar(None, pa.string()), caption)

    punsafe = _beta_mix(rng, n, [(0.90, 0.5, 20), (0.07, 1, 1), (0.03, 10, 0.5)])
    pwatermark = _beta_mix(rng, n, [(0.92, 0.7, 1.8), (0.08, 8, 0.5)])
    return {
        "url": url,
        "caption": caption,
        "width": pa.array(w, mask=rng.random(n) < NULL_RATE / 2),
        "height": pa.array(h, mask=rng.random(n) < NULL_RATE / 2),
        "similarity": _nullable(0.25 + 0.2 * rng.beta(2.5, 4, n), rng),
        "hash": pa.array(rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64)),
        "punsafe": _nullable(punsafe, rng),
        "pwatermark": _nullable(pwatermark, rng),
        "aesthetic": _nullable(np.clip(rng.normal(5.0, 0.8, n), 1.0, 10.0), rng),
        "language": pa.array(LANGS_ART).take(
            pa.array(rng.choice(len(LANGS_ART), n, p=langs_p), mask=rng.random(n) < NULL_RATE)
        ),
    }


def schema(variant: str) -> pa.Schema:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    return pa.schema([(name, FIELD_TYPES[logical]) for name, logical in VARIANTS[variant]])


def generate(
    n_rows: int,
    base_url: str,
    variant: str = "aesthetics",
    seed: int = 0,
    failure_mix: dict[str, float] | None = None,
    slow_seconds: float = 3,
):
    """Yield pyarrow Tables of up to 262,144 rows that together make the file's rows."""
    sch = schema(variant)
    keys, probs = _mix(failure_mix)
    prefix_table, prefix_choices = _prefixes(keys, base_url.rstrip("/"), slow_seconds)
    phrases = _phrases(np.random.default_rng([seed, 0x7E47]), 4096)
    langs_p = LANGS_ART_P if variant == "laion-art" else LANGS_EN_P
    for i, start in enumerate(range(0, n_rows, _CHUNK)):
        n = min(_CHUNK, n_rows - start)
        rng = np.random.default_rng([seed, i])
        cols = _chunk(rng, start, n, seed, keys, probs, prefix_table, prefix_choices, phrases, langs_p)
        yield pa.table([cols[logical] for _, logical in VARIANTS[variant]], schema=sch)


def write_metadata(
    path,
    n_rows: int,
    base_url: str,
    variant: str = "aesthetics",
    seed: int = 0,
    failure_mix: dict[str, float] | None = None,
    row_group_size: int = 100_000,
    slow_seconds: float = 3,
    return_table: bool = True,
) -> pa.Table | None:
    """Write `n_rows` LAION-like rows to a parquet file; return them as a Table (None if not asked).

    Deterministic for the same arguments (row_group_size only changes the file layout).
    Pass return_table=False for large files so they are never held in memory.
    """
    kept: list[pa.Table] = []
    pending: list[pa.Table] = []
    pending_rows = 0
    with pq.ParquetWriter(path, schema(variant), compression="snappy") as writer:
        for table in generate(n_rows, base_url, variant, seed, failure_mix, slow_seconds):
            if return_table:
                kept.append(table)
            # Buffer so every row group but the last is exactly row_group_size rows.
            pending.append(table)
            pending_rows += table.num_rows
            if pending_rows >= row_group_size:
                buf = pa.concat_tables(pending)
                full = (pending_rows // row_group_size) * row_group_size
                writer.write_table(buf.slice(0, full), row_group_size=row_group_size)
                pending, pending_rows = [buf.slice(full)], pending_rows - full
        if pending_rows or n_rows == 0:
            writer.write_table(
                pa.concat_tables(pending) if pending else schema(variant).empty_table(), row_group_size=row_group_size
            )
    if not return_table:
        return None
    return pa.concat_tables(kept) if kept else schema(variant).empty_table()


def _parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        mix[key.strip()] = float(value)
    return mix


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(
        prog="python -m laion_operator.demo_data",
        description="Write a LAION-like metadata parquet file pointing at a fakeweb server.",
    )
    p.add_argument("out", help="output .parquet path")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--base-url", required=True, help="e.g. the URL `python -m laion_operator.fakeweb` prints")
    p.add_argument("--variant", choices=list(VARIANTS), default="aesthetics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow-seconds", type=float, default=3)
    p.add_argument("--row-group-size", type=int, default=100_000)
    p.add_argument(
        "--mix",
        type=_parse_mix,
        default=None,
        help="outcome fractions, e.g. ok=0.9,http_4xx=0.1 "
        f"(default: {','.join(f'{k}={v}' for k, v in DEFAULT_FAILURE_MIX.items())})",
    )
    args = p.parse_args(argv)
    write_metadata(
        args.out,
        args.rows,
        args.base_url,
        args.variant,
        args.seed,
        args.mix,
        args.row_group_size,
        args.slow_seconds,
        return_table=False,
    )
    print(f"wrote {args.rows} rows ({args.variant}) to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
