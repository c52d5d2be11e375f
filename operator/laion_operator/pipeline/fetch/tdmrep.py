"""The W3C TDM Reservation Protocol (TDMRep, final report of 2024): a rights holder reserves text and
data mining of a resource by its response's `tdm-reservation: 1` header, or for a whole site by
`/.well-known/tdmrep.json`, an array of rules `{"location": <pattern>, "tdm-reservation": 0|1,
"tdm-policy": <URL>}` whose locations are path patterns as robots.txt writes them (`*` any
characters, a final `$` the path's end); the first rule whose location matches a path decides it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TDMREP_PATH = "/.well-known/tdmrep.json"
TDMREP_MAX_BYTES = 64 << 10  # a site's rules; a larger file is not read (and reserves nothing)
HEADER = "tdm-reservation"


def header_reserves(headers: Mapping[str, str]) -> bool:
    """Whether a response's headers reserve TDM rights on it (`tdm-reservation: 1`)."""
    return str(headers.get(HEADER, "")).strip() == "1"


def _pattern(location: str) -> re.Pattern[str]:
    anchored = location.endswith("$")
    body = location[:-1] if anchored else location
    return re.compile("".join(".*" if c == "*" else re.escape(c) for c in body) + ("$" if anchored else ""))


@dataclass(frozen=True)
class Rule:
    location: str
    pattern: re.Pattern[str]
    reserved: bool
    policy: str


@dataclass(frozen=True)
class Rules:
    """A site's tdmrep.json, its rules in the file's order."""

    rules: tuple[Rule, ...]

    def reserving(self, path: str) -> Rule | None:
        """The rule that reserves `path` (a URL's path, with its query), or None."""
        for rule in self.rules:
            if rule.pattern.match(path):
                return rule if rule.reserved else None
        return None


def parse(status: int, body: bytes) -> Rules | None:
    """The rules of a tdmrep.json that answered `status` with `body`; None (nothing reserved) for an
    error, a body that is not the protocol's JSON, or one cut at TDMREP_MAX_BYTES."""
    if status != 200:
        return None
    try:
        entries = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entries, list):
        return None
    return Rules(tuple(_rules(entries)))


def _rules(entries: Iterable) -> Iterable[Rule]:
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("location"), str):
            continue  # the protocol's rules each name a location; others say nothing
        location = entry["location"] if entry["location"].startswith("/") else "/" + entry["location"]
        reserved = str(entry.get(HEADER, "0")).strip() == "1"
        yield Rule(location, _pattern(location), reserved, str(entry.get("tdm-policy", "")))
