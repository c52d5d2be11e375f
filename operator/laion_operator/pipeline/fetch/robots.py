"""Opting out of a crawl: X-Robots-Tag headers, read as img2dataset reads them, and a host's robots.txt
read as RFC 9309 says."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.robotparser import RobotFileParser

ROBOTS_MAX_BYTES = 512 << 10  # RFC 9309 asks crawlers to parse at least the first 500 KiB


def robots_tag_disallows(values: Iterable[str], token: str, directives: Iterable[str]) -> bool:
    """Whether X-Robots-Tag header values opt an image out, read as img2dataset reads them:
    "noai, noimageai" for every agent, "<token>: noai" for the one whose userAgentToken it names."""
    wanted = {d.lower() for d in directives}
    for value in values:
        agent, colon, rules = value.partition(":")
        if colon and agent.strip().lower() != token.lower():
            continue
        if wanted & {rule.strip().lower() for rule in (rules if colon else agent).split(",")}:
            return True
    return False


def robots_parser(url: str, status: int, body: bytes) -> RobotFileParser | None:
    """The rules of the robots.txt at `url` that answered `status` with `body`; None allows everything.
    As RFC 9309 says: 4xx allows everything, 5xx disallows everything."""
    parser = RobotFileParser(url)
    if 400 <= status < 500:
        return None
    if status >= 500:
        parser.disallow_all = True  # type: ignore[attr-defined]  # read() sets it on a 401/403; typeshed omits it
        return parser
    parser.parse(body.decode("utf-8", "replace").splitlines())
    return parser
