"""Fetching a shard's images: many URLs in flight on one event loop, each under a deadline, a size
cap, an address guard and per-host politeness.

A shard task runs one `Engine` (aiohttp) on one event loop through `run`: `maxInFlight` URLs at once,
keep-alive connections reused per host, at most `maxPerHost` URLs and connections to one host at a
time. Every fetched body goes to a small pool of decode/resize threads, so that the CPU works while
the network waits. A fetch slot is free again as soon as its body is queued for those threads, so the
network runs ahead of the CPU: a URL that will only end at its deadline (a silent host, a drip-fed
body) starts early and waits alongside the decoding instead of after it, at a shard's end. The bodies
in memory are bounded: `maxInFlight` being read, of at most `maxImageBytes` each, and the queued ones
up to `spec.DECODE_BACKLOG_BYTES`.

What happens to one URL, and the failure reason (contract.FAILURE_REASONS) each step can give:
- only http and https URLs are fetched, with no I/O for anything else (`bad_url`);
- a host marked dead — several connections in a row refused or unanswered, none answered since —
  fails at once (`connection`), for the rest of the shard;
- with `respectRobotsTxt`, the host's robots.txt, fetched once per task under its own deadline
  (`opt_out`);
- attempts, 1 + `retries`: each is bounded as a whole — DNS, connect, TLS, headers, redirects and body —
  by `timeout` (`timeout`; `dns` if the deadline passes while resolving). 429, and 503 with a
  Retry-After, wait and try again for as long as the URL's budget (its attempts' deadlines) lasts,
  and this host's other URLs wait too (`rate_limited` once the budget is spent);
- on every hop: the address connected to, after DNS, must be public unless `allowedNetworks` opens it
  (`blocked_address`); redirects are followed here, at most `maxRedirects` and never in a loop
  (`redirect`); X-Robots-Tag (`opt_out`); `maxImageBytes` by Content-Length before reading and while
  reading, and the pixels the image's header declares against `maxImagePixels` (`too_large`).

So a URL holds its slot for at most its attempts' deadlines plus backoff, and with robots.txt on, plus
that file's deadline once per host.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import ipaddress
import math
import re
import socket
import ssl
import struct
import time
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image
from yarl import URL

from ..spec import DECODE_BACKLOG_BYTES, Download

SCHEMES = ("http", "https")
REDIRECTS = (301, 302, 303, 307, 308)
DEAD_AFTER = 3  # connections in a row refused or unanswered, with no answer since, before a host is dead
DNS_FAILURE_TTL = 30.0  # seconds a failed lookup is remembered (a success: for the whole task)
ROBOTS_MAX_BYTES = 512 << 10  # RFC 9309 asks crawlers to parse at least the first 500 KiB
HEADER_PROBE_BYTES = 256 << 10  # while reading, look for the image's declared size in this much
MAX_BACKOFF = 60.0  # a 429 without Retry-After waits 1, 2, 4 … seconds, at most this
AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
# Never retried: another attempt gets the same answer.
FINAL = frozenset({"opt_out", "http_4xx", "bad_url", "blocked_address", "too_large", "redirect", "rate_limited"})

# The pixel check below is ours (maxImagePixels); Pillow's own warning about large images is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class FetchError(Exception):
    """A URL that gave no image; `reason` is one of contract.FAILURE_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BlockedAddress(Exception):
    """A connection the address guard refused (not an OSError, so that aiohttp passes it through)."""


class _RetryLater(Exception):
    def __init__(self, wait: float, message: str):
        super().__init__(message)
        self.wait = wait


# --- the address guard --------------------------------------------------------------------------

# Never connected to unless allowedNetworks opens them: this host, the local networks, cloud
# metadata (169.254.169.254), carrier-grade NAT, documentation, benchmarking, multicast, reserved.
BLOCKED_NETWORKS = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
    "::/96", "::1/128", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7",
    "fe80::/10", "fec0::/10", "ff00::/8",
)]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for: IPv4-mapped, 6to4 or NAT64."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class AddressGuard:
    """Which IP addresses a download may connect to: public ones, and those in `allowed`."""

    def __init__(self, allowed: Iterable[str] = ()):
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed]

    def allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        forms = [ip]
        if ip.version == 6:
            inner = _embedded_ipv4(ip)
            if inner is not None:
                forms.append(inner)
        if any(f.version == n.version and f in n for f in forms for n in self.allowed):
            return True
        return not any(_blocked(f) for f in forms)


def _blocked(ip) -> bool:
    if any(ip.version == n.version and ip in n for n in BLOCKED_NETWORKS):
        return True
    if ip.version == 6 and _embedded_ipv4(ip) is not None:
        return _blocked(_embedded_ipv4(ip))
    return (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class GuardedResolver(AbstractResolver):
    """DNS for one task: every answer cached (failures for DNS_FAILURE_TTL), and only addresses the
    guard allows handed to the connector, so the address connected to is one that was checked."""

    def __init__(self, inner: AbstractResolver, guard: AddressGuard):
        self.inner = inner
        self.guard = guard
        self._cache: dict[tuple, asyncio.Future] = {}
        self._failed_at: dict[tuple, float] = {}
        self.lookups = 0  # lookups that went to the resolver (the rest came from the cache)

    def _lookup(self, host: str, family: int) -> asyncio.Future:
        key = (host, family)
        loop = asyncio.get_running_loop()
        future = self._cache.get(key)
        if future is None or (key in self._failed_at and loop.time() - self._failed_at[key] > DNS_FAILURE_TTL):
            self.lookups += 1
            self._failed_at.pop(key, None)
            future = self._cache[key] = asyncio.ensure_future(self.inner.resolve(host, 0, family))

            def finished(f: asyncio.Future) -> None:
                if f.cancelled() or f.exception() is not None:  # (retrieving it keeps asyncio from logging it)
                    self._failed_at[key] = loop.time()
            future.add_done_callback(finished)
        return future

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        try:
            infos = await asyncio.shield(self._lookup(host, family))
        except OSError as err:  # a fresh error each time: aiohttp wraps it as ClientConnectorDNSError
            raise socket.gaierror(err.errno, err.strerror or str(err)) from None
        allowed = [{**i, "port": port} for i in infos if self.guard.allows(i["host"])]
        if not allowed:
            shown = ", ".join(sorted({i["host"] for i in infos})[:3])
            raise BlockedAddress(f"{host} resolves to {shown}: not a public address (download.allowedNetworks)")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


def make_resolver(dns_servers: Iterable[str], guard: AddressGuard) -> GuardedResolver:
    servers = list(dns_servers)
    if servers:
        inner = aiohttp.AsyncResolver(nameservers=servers)  # c-ares, through aiodns
    else:
        inner = aiohttp.ThreadedResolver()  # the system's resolver (getaddrinfo)
    return GuardedResolver(inner, guard)


# --- image headers ------------------------------------------------------------------------------

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in _SOF:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return (width, height) if width and height else None
        if marker in (0xDA, 0xD9):
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG, PNG, GIF or WebP header declares, from its first bytes; None if unknown."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_size(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    return None


_BOMB = re.compile(r"Image size \((\d+) pixels\)")


def declared_pixels(data: bytes) -> int | None:
    """Pixels the image in `data` declares, read from its header only (never decoded); None if unknown."""
    size = header_size(data)
    if size is None:
        try:  # other formats: Pillow's lazy open reads the header only
            with Image.open(io.BytesIO(data)) as img:
                size = img.size
        except Image.DecompressionBombError as err:
            m = _BOMB.search(str(err))
            return int(m.group(1)) if m else None
        except Exception:  # noqa: BLE001 - not an image Pillow knows: the decoder will say so
            return None
    return size[0] * size[1]


# --- the engine ---------------------------------------------------------------------------------

@dataclass
class Host:
    """What a task knows of one host (name and port)."""

    streak: int = 0  # connections in a row refused or unanswered
    last_answer: float = -math.inf  # when the host last answered a request (loop time)
    dead: bool = False
    not_before: float = 0.0  # Retry-After: no request before this (loop time)

    def answered(self, now: float) -> None:
        self.streak = 0
        self.last_answer = now

    def failed(self, started: float) -> None:
        """A connection begun at `started` was refused or not answered: evidence only if the host has
        not answered anything since (a slow URL on a live host is not a dead host)."""
        if self.last_answer < started:
            self.streak += 1
            self.dead = self.dead or self.streak >= DEAD_AFTER


@dataclass
class _Attempt:
    """One attempt's progress, kept current by aiohttp's tracing: which phase a deadline ended."""

    phase: str = "start"  # queued dns connect request headers body
    host: Host | None = None
    hop_started: float = 0.0


def _tracing() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()

    def phase(name):
        async def set_phase(session, ctx, params):
            if isinstance(ctx.trace_request_ctx, _Attempt):
                ctx.trace_request_ctx.phase = name
        return set_phase

    trace.on_connection_queued_start.append(phase("queued"))
    trace.on_connection_create_start.append(phase("connect"))
    trace.on_dns_resolvehost_start.append(phase("dns"))
    trace.on_dns_resolvehost_end.append(phase("connect"))
    trace.on_connection_create_end.append(phase("request"))
    trace.on_connection_reuseconn.append(phase("request"))
    trace.on_request_headers_sent.append(phase("headers"))
    return trace


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


def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(when.timestamp() - time.time(), 0.0) if when else None


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


def _message(err: BaseException) -> str:
    return str(err) or type(err).__name__


class Engine:
    """Fetches URLs with one aiohttp session; use `async with Engine(opts) as e: await e.fetch(url)`."""

    def __init__(self, opts: Download):
        self.opts = opts
        self.timeout = float(opts.timeout)
        self.retries = opts.retries
        self.budget = (opts.retries + 1) * self.timeout  # the attempts' deadlines, end to end
        self.token = opts.user_agent_token.strip().lower() if opts.user_agent_token else None
        self.directives = {d.strip().lower() for d in opts.disallowed_header_directives} or None
        agent = AGENT
        if self.token:
            agent += f" (compatible; {self.token}; +https://github.com/rom1504/img2dataset)"
        # identity: the bytes the server stores are the bytes hashed and decoded, as with urllib.
        self.headers = {"User-Agent": agent, "Accept-Encoding": "identity"}
        self.guard = AddressGuard(opts.allowed_networks or ())
        self.hosts: dict[tuple[str, int], Host] = {}
        self._robots: dict[tuple, asyncio.Future] = {}
        self.session: aiohttp.ClientSession | None = None
        self.resolver: GuardedResolver | None = None

    async def __aenter__(self) -> "Engine":
        self.loop = asyncio.get_running_loop()
        self.resolver = make_resolver(self.opts.dns_servers or (), self.guard)
        connector = aiohttp.TCPConnector(
            limit=max(self.opts.max_in_flight * 2, 16), limit_per_host=self.opts.max_per_host,
            resolver=self.resolver, use_dns_cache=False,  # the resolver caches, with the guard after it
            ssl=True if self.opts.verify_tls else False, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector, headers=self.headers, auto_decompress=False, trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=None),
            trace_configs=[_tracing()], max_line_size=65536, max_field_size=65536)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    def host(self, url: URL) -> Host:
        key = (url.host or "", url.port or 0)
        state = self.hosts.get(key)
        if state is None:
            state = self.hosts[key] = Host()
        return state

    def check_url(self, url: URL) -> None:
        """Raise FetchError for a URL that must not be fetched, before any I/O."""
        if url.scheme not in SCHEMES:
            raise FetchError("bad_url", f"not an http(s) URL: {str(url)[:200]}")
        if not url.host:
            raise FetchError("bad_url", f"no host in URL: {str(url)[:200]}")
        if _is_ip(url.host) and not self.guard.allows(url.host):
            raise FetchError("blocked_address", f"{url.host} is not a public address (download.allowedNetworks)")

    async def fetch(self, text: str) -> bytes:
        """The image bytes at `text`, or FetchError with its reason."""
        start = self.loop.time()
        budget_end = start + self.budget
        try:
            url = URL(text)
        except (ValueError, TypeError) as err:
            raise FetchError("bad_url", f"not a URL: {err}") from None
        self.check_url(url)
        if self.opts.respect_robots_txt:
            await self._check_robots(url)
        failures, rate_limits = 0, 0
        while True:
            host = self.host(url)
            if host.dead:
                raise FetchError("connection", f"{url.host}: host not answering ({DEAD_AFTER} connections in a "
                                               "row refused or timed out); not tried again in this shard")
            now = self.loop.time()
            if host.not_before > now:
                if host.not_before + self._least_attempt() > budget_end:
                    raise FetchError("rate_limited", f"{url.host} asked to wait past this URL's time budget")
                await asyncio.sleep(host.not_before - now)
                now = self.loop.time()
            remaining = budget_end - now
            attempt = _Attempt()
            try:
                return await asyncio.wait_for(self._attempt(url, attempt), min(self.timeout, remaining))
            except _RetryLater as later:
                rate_limits += 1
                wait = later.wait if later.wait is not None else min(2.0 ** (rate_limits - 1), MAX_BACKOFF)
                until = self.loop.time() + wait
                if attempt.host is not None:
                    attempt.host.not_before = max(attempt.host.not_before, until)
                if until + self._least_attempt() > budget_end:
                    raise FetchError("rate_limited", f"{later}; waiting {wait:g} s more is past this URL's "
                                                     f"time budget of {self.budget:g} s") from None
                await asyncio.sleep(wait)
                continue
            except FetchError as err:
                error = err
            except asyncio.TimeoutError:
                error = FetchError("dns" if attempt.phase == "dns" else "timeout",
                                   f"no {'DNS answer' if attempt.phase == 'dns' else 'complete answer'} "
                                   f"within {min(self.timeout, remaining):g} s ({attempt.phase})")
                if attempt.phase in ("connect", "request", "headers") and attempt.host is not None:
                    attempt.host.failed(attempt.hop_started)
            except Exception as err:  # noqa: BLE001 - every network failure is a sample's failure, not the shard's
                error = FetchError(classify(err, attempt.phase), _message(err))
                if (isinstance(err, aiohttp.ClientConnectorError) and error.reason == "connection"
                        and attempt.host is not None):
                    attempt.host.failed(attempt.hop_started)
            failures += 1
            if error.reason in FINAL or failures > self.retries or self.loop.time() >= budget_end:
                raise error

    def _least_attempt(self) -> float:
        """The least time worth starting an attempt with after waiting for a rate limit."""
        return min(self.timeout, 1.0)

    async def _attempt(self, url: URL, attempt: _Attempt, robots: bool = False):
        """One attempt: follow redirects, check every hop, read the body under the caps. For robots.txt,
        (status, body) instead of raising for an HTTP status."""
        seen = {str(url)}
        hops = 0
        while True:
            self.check_url(url)
            host = self.host(url)
            if host.dead and not robots:
                raise FetchError("connection", f"{url.host}: host not answering (redirect target)")
            attempt.host, attempt.hop_started, attempt.phase = host, self.loop.time(), "queued"
            async with self.session.get(url, allow_redirects=False, trace_request_ctx=attempt) as resp:
                host.answered(self.loop.time())
                attempt.phase = "body"
                location = resp.headers.get("Location")
                if resp.status in REDIRECTS and location:
                    hops += 1
                    try:
                        target = resp.url.join(URL(location))
                    except (ValueError, TypeError):
                        raise FetchError("redirect", f"bad redirect Location {location[:200]!r}") from None
                    if hops > self.opts.max_redirects:
                        raise FetchError("redirect", f"more than {self.opts.max_redirects} redirects")
                    if str(target) in seen:
                        raise FetchError("redirect", f"redirect loop at {str(target)[:200]}")
                    seen.add(str(target))
                    await self._drain(resp)
                    url = target
                    continue
                if robots:
                    if resp.status != 200:
                        return resp.status, b""
                    return resp.status, await self._read(resp, ROBOTS_MAX_BYTES, truncate=True)
                if resp.status == 429 or (resp.status == 503 and "Retry-After" in resp.headers):
                    wait = _retry_after(resp.headers.get("Retry-After"), self.loop.time())
                    if resp.status == 503 and wait is None:
                        raise FetchError("http_5xx", f"HTTP 503 {resp.reason or ''}".strip())
                    raise _RetryLater(wait, f"HTTP {resp.status} from {url.host}")
                if resp.status >= 400:
                    await self._drain(resp)
                    reason = "http_4xx" if resp.status < 500 else "http_5xx"
                    raise FetchError(reason, f"HTTP Error {resp.status}: {resp.reason or ''}".strip())
                if resp.status >= 300 or resp.status < 200:
                    raise FetchError("other", f"HTTP {resp.status} {resp.reason or ''}".strip())
                if self.directives and robots_tag_disallows(resp.headers.getall("X-Robots-Tag", ()), self.token,
                                                               self.directives):
                    raise FetchError("opt_out", "Use of image disallowed by X-Robots-Tag directive")
                return await self._read(resp, self.opts.max_image_bytes)

    async def _read(self, resp: aiohttp.ClientResponse, limit: int, truncate: bool = False) -> bytes:
        if resp.content_length is not None and resp.content_length > limit and not truncate:
            raise FetchError("too_large", f"Content-Length {resp.content_length} is over download.maxImageBytes "
                                          f"({limit})")
        chunks: list[bytes] = []
        size = 0
        probing = not truncate  # looking for the image's declared size in what has come so far
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                if truncate:
                    chunks.append(chunk[:len(chunk) - (size - limit)])
                    break
                raise FetchError("too_large", f"body over download.maxImageBytes ({limit})")
            chunks.append(chunk)
            if probing and size <= HEADER_PROBE_BYTES:  # a huge declared image: refused before the rest
                declared = header_size(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                if declared is not None:
                    self._check_pixels(declared[0] * declared[1])
                    probing = False
        body = b"".join(chunks)
        if probing:  # formats without a fast header reader, or a header past the probe
            pixels = declared_pixels(body)
            if pixels is not None:
                self._check_pixels(pixels)
        return body

    def _check_pixels(self, pixels: int) -> None:
        if pixels > self.opts.max_image_pixels:
            raise FetchError("too_large", f"image declares {pixels} pixels, over download.maxImagePixels "
                                          f"({self.opts.max_image_pixels})")

    @staticmethod
    async def _drain(resp: aiohttp.ClientResponse) -> None:
        """Read a small error or redirect body so that its connection can be reused."""
        if resp.content_length is not None and resp.content_length <= 65536:
            try:
                await resp.read()
            except aiohttp.ClientError:
                pass

    async def _check_robots(self, url: URL) -> None:
        key = (url.scheme, url.host, url.port)
        future = self._robots.get(key)
        if future is None:
            future = self._robots[key] = asyncio.ensure_future(self._robots_txt(url))
        parser = await asyncio.shield(future)
        if parser is not None and not parser.can_fetch(self.token or "*", str(url)):
            raise FetchError("opt_out", f"disallowed by {url.origin()}/robots.txt")

    async def _robots_txt(self, url: URL) -> RobotFileParser | None:
        """The host's robots.txt, under its own deadline (`timeout`): None allows everything.
        As RFC 9309 says: 4xx allows everything, 5xx disallows everything. A robots.txt that cannot be
        fetched at all allows everything: the image's own fetch then fails with its own reason."""
        robots_url = url.origin().with_path("/robots.txt")
        try:
            status, body = await asyncio.wait_for(self._attempt(robots_url, _Attempt(), robots=True),
                                                  self.timeout)
        except (FetchError, asyncio.TimeoutError, aiohttp.ClientError, OSError, BlockedAddress):
            return None
        parser = RobotFileParser(str(robots_url))
        if 400 <= status < 500:
            return None
        if status >= 500:
            parser.disallow_all = True
            return parser
        parser.parse(body.decode("utf-8", "replace").splitlines())
        return parser


# --- a shard ------------------------------------------------------------------------------------

class Scheduler:
    """Hands out URLs in row order, except that a host already at maxPerHost waits and the next URL of
    another host goes first; a waiting URL goes as soon as its host has room."""

    def __init__(self, keys: list, per_host: int):
        self.keys = keys
        self.per_host = per_host
        self.queue = deque(range(len(keys)))
        self.parked: dict = {}
        self.parked_total = 0
        self.ready: deque = deque()
        self.active: Counter = Counter()
        self.changed = asyncio.Condition()

    def _next(self) -> int | None:
        while self.ready:
            key = self.ready.popleft()
            waiting = self.parked.get(key)
            if waiting and self.active[key] < self.per_host:
                index = waiting.popleft()
                self.parked_total -= 1
                if not waiting:
                    del self.parked[key]
                self.active[key] += 1
                return index
        while self.queue:
            index = self.queue.popleft()
            key = self.keys[index]
            if key is None:
                return index
            if self.active[key] < self.per_host:
                self.active[key] += 1
                return index
            self.parked.setdefault(key, deque()).append(index)
            self.parked_total += 1
        return None

    async def take(self) -> int | None:
        """The next URL's index; None when every URL has been handed out."""
        async with self.changed:
            while True:
                index = self._next()
                if not self.parked_total and not self.queue:
                    self.changed.notify_all()  # nothing left to wait for: the idle workers end
                if index is not None or not self.parked_total:
                    return index
                await self.changed.wait()

    async def done(self, index: int) -> None:
        key = self.keys[index]
        if key is None:
            return
        async with self.changed:
            self.active[key] -= 1
            if key in self.parked:
                self.ready.append(key)
                self.changed.notify()


def host_key(url: str):
    try:
        parts = urlsplit(url)
        return (parts.hostname or "").lower(), parts.port
    except (ValueError, AttributeError, TypeError):
        return None


Handler = Callable[[int, "bytes | None", "FetchError | None"], None]


class Backlog:
    """Fetched bodies handed to the decode threads and not yet handled, bounded in bytes: a fetch slot
    with a body waits here while the queue is full (one body always fits, however large). The first
    handler error is kept, and ends the shard."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.space = asyncio.Event()
        self.handlers: set[asyncio.Future] = set()
        self.error: BaseException | None = None

    async def hand_over(self, size: int, run: Callable[[], "asyncio.Future"]) -> None:
        while self.held and self.held + size > self.limit and self.error is None:
            self.space.clear()
            await self.space.wait()
        if self.error is not None:
            raise self.error
        self.held += size
        handler = run()
        self.handlers.add(handler)
        handler.add_done_callback(lambda done: self._handled(done, size))

    def _handled(self, handler: asyncio.Future, size: int) -> None:
        self.handlers.discard(handler)
        self.held -= size
        if not handler.cancelled() and handler.exception() is not None and self.error is None:
            self.error = handler.exception()
        self.space.set()

    async def drain(self) -> None:
        """Wait for every handler; raise the first error (say, the writer's)."""
        if self.handlers:
            await asyncio.wait(list(self.handlers))
        if self.error is not None:
            raise self.error


async def fetch_all(urls: list[str], opts: Download, handle: Handler, threads: int) -> Engine:
    """Fetch every URL; `handle(index, body, error)` runs on one of `threads` threads, in completion
    order. Returns the engine, closed."""
    loop = asyncio.get_running_loop()
    # getaddrinfo runs on the loop's default executor: enough threads for the lookups in flight.
    loop.set_default_executor(ThreadPoolExecutor(min(max(opts.max_in_flight, 4), 64), thread_name_prefix="dns"))
    scheduler = Scheduler([host_key(u) for u in urls], opts.max_per_host)
    backlog = Backlog(DECODE_BACKLOG_BYTES)
    with ThreadPoolExecutor(max(threads, 1), thread_name_prefix="decode") as pool:
        async with Engine(opts) as engine:
            async def worker():
                while (index := await scheduler.take()) is not None:
                    if backlog.error is not None:
                        raise backlog.error
                    try:
                        data, error = await engine.fetch(urls[index]), None
                    except FetchError as err:
                        data, error = None, err
                    await scheduler.done(index)
                    await backlog.hand_over(len(data or b""), lambda: loop.run_in_executor(
                        pool, handle, index, data, error))

            tasks = [asyncio.ensure_future(worker()) for _ in range(min(opts.max_in_flight, len(urls)))]
            try:
                if tasks:
                    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    for task in done:
                        task.result()
                await backlog.drain()
            finally:
                for handler in backlog.handlers:  # an error: the queued bodies are not handled
                    handler.cancel()
    return engine


def run(urls: list[str], opts: Download, handle: Handler, threads: int) -> Engine:
    """`fetch_all` on a new event loop in this thread (a shard task's)."""
    return asyncio.run(fetch_all(urls, opts, handle, threads))
