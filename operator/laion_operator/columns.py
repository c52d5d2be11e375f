"""Which column of a metadata file holds which logical field.

LAION's releases name their columns differently; the known variants are detected so that a spec
needs a `columns` mapping only for files that follow none of them.
"""

from __future__ import annotations

from .spec import Filter

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

# The logical field each filter condition reads.
CONDITION_FIELDS = {
    "min_width": "width",
    "min_height": "height",
    "max_punsafe": "punsafe",
    "max_pwatermark": "pwatermark",
    "min_aesthetic": "aesthetic",
    "min_similarity": "similarity",
    "languages": "language",
}


class ColumnError(ValueError):
    """A field the part needs has no column in the file."""


def required_fields(flt: Filter) -> set[str]:
    needed = {"url"}
    for condition, logical in CONDITION_FIELDS.items():
        if getattr(flt, condition) is not None:
            needed.add(logical)
    return needed


def resolve(file: str, file_columns: list[str], explicit: dict[str, str], needed: set[str]) -> dict[str, str]:
    """Map logical field -> file column; raise ColumnError naming the field and listing the file's columns."""
    mapping: dict[str, str] = {}
    for logical, candidates in CANDIDATES.items():
        if logical in explicit:
            if explicit[logical] not in file_columns:
                raise ColumnError(
                    f"{file}: column {explicit[logical]!r} (spec.columns.{logical}) is not in the file; "
                    f"its columns are: {', '.join(file_columns)}")
            mapping[logical] = explicit[logical]
            continue
        found = next((c for c in candidates if c in file_columns), None)
        if found is not None:
            mapping[logical] = found
        elif logical in needed:
            raise ColumnError(
                f"{file}: no column for {logical!r} (looked for {', '.join(candidates)}); "
                f"its columns are: {', '.join(file_columns)}; set spec.columns.{logical}")
    return mapping
