"""The fake web (`laion_operator.testbed.fakeweb`) with the rarer failures only the tests and the
benchmarks ask for, and the outcome a client sees for any URL of it (`outcome_of`):

    /drip/<seconds>/<spec>        200 with the full Content-Length at once, then the image one byte every
                                  <seconds> (at most 30)
    /big/<bytes>/<anything>       200 image/jpeg, Content-Length <bytes>: a JPEG start, then zeros, generated
                                  as it is sent (never held in memory)
    /bigstream/<bytes>/<anything> the same without Content-Length: the body ends when the connection closes
    /hops/<n>/<spec>              302 to /hops/<n-1>/<spec>; /hops/0/<spec> serves /img/<spec> (n at most 50)
    /loop/<anything>              302 to itself
    /to/<url>                     302 to <url>, percent-decoded (any scheme, any host)
    /retry/<code>/<after>/<n>/<spec>  the first <n> requests for this path get <code> (429 or 503) with
                                  `Retry-After: <after>` (`-`: no Retry-After), later ones /img/<spec>
    /bomb/<id>_<w>x<h>.<fmt>      a file of a few dozen bytes whose header declares w x h pixels
                                  (fmt jpg|png|gif|webp; sides up to 65535, WebP's up to 16384)
    /steady/<rate>/<bytes>/<spec> the image padded with zeros to <bytes> (Content-Length says so), sent
                                  slowly but steadily at <rate> bytes a second: a large image on a slow link
    /tdm/<0|1>/<spec>             the image with `tdm-reservation: <0|1>` (TDMRep)
    /xrobots/<value>/<spec>       the image with `X-Robots-Tag: <value>` (percent-decoded)
    /busy/<seconds>/<spec>        the image after <seconds>, its requests at once counted (`busy`: a
                                  host's politeness measured); while the server is `pushing_back`, 429
                                  with `Retry-After: <retry_after>` at once instead

Hosts that fail before HTTP: `refused_address()` names a loopback port nothing listens on, and
`Silent` is a listening socket that never accepts or answers.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from typing import Any
from urllib.parse import unquote, urlsplit

from laion_operator.testbed import fakeweb
from laion_operator.testbed.fakeweb import CONTENT_TYPES, MAX_SLOW_SECONDS, Route, Spec, image_of, spec_route

MAX_BIG_BYTES = 1 << 40
MAX_HOPS = 50
_BOMB_RE = re.compile(r"^([A-Za-z0-9-]+)_(\d{1,5})x(\d{1,5})\.(jpg|png|gif|webp)$")
BOMB_MAX_SIDE = {"jpg": 65535, "png": 65535, "gif": 65535, "webp": 16384}
DIRECTIVES = {"noai", "noimageai", "noml", "noindex", "noimageindex"}  # disallowedHeaderDirectives' default


def route(path: str) -> Route:
    """What the server does for `path`: the demo's routes (`fakeweb.route`) and these."""
    parts = path.lstrip("/").split("/", 1)
    head, rest = parts[0], parts[1] if len(parts) > 1 else ""
    if head in ("drip", "big", "bigstream", "hops"):
        number, _, inner = rest.partition("/")
        try:
            value = float(number) if head == "drip" else int(number)
        except ValueError:
            return Route("status", status=400)
        if head == "drip":
            if not 0 <= value <= MAX_SLOW_SECONDS:
                return Route("status", status=400)
            inner_route = spec_route("drip", inner)
            return inner_route._replace(seconds=value) if inner_route.kind == "drip" else inner_route
        if head == "hops":
            if not 0 <= value <= MAX_HOPS:
                return Route("status", status=400)
            inner_route = spec_route("hops", inner)
            return inner_route._replace(count=int(value)) if inner_route.kind == "hops" else inner_route
        if not 16 <= value <= MAX_BIG_BYTES:
            return Route("status", status=400)
        return Route(head, count=int(value))
    if head in ("steady", "tdm", "xrobots"):
        return _header_or_pace_route(head, rest)
    if head == "busy":
        slow = fakeweb.route(f"/slow/{rest}")
        return slow._replace(kind="busy") if slow.kind == "slow" else slow
    if head == "loop":
        return Route("loop")
    if head == "to":
        return Route("to", target=unquote(rest)) if rest else Route("status", status=400)
    if head == "retry":
        fields = rest.split("/", 3)
        if len(fields) != 4 or fields[0] not in ("429", "503") or not fields[2].isdigit():
            return Route("status", status=400)
        if fields[1] != "-" and not fields[1].isdigit():
            return Route("status", status=400)
        inner_route = spec_route("retry", fields[3])
        if inner_route.kind != "retry":
            return inner_route
        return inner_route._replace(
            status=int(fields[0]), count=int(fields[2]), retry_after=None if fields[1] == "-" else fields[1]
        )
    if head == "bomb":
        m = _BOMB_RE.match(rest)
        if not m or not (
            1 <= int(m.group(2)) <= BOMB_MAX_SIDE[m.group(4)] and 1 <= int(m.group(3)) <= BOMB_MAX_SIDE[m.group(4)]
        ):
            return Route("status", status=404 if not m else 400)
        return Route("bomb", Spec(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)))
    return fakeweb.route(path)


def _header_or_pace_route(head: str, rest: str) -> Route:
    fields = rest.split("/")
    inner = spec_route(head, fields[-1])
    if inner.kind != head:
        return inner
    if head == "steady":  # seconds: the rate, in bytes a second; count: the body's bytes
        if len(fields) != 3 or not fields[0].isdigit() or not fields[1].isdigit() or int(fields[0]) < 1:
            return Route("status", status=400)
        return inner._replace(seconds=float(fields[0]), count=min(int(fields[1]), MAX_BIG_BYTES))
    if len(fields) != 2 or (head == "tdm" and fields[0] not in ("0", "1")):
        return Route("status", status=400)
    return inner._replace(target=unquote(fields[0]))


def outcome_of(
    url: str,
    timeout: float = 10,
    min_image_size: int = 0,
    max_aspect_ratio: float | None = None,
    max_redirects: int = 5,
    max_image_bytes: int = 32 << 20,
    max_image_pixels: int = 89_478_485,
    retries: int = 0,
    min_body_rate: float = 16384,
) -> str:
    """The outcome a client with these settings sees for `url` (the project's defaults where unset).

    One of ok, http_4xx, http_5xx, timeout, decode, opt_out, too_small, aspect_ratio, connection,
    redirect, too_large, rate_limited, bad_url.
    Checks run in img2dataset's order: headers (opt-out), body, then size, then aspect ratio.
    A /slow/ delay within a few tenths of a second of `timeout` is a race; keep a margin, and so for
    /retry/'s total wait against the URL's (retries + 1) x timeout. /to/ is the outcome of its target
    (on this server's routes); the client's address guard is not modelled.
    """
    settings: dict[str, Any] = dict(
        timeout=timeout,
        min_image_size=min_image_size,
        max_aspect_ratio=max_aspect_ratio,
        max_redirects=max_redirects,
        max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels,
        retries=retries,
    )
    if urlsplit(url).scheme not in ("http", "https"):
        return "bad_url"
    r = route(urlsplit(url).path)
    if r.kind == "to":
        if max_redirects < 1:
            return "redirect"
        return outcome_of(r.target, **{**settings, "max_redirects": max_redirects - 1})
    if r.kind == "loop" or (r.kind == "hops" and r.count > max_redirects):
        return "redirect"
    if r.kind == "drip":
        return "timeout" if r.seconds > 0 else "ok"
    if r.kind in ("big", "bigstream"):
        return "too_large" if r.count > max_image_bytes else "decode"
    if r.kind == "bomb":
        return "too_large" if r.spec.width * r.spec.height > max_image_pixels else "decode"
    if r.kind == "retry":
        if r.retry_after is None and r.status == 503:
            return "http_5xx"
        waits = (
            [float(r.retry_after)] * r.count
            if r.retry_after is not None
            else [min(2.0**i, 60.0) for i in range(r.count)]
        )
        if sum(waits) + min(timeout, 1.0) > (retries + 1) * timeout:
            return "rate_limited"
    if r.kind == "status":
        return "http_4xx" if r.status < 500 else "http_5xx"
    if r.kind == "reset":
        return "connection"
    if r.kind in ("slow", "busy") and r.seconds > timeout:
        return "timeout"
    if r.kind == "noai" or (r.kind == "tdm" and r.target == "1"):
        return "opt_out"
    if r.kind == "xrobots":  # "<agent>: <directives>" speaks to that agent only (img2dataset: the default token)
        agent, _, rules = r.target.rpartition(":")
        if agent.strip() in ("", "img2dataset") and {d.strip() for d in rules.split(",")} & DIRECTIVES:
            return "opt_out"
    if r.kind == "steady" and (max(r.count, 0) > max_image_bytes or r.seconds < min_body_rate):
        return "too_large" if r.count > max_image_bytes else "timeout"
    if r.kind in ("truncated", "garbage"):
        return "decode"
    w, h = r.spec.width, r.spec.height
    if min(w, h) < min_image_size:
        return "too_small"
    if max_aspect_ratio is not None and max(w, h) / min(w, h) > max_aspect_ratio:
        return "aspect_ratio"
    return "ok"


def big_chunks(total: int, chunk: int = 1 << 16):
    """`total` bytes of a JPEG that never ends (a start, then zeros), made as they are sent."""
    head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    zeros = bytes(chunk)
    yield head[:total]
    left = total - len(head)
    while left > 0:
        yield zeros[: min(left, chunk)]
        left -= chunk


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_body(spec: Spec) -> bytes:
    """A few dozen bytes whose image header declares spec.width x spec.height pixels (no pixel data)."""
    w, h = spec.width, spec.height
    if spec.fmt == "jpg":
        sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
        return b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + sof + b"\xff\xd9"
    if spec.fmt == "png":
        return (
            b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IEND", b"")
        )
    if spec.fmt == "gif":
        return b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b";"
    vp8x = (
        b"VP8X"
        + struct.pack("<I", 10)
        + b"\x00\x00\x00\x00"
        + (w - 1).to_bytes(3, "little")
        + (h - 1).to_bytes(3, "little")
    )
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


class Handler(fakeweb.Handler):
    def serve_more(self, r: Route, path: str, body: bool) -> Route | None:
        app = self.server.app
        assert isinstance(app, ImageServer)
        if r.kind in ("loop", "to") or (r.kind == "hops" and r.count > 0):
            if r.kind == "hops":
                s = image_of(r)
                self.redirect(f"/hops/{r.count - 1}/{s.id}_{s.width}x{s.height}.{s.fmt}")
            else:
                self.redirect(path if r.kind == "loop" else r.target)
            return None
        if r.kind == "hops":
            return Route("img", r.spec)
        if r.kind == "retry":
            if not app.refuse(path, r.count):
                return Route("img", r.spec)
            self.send_response(r.status)
            if r.retry_after is not None:
                self.send_header("Retry-After", r.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if r.kind == "bomb":
            s = image_of(r)
            self._send(200, bomb_body(s), "image/" + ("jpeg" if s.fmt == "jpg" else s.fmt), body)
            return None
        if r.kind in ("big", "bigstream"):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if r.kind == "big":
                self.send_header("Content-Length", str(r.count))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if body:
                for chunk in big_chunks(r.count):
                    if app.stopping.is_set():
                        break
                    self.wfile.write(chunk)
                    app.sent(r.kind, len(chunk))
            self.close_connection = True
            return None
        if r.kind in ("tdm", "xrobots"):
            s = image_of(r)
            header = "tdm-reservation" if r.kind == "tdm" else "X-Robots-Tag"
            self._send(200, app.cache.get(s), CONTENT_TYPES[s.fmt], body, {header: r.target})
            return None
        if r.kind == "steady":
            self._steady(r, body)
            return None
        if r.kind == "busy":
            self._busy(r, body)
            return None
        if r.kind == "drip":
            s = image_of(r)
            data = app.cache.get(s)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPES[s.fmt])
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                for i in range(len(data)):
                    if app.stopping.wait(r.seconds):
                        break
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
            self.close_connection = True
            return None
        return r

    def _busy(self, r: Route, body: bool) -> None:
        app = self.server.app
        if app.pushing_back:
            app.busy.refused += 1
            self.send_response(429)
            self.send_header("Retry-After", str(app.retry_after))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        app.busy.enter()
        try:
            app.stopping.wait(r.seconds)
            s = image_of(r)
            self._send(200, app.cache.get(s), CONTENT_TYPES[s.fmt], body)
        finally:
            app.busy.leave()

    def _steady(self, r: Route, body: bool) -> None:
        s = image_of(r)
        data = self.server.app.cache.get(s)
        data += bytes(max(r.count - len(data), 0))
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPES[s.fmt])
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        step = max(int(r.seconds / 10), 1)  # a tenth of a second's bytes at a time
        for start in range(0, len(data) if body else 0, step):
            self.wfile.write(data[start : start + step])
            self.wfile.flush()
            if self.server.app.stopping.wait(step / r.seconds):
                break
        self.close_connection = True


class KeepAliveHandler(Handler):
    protocol_version = "HTTP/1.1"


class Concurrency:
    """A host's /busy/ requests being served at once: now, at most, and after every arrival with its
    time (monotonic), so that a test can compare stretches of a run."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.served = 0
        self.refused = 0  # 429s sent while pushing back
        self.samples: list[tuple[float, int]] = []

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.samples.append((time.monotonic(), self.now))

    def leave(self) -> None:
        with self.lock:
            self.now -= 1
            self.served += 1

    def peak_between(self, start: float, end: float) -> int:
        with self.lock:
            return max((n for t, n in self.samples if start <= t < end), default=0)


class ImageServer(fakeweb.ImageServer):
    """The fake web with every route above as well as the demo's."""

    route = staticmethod(route)
    handlers = (Handler, KeepAliveHandler)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bytes_sent: Counter[str] = Counter()  # bytes of /big/ and /bigstream/ bodies sent
        self._refused: Counter[str] = Counter()  # /retry/ paths: refusals so far
        self._counts_lock = threading.Lock()
        self.busy = Concurrency()
        self.pushing_back = False  # /busy/ answers 429 while set
        self.retry_after = 1

    def sent(self, kind: str, n: int):
        with self._counts_lock:
            self.bytes_sent[kind] += n

    def refuse(self, path: str, times: int) -> bool:
        """Whether this request for a /retry/ path is still one of its first `times`."""
        with self._counts_lock:
            self._refused[path] += 1
            return self._refused[path] <= times


def refused_address(host: str = "127.0.0.1") -> str:
    """host:port where nothing listens (a port just bound and released): connections are refused."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    return f"{host}:{port}"


class Silent:
    """A host that never answers: a listening socket that never accepts, so connections open (the
    kernel completes the handshake) and requests go unanswered. A context manager."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.sock: socket.socket | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> Silent:
        self.sock = socket.socket()
        self.sock.bind((self.host, 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        return self

    def __exit__(self, *exc):
        self.sock.close()
