"""A numbered pattern of files (`{part}` replaced by the numbers first to last, zero-padded to `digits`):
one way of naming many inputs, written once for every section that lists files (source.archives,
source.embedded), so that each takes the same fields with the same rules and expands them alike."""

from __future__ import annotations

from .fields import integer, string

PATTERN_RULE = "!has(self.pattern) || (self.pattern.contains('{part}') && has(self.first) && has(self.last))"
ORDER_RULE = "!has(self.first) || !has(self.last) || self.first <= self.last"


def rules() -> list[dict]:
    """The pattern's CEL rules, fresh objects for each section (the CRD's YAML would share one by anchors)."""
    return [
        {"rule": PATTERN_RULE, "message": "a pattern needs {part} in it, and first and last"},
        {"rule": ORDER_RULE, "message": "first must not be above last"},
    ]


def properties(example: str) -> dict:
    """The pattern's fields; `example` says what a pattern of this section looks like."""
    return {
        "pattern": string(f"A URL with {{part}} in it ({example}); the numbers first to last.", minLength=1),
        "first": integer("The pattern's first number.", minimum=0),
        "last": integer("The pattern's last number (included).", minimum=0),
        "digits": integer("Zero-pad the pattern's numbers to this many digits.", minimum=0, maximum=10, default=0),
    }


def numbered(pattern: str, first: int | None, last: int | None, digits: int | None) -> list[str]:
    """The pattern's URLs, in order."""
    return [pattern.replace("{part}", f"{n:0{digits or 0}d}") for n in range(first or 0, (last or 0) + 1)]
