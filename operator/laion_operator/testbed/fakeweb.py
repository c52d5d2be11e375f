"""A loopback HTTP server that fails the way the internet does for LAION URLs: the demo's images.

Every URL's outcome is known from the URL alone, so tests can compute what a download run must
report without a real network (`tests/support/failing_web.py`'s `outcome_of`, which also serves the
rarer failures only the tests and the benchmarks ask for):

    /img/<id>_<w>x<h>.<fmt>       200, a generated image (fmt jpg|jpeg|png|webp); /small/ is an alias
    /redirect/<id>_<w>x<h>.<fmt>  302 to the /img/ equivalent
    /noai/<id>_<w>x<h>.<fmt>      200 image with `X-Robots-Tag: noai, noimageai`
    /truncated/<id>_<w>x<h>.<fmt> full Content-Length, half the bytes, then the connection closes
    /garbage/<anything>           200 image/jpeg whose body is an HTML page
    /status/<code>/<anything>     that status (400-599 only)
    /slow/<seconds>/<spec>        waits (at most 30 s) before serving /img/<spec> (or a 256x256 jpg)
    /reset/<anything>             closes the connection without answering
    anything else                 404

`ImageServer(robots=...)` serves a /robots.txt (or an error status for it), `tdmrep=` a
/.well-known/tdmrep.json (TDMRep's rules), `tls=` serves https; `agents` counts the User-Agents seen.
`ImageServer(keep_alive=True)` speaks HTTP/1.1 with persistent connections (counted in
`connections`), for clients that reuse them.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import ssl
import threading
import zlib
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageChops, ImageDraw

MAX_SLOW_SECONDS = 30.0
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
    kind: str  # img redirect noai truncated garbage status slow reset; the tests' server adds more
    spec: Spec | None = None
    status: int = 200
    seconds: float = 0.0
    count: int = 0  # type: ignore[assignment]  # shadows tuple.count; big: bytes, hops: redirects to go, retry: refusals
    target: str = ""  # to: where it redirects
    retry_after: str | None = None


DEFAULT_SLOW_SPEC = Spec("slow", 256, 256, "jpg")


def parse_spec(text: str) -> Spec | None:
    m = _SPEC_RE.match(text)
    if not m:
        return None
    return Spec(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))


def spec_route(kind: str, rest: str) -> Route:
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
        return spec_route("img", rest)
    if head in ("redirect", "noai", "truncated"):
        return spec_route(head, rest)
    if head == "garbage":
        return Route("garbage")
    if head == "reset":
        return Route("reset")
    if head == "status":
        code = rest.split("/", 1)[0]
        if code.isdigit() and 400 <= int(code) <= 599:
            return Route("status", status=int(code))
        return Route("status", status=400)
    if head == "slow":
        secs, _, inner = rest.partition("/")
        try:
            seconds = min(max(float(secs), 0.0), MAX_SLOW_SECONDS)
        except ValueError:
            return Route("status", status=400)
        if seconds != seconds:  # NaN
            return Route("status", status=400)
        inner_route = spec_route("img", inner) if parse_spec(inner) else Route("img", DEFAULT_SLOW_SPEC)
        if inner_route.kind != "img":
            return inner_route
        return Route("slow", inner_route.spec, seconds=seconds)
    return Route("status", status=404)


def image_of(r: Route) -> Spec:
    """The image a route serves (every route past the handler's early answers names one)."""
    if r.spec is None:
        raise ValueError(f"route {r.kind} serves no image")
    return r.spec


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


class Handler(BaseHTTPRequestHandler):
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
        app.count_agent(self.headers.get("User-Agent", ""))
        for name, file, served, ctype in (
            ("robots", "/robots.txt", app.robots, "text/plain"),
            ("tdmrep", "/.well-known/tdmrep.json", app.tdmrep, "application/json"),
        ):
            if path == file and served is not None:
                app.count(name)
                if isinstance(served, int):
                    self._send(served, b"error\n", "text/plain", body)
                else:
                    self._send(200, served.encode(), ctype, body)
                return
        r = app.route(path)
        app.count(r.kind)
        if r.kind == "reset":
            self.close_connection = True
            return
        if r.kind == "status":
            self._send(r.status, b"error %d\n" % r.status, "text/plain", body)
            return
        if r.kind == "redirect":
            s = image_of(r)
            self.redirect(f"/img/{s.id}_{s.width}x{s.height}.{s.fmt}")
            return
        if r.kind == "garbage":
            self._send(200, garbage_body(path), "image/jpeg", body)
            return
        more = self.serve_more(r, path, body)
        if more is None:
            return
        r = more
        if r.kind == "slow":
            app.begin()
            try:
                stopping = app.stopping.wait(r.seconds)
            finally:
                app.end()
            if stopping:
                self.close_connection = True
                return
        spec = image_of(r)
        data, ctype = app.cache.get(spec), CONTENT_TYPES[spec.fmt]
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

    def serve_more(self, r: Route, path: str, body: bool) -> Route | None:
        """The routes of a server with more kinds (the tests'): None once answered, else the route
        to answer as this handler does."""
        return r

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def setup(self):
        super().setup()
        self.server.app.count_connection()

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        if self.server.app.verbose:
            super().log_message(format, *args)


class KeepAliveHandler(Handler):
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

    route = staticmethod(route)
    handlers = (Handler, KeepAliveHandler)  # one request a connection, persistent connections

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        cache_bytes: int = 256 << 20,
        verbose: bool = False,
        keep_alive: bool = False,
        robots: str | int | None = None,
        tls: tuple[str, str] | None = None,
        tdmrep: str | int | None = None,
    ):
        """robots: the /robots.txt to serve (an int: that status); None: /robots.txt is a 404 like any
        unknown path; tdmrep: the same for /.well-known/tdmrep.json. tls: (certificate file, key file)
        to serve https."""
        self.host = host
        self.port = port
        self.verbose = verbose
        self.keep_alive = keep_alive
        self.robots = robots
        self.tdmrep = tdmrep
        self.agents: Counter[str] = Counter()  # requests per User-Agent header
        self.tls = tls
        self.active = 0  # /slow/ requests waiting now
        self.peak_active = 0  # the most /slow/ requests waiting at once: what a client had in flight
        self.connections = 0  # connections accepted
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

    def count_agent(self, agent: str):
        with self._hits_lock:
            self.agents[agent] += 1

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

    def warm(self, urls, workers: int | None = None) -> int:
        """Render the images behind `urls` into the cache now, so a benchmark or a test with tight
        timeouts measures the client rather than image generation. Returns how many were rendered.
        Only as many as fit in the cache stay warm."""
        specs = {
            r.spec for r in (self.route(urlsplit(u).path) for u in urls) if r.spec is not None and r.kind != "status"
        }
        with ThreadPoolExecutor(workers or os.cpu_count() or 2) as pool:
            list(pool.map(self.cache.get, specs))
        return len(specs)

    def _bind(self) -> _Server:
        httpd = _Server((self.host, self.port), self.handlers[self.keep_alive])
        httpd.app = self
        self.port = httpd.server_address[1]
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        return httpd

    def start(self) -> ImageServer:
        self.stopping.clear()
        self._thread = threading.Thread(
            target=self._bind().serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"fakeweb:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self):
        if self._httpd is None:
            return
        self.stopping.set()  # wakes /slow/ handlers so they do not outlive the server
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = self._thread = None

    def serve_forever(self):
        """Serve in the calling thread (the CLI)."""
        httpd = self._bind()
        print(self.base_url, flush=True)
        try:
            httpd.serve_forever()
        finally:
            httpd.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m laion_operator.testbed.fakeweb", description=__doc__.split("\n")[0])
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
