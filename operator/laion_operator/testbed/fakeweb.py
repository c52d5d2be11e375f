"""A loopback HTTP server that fails the way the internet does for LAION URLs.

Every URL's outcome is known from the URL alone (`outcome_of`), so tests can compute what a
download run must report without a real network:

    /img/<id>_<w>x<h>.<fmt>       200, a generated image (fmt jpg|jpeg|png|webp); /small/ is an alias
    /redirect/<id>_<w>x<h>.<fmt>  302 to the /img/ equivalent
    /noai/<id>_<w>x<h>.<fmt>      200 image with `X-Robots-Tag: noai, noimageai`
    /truncated/<id>_<w>x<h>.<fmt> full Content-Length, half the bytes, then the connection closes
    /garbage/<anything>           200 image/jpeg whose body is an HTML page
    /status/<code>/<anything>     that status (400-599 only)
    /slow/<seconds>/<spec>        waits (at most 30 s) before serving /img/<spec> (or a 256x256 jpg)
    /reset/<anything>             closes the connection without answering
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
    anything else                 404

`ImageServer(robots=...)` serves a /robots.txt (or an error status for it), `tls=` serves https.
Hosts that fail before HTTP: `refused_address()` names a loopback port nothing listens on, and
`Silent` is a listening socket that never accepts or answers. `ImageServer(keep_alive=True)` speaks
HTTP/1.1 with persistent connections (counted in `connections`), for clients that reuse them.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import socket
import ssl
import struct
import threading
import zlib
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image, ImageChops, ImageDraw

MAX_SLOW_SECONDS = 30.0
MAX_BIG_BYTES = 1 << 40
MAX_HOPS = 50
MAX_SIDE = 8192
MAX_PIXELS = 40_000_000
CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

_SPEC_RE = re.compile(r"^([A-Za-z0-9-]+)_(\d{1,6})x(\d{1,6})\.(jpg|jpeg|png|webp)$")


class Spec(NamedTuple):
    id: str
    width: int
    height: int
    fmt: str


class Route(NamedTuple):
    kind: str  # img redirect noai truncated garbage status slow reset drip big bigstream hops loop to retry bomb
    spec: Spec | None = None
    status: int = 200
    seconds: float = 0.0
    count: int = 0  # type: ignore[assignment]  # shadows tuple.count; big: bytes, hops: redirects to go, retry: refusals
    target: str = ""  # to: where it redirects
    retry_after: str | None = None


_BOMB_RE = re.compile(r"^([A-Za-z0-9-]+)_(\d{1,5})x(\d{1,5})\.(jpg|png|gif|webp)$")
BOMB_MAX_SIDE = {"jpg": 65535, "png": 65535, "gif": 65535, "webp": 16384}


DEFAULT_SLOW_SPEC = Spec("slow", 256, 256, "jpg")


def parse_spec(text: str) -> Spec | None:
    m = _SPEC_RE.match(text)
    if not m:
        return None
    return Spec(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))


def _spec_route(kind: str, rest: str) -> Route:
    spec = parse_spec(rest)
    if spec is None:
        return Route("status", status=404)
    if not (1 <= spec.width <= MAX_SIDE and 1 <= spec.height <= MAX_SIDE) or spec.width * spec.height > MAX_PIXELS:
        return Route("status", status=400)
    return Route(kind, spec)


def route(path: str) -> Route:
    """What the server does for `path`; shared by the handler and `outcome_of` so they cannot disagree."""
    parts = path.lstrip("/").split("/", 1)
    head, rest = parts[0], parts[1] if len(parts) > 1 else ""
    if head in ("img", "small"):
        return _spec_route("img", rest)
    if head in ("redirect", "noai", "truncated"):
        return _spec_route(head, rest)
    if head == "garbage":
        return Route("garbage")
    if head == "reset":
        return Route("reset")
    if head == "status":
        code = rest.split("/", 1)[0]
        if code.isdigit() and 400 <= int(code) <= 599:
            return Route("status", status=int(code))
        return Route("status", status=400)
    if head in ("drip", "big", "bigstream", "hops"):
        number, _, inner = rest.partition("/")
        try:
            value = float(number) if head == "drip" else int(number)
        except ValueError:
            return Route("status", status=400)
        if head == "drip":
            if not 0 <= value <= MAX_SLOW_SECONDS:
                return Route("status", status=400)
            inner_route = _spec_route("drip", inner)
            return inner_route._replace(seconds=value) if inner_route.kind == "drip" else inner_route
        if head == "hops":
            if not 0 <= value <= MAX_HOPS:
                return Route("status", status=400)
            inner_route = _spec_route("hops", inner)
            return inner_route._replace(count=int(value)) if inner_route.kind == "hops" else inner_route
        if not 16 <= value <= MAX_BIG_BYTES:
            return Route("status", status=400)
        return Route(head, count=int(value))
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
        inner_route = _spec_route("retry", fields[3])
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
    if head == "slow":
        secs, _, inner = rest.partition("/")
        try:
            seconds = min(max(float(secs), 0.0), MAX_SLOW_SECONDS)
        except ValueError:
            return Route("status", status=400)
        if seconds != seconds:  # NaN
            return Route("status", status=400)
        inner_route = _spec_route("img", inner) if parse_spec(inner) else Route("img", DEFAULT_SLOW_SPEC)
        if inner_route.kind != "img":
            return inner_route
        return Route("slow", inner_route.spec, seconds=seconds)
    return Route("status", status=404)


def outcome_of(
    url: str,
    timeout: float = 10,
    min_image_size: int = 0,
    max_aspect_ratio: float | None = None,
    max_redirects: int = 5,
    max_image_bytes: int = 32 << 20,
    max_image_pixels: int = 89_478_485,
    retries: int = 0,
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
    if r.kind == "slow" and r.seconds > timeout:
        return "timeout"
    if r.kind == "noai":
        return "opt_out"
    if r.kind in ("truncated", "garbage"):
        return "decode"
    w, h = r.spec.width, r.spec.height
    if min(w, h) < min_image_size:
        return "too_small"
    if max_aspect_ratio is not None and max(w, h) / min(w, h) > max_aspect_ratio:
        return "aspect_ratio"
    return "ok"


# --- image generation -------------------------------------------------------------------------

_NOISE_SIDE = 2048
_noise: Image.Image | None = None
_noise_lock = threading.Lock()


def _noise_tile() -> Image.Image:
    global _noise
    with _noise_lock:
        if _noise is None:
            rng = np.random.default_rng(0x1A10)
            _noise = Image.fromarray(rng.integers(0, 17, (_NOISE_SIDE, _NOISE_SIDE, 3), dtype=np.uint8), "RGB")
        return _noise


def _noise_for(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    tile = _noise_tile()
    if w <= _NOISE_SIDE and h <= _NOISE_SIDE:
        ox = int(rng.integers(0, _NOISE_SIDE - w + 1))
        oy = int(rng.integers(0, _NOISE_SIDE - h + 1))
        return tile.crop((ox, oy, ox + w, oy + h))
    big = Image.new("RGB", (w, h))
    for y in range(0, h, _NOISE_SIDE):
        for x in range(0, w, _NOISE_SIDE):
            big.paste(tile, (x, y))
    return big


def render(spec: Spec) -> Image.Image:
    """A deterministic picture for `spec`: smooth colour field, a few shapes and sensor-like noise.

    The noise keeps JPEG sizes photo-like (~140 KB at 1024x768); PNGs get none because on the web
    they are mostly flat graphics, and noisy PNGs would make benchmarks measure zlib.
    """
    w, h = spec.width, spec.height
    rng = np.random.default_rng(zlib.crc32(spec.id.encode()))
    grid = rng.integers(0, 256, (int(rng.integers(2, 5)), int(rng.integers(2, 5)), 3), dtype=np.uint8)
    img = Image.fromarray(grid, "RGB").resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=fill)
    if spec.fmt == "png":
        return img
    return ImageChops.add(img, _noise_for(w, h, rng), 1.0, -8)


def encode(spec: Spec) -> bytes:
    img = render(spec)
    buf = io.BytesIO()
    if spec.fmt in ("jpg", "jpeg"):
        img.save(buf, "JPEG", quality=90)
    elif spec.fmt == "png":
        img.save(buf, "PNG", compress_level=1)
    else:
        img.save(buf, "WEBP", quality=80, method=0)
    return buf.getvalue()


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


class ImageCache:
    """Encoded images by spec, least recently used evicted past `max_bytes`."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Spec, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, spec: Spec) -> bytes:
        with self._lock:
            data = self._items.get(spec)
            if data is not None:
                self._items.move_to_end(spec)
                return data
        # Encode outside the lock so concurrent requests for different images run in parallel
        # (PIL releases the GIL); a rare duplicate encode of the same image is harmless.
        data = encode(spec)
        with self._lock:
            if spec not in self._items and len(data) <= self.max_bytes:
                self._items[spec] = data
                self._size += len(data)
                while self._size > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._size -= len(old)
        return data

    def put(self, spec: Spec, data: bytes) -> None:
        """Keep `data` as the rendering of `spec` (read back from a store of earlier renderings)."""
        with self._lock:
            if spec not in self._items and len(data) <= self.max_bytes:
                self._items[spec] = data
                self._size += len(data)

    @property
    def nbytes(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._items)

    def clear(self):
        with self._lock:
            self._items.clear()
            self._size = 0


def garbage_body(path: str) -> bytes:
    """A soft-404 HTML page, which is what most "images" that fail to decode really are."""
    n = 20 + zlib.crc32(path.encode()) % 200
    return (
        b"<!DOCTYPE html><html><head><title>Not Found</title></head><body>"
        + b"<p>The page you requested could not be found.</p>" * n
        + b"</body></html>"
    )


# --- server -----------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection, like urllib/img2dataset
    server_version = "fakeweb/1.0"
    server: _Server

    def do_GET(self):
        self._serve(body=True)

    def do_HEAD(self):
        self._serve(body=False)

    def _serve(self, body: bool):
        path = urlsplit(self.path).path
        app = self.server.app
        if path == "/robots.txt" and app.robots is not None:
            app.count("robots")
            if isinstance(app.robots, int):
                self._send(app.robots, b"error\n", "text/plain", body)
            else:
                self._send(200, app.robots.encode(), "text/plain", body)
            return
        r = route(path)
        app.count(r.kind)
        if r.kind == "reset":
            self.close_connection = True
            return
        if r.kind == "status":
            self._send(r.status, b"error %d\n" % r.status, "text/plain", body)
            return
        if r.kind == "redirect":
            self.send_response(302)
            self.send_header("Location", f"/img/{r.spec.id}_{r.spec.width}x{r.spec.height}.{r.spec.fmt}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if r.kind == "garbage":
            self._send(200, garbage_body(path), "image/jpeg", body)
            return
        if r.kind in ("hops", "loop", "to"):
            if r.kind == "hops":
                s = r.spec
                where = f"/hops/{r.count - 1}/" if r.count > 0 else "/img/"
                location = f"{where}{s.id}_{s.width}x{s.height}.{s.fmt}"
            else:
                location = path if r.kind == "loop" else r.target
            if r.kind != "hops" or r.count > 0:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            r = Route("img", r.spec)
        if r.kind == "retry":
            if app.refuse(path, r.count):
                self.send_response(r.status)
                if r.retry_after is not None:
                    self.send_header("Retry-After", r.retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            r = Route("img", r.spec)
        if r.kind == "bomb":
            self._send(200, bomb_body(r.spec), "image/" + ("jpeg" if r.spec.fmt == "jpg" else r.spec.fmt), body)
            return
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
            return
        if r.kind == "slow":
            app.begin()
            try:
                stopping = app.stopping.wait(r.seconds)
            finally:
                app.end()
            if stopping:
                self.close_connection = True
                return
        data = app.cache.get(r.spec)
        ctype = CONTENT_TYPES[r.spec.fmt]
        if r.kind == "drip":
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                for i in range(len(data)):
                    if app.stopping.wait(r.seconds):
                        break
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
            self.close_connection = True
            return
        if r.kind == "truncated":
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        extra = {"X-Robots-Tag": "noai, noimageai"} if r.kind == "noai" else {}
        self._send(200, data, ctype, body, extra)

    def _send(self, code: int, data: bytes, ctype: str, body: bool, extra: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def setup(self):
        super().setup()
        self.server.app.count_connection()

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        if self.server.app.verbose:
            super().log_message(format, *args)


class _KeepAliveHandler(_Handler):
    protocol_version = "HTTP/1.1"  # persistent connections, for clients that reuse them


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # benchmarks open hundreds of connections at once

    app: ImageServer

    def handle_error(self, request, client_address):
        # Clients that time out hang up mid-response; that is expected here, not an error.
        if self.app.verbose:
            super().handle_error(request, client_address)


class ImageServer:
    """The fake web on 127.0.0.1; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        cache_bytes: int = 256 << 20,
        verbose: bool = False,
        keep_alive: bool = False,
        robots: str | int | None = None,
        tls: tuple[str, str] | None = None,
    ):
        """robots: the /robots.txt to serve (an int: that status); None: /robots.txt is a 404 like any
        unknown path. tls: (certificate file, key file) to serve https."""
        self.host = host
        self.port = port
        self.verbose = verbose
        self.keep_alive = keep_alive
        self.robots = robots
        self.tls = tls
        self.active = 0  # /slow/ requests waiting now
        self.peak_active = 0  # the most /slow/ requests waiting at once: what a client had in flight
        self.connections = 0  # connections accepted
        self.bytes_sent: Counter[str] = Counter()  # bytes of /big/ and /bigstream/ bodies sent
        self._refused: Counter[str] = Counter()  # /retry/ paths: refusals so far
        self.cache = ImageCache(cache_bytes)
        self.stopping = threading.Event()
        self.hits: Counter[str] = Counter()  # requests per route kind
        self._hits_lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def count(self, kind: str):
        with self._hits_lock:
            self.hits[kind] += 1

    def begin(self):
        with self._hits_lock:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)

    def end(self):
        with self._hits_lock:
            self.active -= 1

    def count_connection(self):
        with self._hits_lock:
            self.connections += 1

    def sent(self, kind: str, n: int):
        with self._hits_lock:
            self.bytes_sent[kind] += n

    def refuse(self, path: str, times: int) -> bool:
        """Whether this request for a /retry/ path is still one of its first `times`."""
        with self._hits_lock:
            self._refused[path] += 1
            return self._refused[path] <= times

    def warm(self, urls, workers: int | None = None) -> int:
        """Render the images behind `urls` into the cache now, so a benchmark or a test with tight
        timeouts measures the client rather than image generation. Returns how many were rendered.
        Only as many as fit in the cache stay warm."""
        specs = {r.spec for r in (route(urlsplit(u).path) for u in urls) if r.spec is not None and r.kind != "status"}
        with ThreadPoolExecutor(workers or os.cpu_count() or 2) as pool:
            list(pool.map(self.cache.get, specs))
        return len(specs)

    def _bind(self):
        self._httpd = _Server((self.host, self.port), _KeepAliveHandler if self.keep_alive else _Handler)
        self._httpd.app = self
        self.port = self._httpd.server_address[1]
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)

    def start(self) -> ImageServer:
        self.stopping.clear()
        self._bind()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name=f"fakeweb:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self):
        if self._httpd is None:
            return
        self.stopping.set()  # wakes /slow/ handlers so they do not outlive the server
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None

    def serve_forever(self):
        """Serve in the calling thread (the CLI)."""
        self._bind()
        print(self.base_url, flush=True)
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc):
        self.stop()


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


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m laion_operator.fakeweb", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--cache-mb", type=int, default=256)
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    try:
        ImageServer(args.port, args.host, args.cache_mb << 20, args.verbose).serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
