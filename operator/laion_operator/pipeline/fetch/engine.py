"""The per-URL engine: one aiohttp session of a shard task, what it knows of each host (answers, a dead
host, Retry-After), attempts under their deadlines with the phase each one reached, redirects checked
hop by hop, bodies read under the size and pixel caps and their pace, robots.txt and tdmrep.json once per
host."""

from __future__ import annotations

import asyncio
import email.utils
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from ... import __version__
from ...spec import Download
from ..image_header import declared_pixels, header_size
from . import tdmrep
from .budget import TaskLimits, per_task
from .errors import FINAL, FetchError, RetryLater, classify, message_of
from .guard import AddressGuard, GuardedResolver, is_ip, make_resolver
from .pace import Pace, body_limit
from .robots import ROBOTS_MAX_BYTES, robots_parser, robots_tag_disallows
from .tdmrep import TDMREP_MAX_BYTES, TDMREP_PATH, header_reserves

SCHEMES = ("http", "https")
REDIRECTS = (301, 302, 303, 307, 308)
DEAD_AFTER = 3  # connections in a row refused or unanswered, with no answer since, before a host is dead
HEADER_PROBE_BYTES = 256 << 10  # while reading, look for the image's declared size in this much
MAX_BACKOFF = 60.0  # a 429 without Retry-After waits 1, 2, 4 … seconds, at most this
if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # a dependency of aiohttp's there
    from async_timeout import timeout

# Where a site's owner learns what the crawler is and how to opt out (img2dataset #296, #436, #459:
# name yourself, impersonate no browser and no other crawler).
PROJECT_URL = "https://laion-operator.io"


def user_agent(opts: Download) -> str:
    """The User-Agent header a download sends: `userAgent`, else the project, its URL and the token."""
    token = opts.user_agent_token.strip().lower() if opts.user_agent_token else ""
    return opts.user_agent or f"laion-operator/{__version__} (+{PROJECT_URL}" + (
        f"; compatible; {token})" if token else ")"
    )


@dataclass
class Host:
    """What a task knows of one host (name and port)."""

    key: str = ""  # host:port, as the host budget names it
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
    deadline: Any = None  # the attempt's `timeout`; the image's body moves it (`Pace`)
    started: float = 0.0  # loop time the attempt began: its body's pace counts from here
    body_limit: float = 0.0  # seconds the attempt was given once the image's headers came


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


def retry_after(value: str | None, now: float) -> float | None:
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


class Engine:
    """Fetches URLs with one aiohttp session; use `async with Engine(opts) as e: await e.fetch(url)`."""

    def __init__(self, opts: Download, limits: TaskLimits | None = None):
        self.opts = opts
        # The host budget's side of a host: its shared Retry-After, and where its slow-downs are told.
        self.limits = limits or TaskLimits(opts)
        self.slow_downs = 0  # answers that asked to slow down (429, 503 with Retry-After)
        self.timeout = float(opts.timeout)
        self.retries = opts.retries
        self.budget = (opts.retries + 1) * self.timeout  # the attempts' deadlines to their headers
        self.min_rate = float(opts.min_body_rate)
        self.token = opts.user_agent_token.strip().lower() if opts.user_agent_token else None
        self.directives = {d.strip().lower() for d in opts.disallowed_header_directives} or None
        agent = user_agent(opts)
        # identity: the bytes the server stores are the bytes hashed and decoded, as with urllib.
        self.headers = {"User-Agent": agent, "Accept-Encoding": "identity"}
        self.guard = AddressGuard(opts.allowed_networks or ())
        self.hosts: dict[tuple[str, int], Host] = {}
        self._robots: dict[tuple, asyncio.Future] = {}
        self._tdmrep: dict[tuple, asyncio.Future] = {}
        self.session: aiohttp.ClientSession | None = None
        self.resolver: GuardedResolver | None = None

    async def __aenter__(self) -> Engine:
        self.loop = asyncio.get_running_loop()
        self.resolver = make_resolver(self.opts.dns_servers or (), self.guard)
        connector = aiohttp.TCPConnector(
            limit=max(self.opts.max_in_flight * 2, 16),
            limit_per_host=per_task(self.opts),
            resolver=self.resolver,
            use_dns_cache=False,  # the resolver caches, with the guard after it
            ssl=True if self.opts.verify_tls else False,
            keepalive_timeout=30,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers=self.headers,
            auto_decompress=False,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
            trace_configs=[_tracing()],
            max_line_size=65536,
            max_field_size=65536,
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()

    @property
    def client(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("the engine fetches inside `async with Engine(opts)` only")
        return self.session

    def host(self, url: URL) -> Host:
        key = (url.host or "", url.port or 0)
        state = self.hosts.get(key)
        if state is None:
            state = self.hosts[key] = Host(key=f"{(url.host or '').lower()}:{url.port or 0}")
        return state

    def check_url(self, url: URL) -> None:
        """Raise FetchError for a URL that must not be fetched, before any I/O."""
        if url.scheme not in SCHEMES:
            raise FetchError("bad_url", f"not an http(s) URL: {str(url)[:200]}")
        if not url.host:
            raise FetchError("bad_url", f"no host in URL: {str(url)[:200]}")
        if is_ip(url.host) and not self.guard.allows(url.host):
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
        # The site's TDM rules come beside its first image rather than before it, hiding their latency.
        tdm = self._site_file(self._tdmrep, url, TDMREP_PATH) if self.opts.respect_tdm_rep else None
        if tdm is not None and tdm.done():
            self._check_tdmrep(url, tdm.result())
        body = await self._attempts(url, budget_end)
        if tdm is not None:
            self._check_tdmrep(url, await asyncio.shield(tdm))
        return body

    async def _attempts(self, url: URL, budget_end: float) -> bytes:
        """1 + `retries` attempts and the waits rate limits ask for, within the URL's budget."""
        failures, rate_limits = 0, 0
        while True:
            host = self.host(url)
            if host.dead:
                raise FetchError(
                    "connection",
                    f"{url.host}: host not answering ({DEAD_AFTER} connections in a "
                    "row refused or timed out); not tried again in this shard",
                )
            now = self.loop.time()
            not_before = max(host.not_before, self.limits.not_before(host.key))
            if not_before > now:
                if not_before + self._least_attempt() > budget_end:
                    raise FetchError("rate_limited", f"{url.host} asked to wait past this URL's time budget")
                await asyncio.sleep(not_before - now)
                now = self.loop.time()
            remaining = budget_end - now
            attempt = _Attempt(started=now)
            try:
                # To its headers an attempt has `timeout`; its body then reschedules this for its pace.
                async with timeout(min(self.timeout, remaining)) as attempt.deadline:
                    return await self._attempt(url, attempt)
            except RetryLater as later:
                rate_limits += 1
                self.slow_downs += 1
                wait = later.wait if later.wait is not None else min(2.0 ** (rate_limits - 1), MAX_BACKOFF)
                until = self.loop.time() + wait
                if attempt.host is not None:
                    attempt.host.not_before = max(attempt.host.not_before, until)
                    self.limits.slowed(attempt.host.key, wait)
                if until + self._least_attempt() > budget_end:
                    raise FetchError(
                        "rate_limited",
                        f"{later}; waiting {wait:g} s more is past this URL's time budget of {self.budget:g} s",
                    ) from None
                await asyncio.sleep(wait)
                continue
            except FetchError as err:
                error = err
            except asyncio.TimeoutError:
                error = FetchError(
                    "dns" if attempt.phase == "dns" else "timeout",
                    f"body not whole within {attempt.body_limit:g} s of its request (timeout + "
                    "size / download.minBodyRate)"
                    if attempt.body_limit
                    else f"no {'DNS answer' if attempt.phase == 'dns' else 'answer'} "
                    f"within {min(self.timeout, remaining):g} s ({attempt.phase})",
                )
                if attempt.phase in ("connect", "request", "headers") and attempt.host is not None:
                    attempt.host.failed(attempt.hop_started)
            except Exception as err:  # noqa: BLE001 - every network failure is a sample's failure, not the shard's
                error = FetchError(classify(err, attempt.phase), message_of(err))
                if (
                    isinstance(err, aiohttp.ClientConnectorError)
                    and error.reason == "connection"
                    and attempt.host is not None
                ):
                    attempt.host.failed(attempt.hop_started)
            failures += 1
            if error.reason in FINAL or failures > self.retries or self.loop.time() >= budget_end:
                raise error

    def _least_attempt(self) -> float:
        """The least time worth starting an attempt with after waiting for a rate limit."""
        return min(self.timeout, 1.0)

    async def _attempt(self, url: URL, attempt: _Attempt, site_file: int = 0):
        """One attempt: follow redirects, check every hop, read the body under the caps. For a site's
        file (robots.txt, tdmrep.json), (status, body) of at most `site_file` bytes instead of raising
        for an HTTP status."""
        seen = {str(url)}
        hops = 0
        while True:
            self.check_url(url)
            host = self.host(url)
            if host.dead and not site_file:
                raise FetchError("connection", f"{url.host}: host not answering (redirect target)")
            attempt.host, attempt.hop_started, attempt.phase = host, self.loop.time(), "queued"
            async with self.client.get(url, allow_redirects=False, trace_request_ctx=attempt) as resp:
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
                if site_file:
                    if resp.status != 200:
                        await self._drain(resp)
                        return resp.status, b""
                    return resp.status, await self._read(resp, site_file, truncate=True)
                if resp.status == 429 or (resp.status == 503 and "Retry-After" in resp.headers):
                    wait = retry_after(resp.headers.get("Retry-After"), self.loop.time())
                    if resp.status == 503 and wait is None:
                        raise FetchError("http_5xx", f"HTTP 503 {resp.reason or ''}".strip())
                    raise RetryLater(wait, f"HTTP {resp.status} from {url.host}")
                self.limits.answered(host.key)
                if resp.status >= 400:
                    await self._drain(resp)
                    reason = "http_4xx" if resp.status < 500 else "http_5xx"
                    raise FetchError(reason, f"HTTP Error {resp.status}: {resp.reason or ''}".strip())
                if resp.status >= 300 or resp.status < 200:
                    raise FetchError("other", f"HTTP {resp.status} {resp.reason or ''}".strip())
                if self.directives and robots_tag_disallows(
                    resp.headers.getall("X-Robots-Tag", ()), self.token or "", self.directives
                ):
                    raise FetchError(
                        "opt_out", "Use of image disallowed by X-Robots-Tag directive", rule="x_robots_tag"
                    )
                if self.opts.respect_tdm_rep and header_reserves(resp.headers):
                    raise FetchError("opt_out", "TDM rights reserved (tdm-reservation: 1)", rule="tdm_reservation")
                return await self._read(resp, self.opts.max_image_bytes, pace=self._pace(resp, attempt))

    def _pace(self, resp: aiohttp.ClientResponse, attempt: _Attempt) -> Pace | None:
        """The image body's own bound, counted from the attempt's start as `timeout` was: the attempt's
        deadline moved to `body_limit`, and the window's first `timeout` seconds are those before."""
        if attempt.deadline is None:
            return None
        size = min(resp.content_length or self.opts.max_image_bytes, self.opts.max_image_bytes)
        attempt.body_limit = body_limit(self.timeout, size, self.min_rate)
        attempt.deadline.reschedule(attempt.started + attempt.body_limit)
        return Pace(self.min_rate, self.timeout, attempt.started)

    async def _read(
        self, resp: aiohttp.ClientResponse, limit: int, truncate: bool = False, pace: Pace | None = None
    ) -> bytes:
        if resp.content_length is not None and resp.content_length > limit and not truncate:
            raise FetchError(
                "too_large", f"Content-Length {resp.content_length} is over download.maxImageBytes ({limit})"
            )
        chunks: list[bytes] = []
        size = 0
        probing = not truncate  # looking for the image's declared size in what has come so far
        while True:
            chunk = await (self._paced(resp, pace) if pace else resp.content.readany())
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                if truncate:
                    chunks.append(chunk[: len(chunk) - (size - limit)])
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

    async def _paced(self, resp: aiohttp.ClientResponse, pace: Pace) -> bytes:
        """The next chunk, failing as `timeout` once the last window brought less than its due."""
        try:
            # The body's overall limit is the attempt's deadline: it cancels this read, and the
            # attempt reports it.
            chunk = await asyncio.wait_for(resp.content.readany(), max(pace.deadline - self.loop.time(), 0))
        except asyncio.TimeoutError:
            raise FetchError(
                "timeout",
                f"body slower than download.minBodyRate ({self.min_rate:g} B/s): under "
                f"{pace.need:g} bytes in {pace.window:g} s, {pace.total} bytes so far",
            ) from None
        pace.add(self.loop.time(), len(chunk))
        return chunk

    def _check_pixels(self, pixels: int) -> None:
        if pixels > self.opts.max_image_pixels:
            raise FetchError(
                "too_large",
                f"image declares {pixels} pixels, over download.maxImagePixels ({self.opts.max_image_pixels})",
            )

    @staticmethod
    async def _drain(resp: aiohttp.ClientResponse) -> None:
        """Read a small error or redirect body so that its connection can be reused."""
        if resp.content_length is not None and resp.content_length <= 65536:
            try:
                await resp.read()
            except aiohttp.ClientError:
                pass

    def _site_file(self, cache: dict[tuple, asyncio.Future], url: URL, path: str) -> asyncio.Future:
        """The parsed file at `path` on `url`'s site, fetched once per task (the first URL starts it)."""
        key = (url.scheme, url.host, url.port)
        future = cache.get(key)
        if future is None:
            future = cache[key] = asyncio.ensure_future(self._fetch_site_file(url.origin().with_path(path)))
        return future

    async def _fetch_site_file(self, file_url: URL):
        """robots.txt's rules (RobotFileParser) or tdmrep.json's (tdmrep.Rules), under their own deadline
        (`timeout`) and size; None allows everything. A file that cannot be fetched at all allows
        everything: the image's own fetch then fails with its own reason."""
        robots = file_url.path == "/robots.txt"
        limit = ROBOTS_MAX_BYTES if robots else TDMREP_MAX_BYTES
        try:
            status, body = await asyncio.wait_for(self._attempt(file_url, _Attempt(), site_file=limit), self.timeout)
        except Exception:  # noqa: BLE001 - whatever failed, the file said nothing; the image's fetch tells
            return None
        return robots_parser(str(file_url), status, body) if robots else tdmrep.parse(status, body)

    async def _check_robots(self, url: URL) -> None:
        parser = await asyncio.shield(self._site_file(self._robots, url, "/robots.txt"))
        if parser is not None and not parser.can_fetch(self.token or "*", str(url)):
            raise FetchError("opt_out", f"disallowed by {url.origin()}/robots.txt", rule="robots_txt")

    def _check_tdmrep(self, url: URL, rules: tdmrep.Rules | None) -> None:
        rule = rules.reserving(url.raw_path_qs) if rules is not None else None
        if rule is not None:
            raise FetchError(
                "opt_out",
                f"TDM rights reserved by {url.origin()}{TDMREP_PATH} (location {rule.location!r})",
                rule="tdmrep_json",
            )
