"""Which column of a metadata file holds which logical field.

LAION's releases name their columns differently; the known variants are detected so that a spec
needs a `columns` mapping only for files that follow none of them.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from ..spec import Filter, PartSpec

# First match wins: aesthetics 4.5+ (URL TEXT WIDTH HEIGHT similarity punsafe pwatermark AESTHETIC_SCORE
# hash), laion-art (… LANGUAGE hash pwatermark punsafe aesthetic) and lowercase laion2B (url caption …).
CANDIDATES: dict[str, tuple[str, ...]] = {
    "url": ("URL", "url"),
    "caption": ("TEXT", "caption", "text", "CAPTION"),
    "width": ("WIDTH", "width"),
    "height": ("HEIGHT", "height"),
    "aesthetic": ("AESTHETIC_SCORE", "aesthetic", "aesthetic_score", "AESTHETIC"),
    "punsafe": ("punsafe", "PUNSAFE"),
    "pwatermark": ("pwatermark", "PWATERMARK"),
    "similarity": ("similarity", "SIMILARITY"),
    "language": ("LANGUAGE", "language", "lang"),
    "hash": ("hash", "HASH"),
}

# The filter's threshold conditions, in the order a dropped row is counted under the first it fails:
# (counter name, spec.filter attribute, logical field it reads, keep-when comparison).
CONDITIONS = [
    ("minWidth", "min_width", "width", pc.greater_equal),
    ("minHeight", "min_height", "height", pc.greater_equal),
    ("maxPunsafe", "max_punsafe", "punsafe", pc.less_equal),
    ("maxPwatermark", "max_pwatermark", "pwatermark", pc.less_equal),
    ("minAesthetic", "min_aesthetic", "aesthetic", pc.greater_equal),
    ("minSimilarity", "min_similarity", "similarity", pc.greater_equal),
]
LANGUAGE_FIELD = "language"  # read by spec.filter.languages, counted after the thresholds


class ColumnError(InputError):
    """A field the part needs has no column in the file."""


def required_fields(flt: Filter) -> set[str]:
    needed = {"url"}
    for _name, attr, logical, _compare in CONDITIONS:
        if getattr(flt, attr) is not None:
            needed.add(logical)
    if flt.languages is not None:
        needed.add(LANGUAGE_FIELD)
    return needed


def resolve(file: str, file_columns: list[str], explicit: dict[str, str], needed: set[str]) -> dict[str, str]:
    """Map logical field -> file column; raise ColumnError naming the field and listing the file's columns."""
    mapping: dict[str, str] = {}
    for logical, candidates in CANDIDATES.items():
        if logical in explicit:
            if explicit[logical] not in file_columns:
                raise ColumnError(
                    f"{file}: column {explicit[logical]!r} (spec.columns.{logical}) is not in the file; "
                    f"its columns are: {', '.join(file_columns)}"
                )
            mapping[logical] = explicit[logical]
            continue
        found = next((c for c in candidates if c in file_columns), None)
        if found is not None:
            mapping[logical] = found
        elif logical in needed:
            raise ColumnError(
                f"{file}: no column for {logical!r} (looked for {', '.join(candidates)}); "
                f"its columns are: {', '.join(file_columns)}; set spec.columns.{logical}"
            )
    return mapping


def sample_filter(spec: PartSpec) -> Callable[[dict], str | None] | None:
    """For a source of samples (archives' sidecars, an embedded row): a function telling why one
    sample fails the spec's filter on its own metadata, or None — the URL list's thresholds and
    languages over the same logical fields, found by the same column names (spec.columns first). A
    field the sample lacks is not judged (its image's real size is, apart: convert.below_minimum).
    None when the spec sets none of them: nothing to do per sample."""
    flt = spec.filter
    checks = [
        (name, attr, logical, compare)
        for name, attr, logical, compare in CONDITIONS
        if getattr(flt, attr) is not None and logical not in ("width", "height")
    ]
    if not checks and flt.languages is None:
        return None

    def refusal(meta: dict) -> str | None:
        names = [k for k, v in meta.items() if v is not None]
        explicit = {k: v for k, v in spec.columns.items() if v in names}
        mapping = resolve("sample metadata", names, explicit, set())
        for name, attr, logical, compare in checks:
            if logical not in mapping:
                continue
            threshold, value = getattr(flt, attr), meta[mapping[logical]]
            try:
                kept = compare(pa.scalar(float(value)), threshold).as_py()
            except (TypeError, ValueError):
                return f"{mapping[logical]} {value!r} is not a number (filter.{name})"
            if not kept:
                return f"{mapping[logical]} {value} fails filter.{name} {threshold}"
        if flt.languages is not None and LANGUAGE_FIELD in mapping:
            language = meta[mapping[LANGUAGE_FIELD]]
            if language not in flt.languages:
                return f"{mapping[LANGUAGE_FIELD]} {language!r} is not one of filter.languages"
        return None

    return refusal
