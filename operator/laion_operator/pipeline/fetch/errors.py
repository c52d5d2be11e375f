"""What a fetch that gave no image raised, and the failure reason (contract.FAILURE_REASONS) of any
exception raised while fetching: the one place that maps the network's errors to reasons."""

from __future__ import annotations

import asyncio
import socket
import ssl

import aiohttp

# Never retried: another attempt gets the same answer.
FINAL = frozenset(
    {"opt_out", "http_4xx", "bad_url", "blocked_address", "too_large", "redirect", "rate_limited", "expired"}
)


class FetchError(Exception):
    """A URL that gave no image; `reason` is one of contract.FAILURE_REASONS, and an `opt_out`'s
    `rule` one of contract.OPT_OUT_RULES (which opt-out refused it)."""

    def __init__(self, reason: str, message: str, rule: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.rule = rule


class BlockedAddress(Exception):
    """A connection the address guard refused (not an OSError, so that aiohttp passes it through)."""


class RetryLater(Exception):
    """A 429, or a 503 with Retry-After: the host asks to wait `wait` seconds (None: it did not say)."""

    def __init__(self, wait: float | None, message: str):
        super().__init__(message)
        self.wait = wait


def classify(err: BaseException, phase: str = "") -> str:
    """One of contract.FAILURE_REASONS for an exception raised while fetching."""
    if isinstance(err, FetchError):
        return err.reason
    if isinstance(err, BlockedAddress):
        return "blocked_address"
    if isinstance(err, (asyncio.TimeoutError, TimeoutError, socket.timeout)):
        return "dns" if phase == "dns" else "timeout"
    if isinstance(err, (aiohttp.ClientConnectorDNSError, socket.gaierror)):
        return "dns"
    if isinstance(err, (aiohttp.ClientSSLError, ssl.SSLError)):
        return "tls"
    if isinstance(err, aiohttp.ClientConnectorError):
        os_error = getattr(err, "os_error", None)
        if isinstance(os_error, ssl.SSLError):
            return "tls"
        return "connection"
    if isinstance(err, aiohttp.ClientPayloadError):
        return "decode"  # a truncated body is a corrupt image, as img2dataset counts it
    if isinstance(err, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
        return "bad_url"
    if isinstance(err, aiohttp.ClientResponseError) and err.status >= 400:
        return "http_4xx" if err.status < 500 else "http_5xx"
    if isinstance(err, (aiohttp.ClientConnectionError, ConnectionError)):
        return "connection"
    return "other"


def message_of(err: BaseException) -> str:
    return str(err) or type(err).__name__
