"""The internet on loopback: many hosts that answer, fail and stall the way LAION's hosts do.

Every host is an address of its own in 127.0.0.0/8 (all of it is loopback on Linux), all on one
port, so that per-host limits and connection reuse meet distinct hosts. Deterministic by seed: the
same seed gives the same hosts, and the same URL the same outcome and the same latency.

- **Latency**: every response waits before its first byte for a time drawn per URL from a lognormal
  distribution (median `latency_median`, 0.3 s; sigma chosen so that the 99th percentile is
  `latency_p99`, 3 s). Connecting is instant, as on loopback.
- **Bandwidth**: bodies are sent at most `bandwidth` bytes a second per connection (2 MiB/s).
- **Hosts**: `hosts` ordinary hosts (URLs spread over them with a heavy tail: a few hosts have many
  URLs), plus addresses with a role: *refused* (nothing listens: connection refused), *silent*
  (accepts, reads the request, never answers), *busy* (answers 429 with `Retry-After: 1` past
  `busy_rate` requests a second).
- **Paths** (on any ordinary host):

      /img/<id>_<w>x<h>.<fmt>     200, the image (fakeweb's rendering: fmt jpg|png|webp)
      /calm/<id>_<w>x<h>.<fmt>    200, the image with no latency and no bandwidth limit (the CPU-bound ceiling)
      /status/<code>/<spec>       that status, after the latency
      /drip/<spec>                headers (the image's Content-Length), then one byte every `drip_interval`
                                  seconds; the connection closes after `drip_seconds`
      /big/<spec>                 the image padded to `big_bytes` (Content-Length says so), at 8× the bandwidth
      /heavy/<spec>               the image padded to a size drawn per URL (`heavy_min_bytes`..`heavy_max_bytes`,
                                  log-uniform), sent slowly but steadily at a rate drawn per URL
                                  (`heavy_min_rate`..`heavy_max_rate`): a large image on a slow link, which a
                                  per-read timeout keeps, a whole-request deadline may drop, and a minimum
                                  rate (the project's minBodyRate) keeps

- **Names** (`names`): hosts are also reachable by name, `h<a>-<b>-<c>.laion.test` for 127.a.b.c, through
  a DNS server on `dns_address()` (port 53) that answers after a delay drawn per name; `gone-<n>.laion.test`
  (the `nxdomain` kind) does not exist. **TLS** (`tls`): every host speaks HTTPS only, with a certificate
  for `*.laion.test` from `tests.support.tls`'s CA; URLs are https://.
- **Spread** (`host_share`): the busiest host's share of the ordinary hosts' URLs (0: a 1/rank^1.1 tail).

The server also records, per URL, how long clients held it: from the request's arrival to the last
byte sent or the client hanging up, across every request for that URL (retries included) — the
"longest time any URL held a slot", measured from outside the client, for any client.

    python -m tests.support.internet --seed 1 --hosts 200   # from the repository's root: serve until stdin closes
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

from laion_operator.testbed.fakeweb import CONTENT_TYPES, ImageCache, parse_spec
from tests.support import dns

# The seeds' ~80 % success, split over the ways LAION URLs fail. "busy" URLs are images on the busy host.
DEFAULT_MIX = {
    "ok": 0.80,
    "http_404": 0.07,
    "http_403": 0.03,
    "http_5xx": 0.02,
    "refused": 0.02,
    "silent": 0.02,
    "drip": 0.01,
    "big": 0.005,
    "busy": 0.025,
}
# What a client that honours deadlines, size caps and Retry-After reports for each kind.
EXPECTED_REASON = {
    "ok": "ok",
    "http_404": "http_4xx",
    "http_403": "http_4xx",
    "http_5xx": "http_5xx",
    "refused": "connection",
    "silent": "timeout",
    "drip": "timeout",
    "big": "too_large",
    "busy": "ok",
    "heavy": "ok",  # while its rate is above the client's minimum: see expected_reason
    "nxdomain": "dns",
}
FIVE_XX = [500, 502, 503]
NET = 77  # hosts are 127.NET.x.y unless Config.net says otherwise
DOMAIN = "laion.test"  # .test: reserved, never a real host (RFC 2606)


@dataclass
class Config:
    seed: int = 0
    hosts: int = 200
    refused_hosts: int = 4
    silent_hosts: int = 4
    latency_median: float = 0.3
    latency_p99: float = 3.0
    bandwidth: float = 2 * 2**20
    drip_interval: float = 2.0
    drip_seconds: float = 40.0
    big_bytes: int = 96 * 2**20
    busy_rate: float = 4.0
    net: int = NET
    host_share: float = 0.0
    heavy_min_bytes: int = 1 << 20
    heavy_max_bytes: int = 8 << 20
    heavy_min_rate: float = 100 * 1024
    heavy_max_rate: float = 500 * 1024
    names: bool = False
    tls: bool = False
    dns_latency_median: float = 0.02
    dns_latency_p99: float = 0.3

    def to_args(self) -> list[str]:
        return [f"--{k.replace('_', '-')}={v}" for k, v in self.__dict__.items()]


def _address(i: int, net: int = NET) -> str:
    return f"127.{net}.{i // 250}.{i % 250 + 1}"


def dns_address(cfg: Config) -> str:
    """Where the DNS server of a `names` internet listens (port 53, as resolv.conf has no port)."""
    return f"127.{cfg.net}.255.253"


def name_of(address: str) -> str:
    return "h" + "-".join(address.split(".")[1:]) + "." + DOMAIN


def address_of(host: str) -> str:
    """The address behind a host of the test bed, by name or already an address (unknown names: as given)."""
    if host.endswith("." + DOMAIN) and host.startswith("h"):
        parts = host[1 : -len(DOMAIN) - 1].split("-")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            return "127." + ".".join(parts)
    return host


@dataclass
class Hosts:
    """The addresses of each role, from the config alone."""

    ordinary: list[str]
    refused: list[str]
    silent: list[str]
    busy: str

    @classmethod
    def of(cls, cfg: Config) -> Hosts:
        addrs = [_address(i, cfg.net) for i in range(cfg.hosts + cfg.refused_hosts + cfg.silent_hosts + 1)]
        n, r, s = cfg.hosts, cfg.refused_hosts, cfg.silent_hosts
        return cls(addrs[:n], addrs[n : n + r], addrs[n + r : n + r + s], addrs[n + r + s])

    def listening(self) -> list[str]:
        return [*self.ordinary, *self.silent, self.busy]

    def known(self) -> set[str]:
        """Every address with a name in DNS (refused hosts too: they resolve, then refuse)."""
        return {*self.listening(), *self.refused}


def _unit(seed: int, key: str) -> float:
    """A uniform number in (0, 1) from the seed and a key: the same URL, the same draw."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2**64


def _lognormal(median: float, p99: float, u: float) -> float:
    sigma = math.log(p99 / median) / statistics.NormalDist().inv_cdf(0.99)
    return min(median * math.exp(sigma * statistics.NormalDist().inv_cdf(u)), 60.0)


def latency(cfg: Config, host: str, path: str) -> float:
    return _lognormal(cfg.latency_median, cfg.latency_p99, _unit(cfg.seed, host + path))


def dns_latency(cfg: Config, name: str) -> float:
    return _lognormal(cfg.dns_latency_median, cfg.dns_latency_p99, _unit(cfg.seed, "dns:" + name))


def heavy_plan(cfg: Config, host: str, path: str) -> tuple[int, float]:
    """(body bytes, bytes a second) of a /heavy/ URL: size log-uniform, rate uniform in their ranges."""
    lo, hi = math.log(cfg.heavy_min_bytes), math.log(cfg.heavy_max_bytes)
    size = int(math.exp(lo + (hi - lo) * _unit(cfg.seed, "size:" + host + path)))
    rate = cfg.heavy_min_rate + (cfg.heavy_max_rate - cfg.heavy_min_rate) * _unit(cfg.seed, "rate:" + host + path)
    return size, rate


def expected_reason(cfg: Config, hosts: Hosts, url: str, timeout: float, min_body_rate: float = 16384) -> str:
    """What a client reports that bounds a response's headers by `timeout` and its body by a minimum
    rate over every `timeout` seconds from the request (the project's download.timeout and
    minBodyRate), with size caps and Retry-After."""
    kind = kind_of(cfg, hosts, url)
    if kind == "heavy":
        parts = urlsplit(url)
        host = address_of(parts.hostname)
        size, rate = heavy_plan(cfg, host, parts.path)
        wait = latency(cfg, host, parts.path)
        first_window = wait + size / rate < timeout or (timeout - wait) * rate >= min_body_rate * timeout
        return "ok" if wait < timeout and rate >= min_body_rate and first_window else "timeout"
    return EXPECTED_REASON[kind]


def kind_of(cfg: Config, hosts: Hosts, url: str) -> str:
    """Which of DEFAULT_MIX's kinds `url` is (the server's behaviour for it)."""
    parts = urlsplit(url)
    host, path = parts.hostname, parts.path
    if host.startswith("gone-") and host.endswith("." + DOMAIN):
        return "nxdomain"
    host = address_of(host)
    if host in hosts.refused:
        return "refused"
    if host in hosts.silent:
        return "silent"
    if host == hosts.busy:
        return "busy"
    head = path.lstrip("/").split("/", 2)
    if head[0] == "status":
        code = int(head[1])
        return "http_5xx" if code >= 500 else f"http_{code}"
    return {"img": "ok", "calm": "ok", "drip": "drip", "big": "big", "heavy": "heavy"}.get(head[0], "http_404")


# --- metadata ---------------------------------------------------------------------------------


def urls(cfg: Config, n: int, specs: list[str], port: int, mix: dict[str, float] | None = None) -> list[str]:
    """`n` URLs over the hosts, kinds drawn from `mix`, images taken from `specs` in turn
    (`<id>_<w>x<h>.<fmt>`), all deterministic by `cfg.seed`."""
    mix = dict(DEFAULT_MIX if mix is None else mix)
    hosts = Hosts.of(cfg)
    rng = np.random.default_rng([cfg.seed, 0x1E7])
    kinds = list(mix)
    kind = rng.choice(len(kinds), n, p=np.array([mix[k] for k in kinds]) / sum(mix.values()))
    weights = host_weights(len(hosts.ordinary), cfg.host_share)
    ordinary = rng.choice(len(hosts.ordinary), n, p=weights / weights.sum())
    special = rng.integers(0, 1 << 30, n)
    out = []
    for i in range(n):
        k, spec = kinds[kind[i]], specs[i % len(specs)]
        host = hosts.ordinary[ordinary[i]]
        path = f"/img/{spec}"
        if k == "refused":
            host = hosts.refused[special[i] % len(hosts.refused)]
        elif k == "silent":
            host = hosts.silent[special[i] % len(hosts.silent)]
        elif k == "busy":
            host = hosts.busy
        elif k == "http_404" or k == "http_403":
            path = f"/status/{k[-3:]}/{spec}"
        elif k == "http_5xx":
            path = f"/status/{FIVE_XX[special[i] % 3]}/{spec}"
        elif k in ("drip", "big", "heavy"):
            path = f"/{k}/{spec}"
        elif k == "nxdomain":
            host = f"gone-{special[i] % 997}.{DOMAIN}"
        if cfg.names and k != "nxdomain":
            host = name_of(host)
        out.append(f"{'https' if cfg.tls else 'http'}://{host}:{port}{path}")
    return out


def host_weights(n: int, busiest: float = 0.0) -> np.ndarray:
    """A heavy tail of hosts, 1/rank^a: a few carry many URLs, most a few (as image CDNs and blogs do).
    a = 1.1 unless `busiest` (the first host's share) is given; then the a that gives it."""
    ranks = np.arange(1, n + 1, dtype=float)
    if not busiest:
        weights = 1.0 / ranks**1.1
        return weights / weights.sum()
    lo, hi = 0.0, 8.0
    for _ in range(60):  # the first host's share grows with a: bisect
        a = (lo + hi) / 2
        weights = 1.0 / ranks**a
        lo, hi = (a, hi) if weights[0] / weights.sum() < busiest else (lo, a)
    weights = 1.0 / ranks**lo
    return weights / weights.sum()


CALM_NAME = "calm." + DOMAIN  # resolves at once, to the first ordinary host


def calm(url: str) -> str:
    """The same image with no latency and no bandwidth limit: /img/ → /calm/ (by name: on CALM_NAME,
    which the DNS server answers at once)."""
    url = url.replace("/img/", "/calm/", 1)
    parts = urlsplit(url)
    if parts.hostname.endswith("." + DOMAIN):
        url = parts._replace(netloc=f"{CALM_NAME}:{parts.port}").geturl()
    return url


def resolver(cfg: Config, hosts: Hosts):
    """(name -> address or None, name -> seconds before the answer) for the DNS server of `cfg`."""
    known = hosts.known()

    def resolve(name: str) -> str | None:
        if name == CALM_NAME:
            return hosts.ordinary[0]
        address = address_of(name)
        return address if address in known and address != name else None

    def delay(name: str) -> float:
        return 0.0 if name == CALM_NAME else dns_latency(cfg, name)

    return resolve, delay


def write_metadata(path, url_list: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sizes = [u.rsplit("_", 1)[1].split(".")[0].split("x") for u in url_list]
    pq.write_table(
        pa.table(
            {
                "URL": url_list,
                "TEXT": [f"internet image {i}" for i in range(len(url_list))],
                "WIDTH": [int(w) for w, _ in sizes],
                "HEIGHT": [int(h) for _, h in sizes],
            }
        ),
        path,
    )


# --- server -----------------------------------------------------------------------------------


@dataclass
class Held:
    """One URL's requests as the server saw them."""

    first: float
    last: float
    open: int = 0
    requests: int = 0


@dataclass
class Stats:
    requests: Counter = field(default_factory=Counter)  # by kind
    responses: Counter = field(default_factory=Counter)  # status codes sent
    hung_up: Counter = field(default_factory=Counter)  # by kind: the client left before the end
    held: dict[str, Held] = field(default_factory=dict)  # URL -> its requests
    # Connections open to each host, and requests being answered by each, now and at most: what a
    # client's politeness comes to (idle keep-alive connections count among the first only).
    open_by_host: Counter = field(default_factory=Counter)
    peak_by_host: Counter = field(default_factory=Counter)
    asking_host: Counter = field(default_factory=Counter)
    asking_peak: Counter = field(default_factory=Counter)

    def to_json(self, now: float) -> dict:
        spans = {u: (max(h.last, now) if h.open else h.last) - h.first for u, h in self.held.items()}
        worst = sorted(spans.items(), key=lambda kv: -kv[1])[:10]
        return {
            "requests": dict(self.requests),
            "responses": {str(k): v for k, v in self.responses.items()},
            "hung_up": dict(self.hung_up),
            "urls": len(spans),
            "held_max_seconds": worst[0][1] if worst else 0.0,
            "held_worst": worst,
            "still_open": sum(1 for h in self.held.values() if h.open),
            "host_connections_peak": max(self.peak_by_host.values(), default=0),
            "host_requests_peak": max(self.asking_peak.values(), default=0),
        }


class InternetServer:
    """The hosts of `cfg` on one port, served by one asyncio loop in a thread of its own."""

    def __init__(
        self, cfg: Config, port: int = 0, cache_bytes: int = 4 << 30, cert: str = "", key: str = "", dns_port: int = 53
    ):
        self.cfg = cfg
        self._tls = (cert, key)
        self._dns_port = dns_port
        self.dns: dns.DnsServer | None = None  # a `names` internet's, once serving
        self.hosts = Hosts.of(cfg)
        self.port = port
        self.cache = ImageCache(cache_bytes)
        self.stats = Stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._busy_tokens = cfg.busy_rate
        self._busy_at = 0.0
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # lifecycle

    def start(self) -> InternetServer:
        self._thread = threading.Thread(target=self._run, name="internet", daemon=True)
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._bind())
        except BaseException as err:  # noqa: BLE001 - handed to start()
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _bind(self) -> None:
        if not self.port:  # one port free on every address: the first host's free port, then the others
            with socket.socket() as s:
                s.bind((self.hosts.ordinary[0], 0))
                self.port = s.getsockname()[1]
        ssl = None
        if self.cfg.tls:
            from tests.support.tls import server_context

            ssl = server_context(*self._tls)
        for addr in self.hosts.listening():
            self._servers.append(
                await asyncio.start_server(self._handle, addr, self.port, backlog=1024, reuse_address=True, ssl=ssl)
            )
        if self.cfg.names:
            self._dns_transport, self.dns = await dns.serve(
                dns_address(self.cfg), self._dns_port, *resolver(self.cfg, self.hosts)
            )

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close():
            for s in self._servers:
                s.close()
            if self.dns is not None:
                self._dns_transport.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop = None

    def __enter__(self) -> InternetServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def warm(self, url_list: list[str], workers: int | None = None, store: str | None = None) -> int:
        """Render every image behind the URLs now, so that runs measure the clients, not the rendering;
        with `store`, images rendered before are read from that folder and new ones written to it."""
        specs = {parse_spec(urlsplit(u).path.rsplit("/", 1)[1]) for u in url_list}
        specs.discard(None)

        def get(spec) -> None:
            path = os.path.join(store, "{}_{}x{}.{}".format(*spec)) if store else None
            if path and os.path.exists(path):
                with open(path, "rb") as f:
                    self.cache.put(spec, f.read())
                return
            data = self.cache.get(spec)
            if path:
                with open(path + ".part", "wb") as f:
                    f.write(data)
                os.replace(path + ".part", path)

        if store:
            os.makedirs(store, exist_ok=True)
        with ThreadPoolExecutor(workers or os.cpu_count() or 2) as pool:
            list(pool.map(get, specs))
        return len(specs)

    def snapshot(self, reset: bool = False) -> dict:
        """The stats so far (from any thread); `reset` starts a new count."""

        async def take():
            data = self.stats.to_json(time.monotonic())
            if self.dns is not None:
                data["dns"] = dict(self.dns.queries)
                if reset:
                    self.dns.queries.clear()
            if reset:
                self.stats = Stats()
            return data

        return asyncio.run_coroutine_threadsafe(take(), self._loop).result(30)

    # serving

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host = writer.get_extra_info("sockname")[0]
        stats = self.stats  # the count this connection began in, should a snapshot start a new one
        stats.open_by_host[host] += 1
        stats.peak_by_host[host] = max(stats.peak_by_host[host], stats.open_by_host[host])
        try:
            keep = True
            while keep:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _, target, version = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                keep = version.strip() == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                path = urlsplit(target).path
                url = f"http://{host}:{self.port}{path}"
                kind = kind_of(self.cfg, self.hosts, url)
                self.stats.requests[kind] += 1
                held = self.stats.held.get(url)
                now = time.monotonic()
                if held is None:
                    held = self.stats.held[url] = Held(now, now)
                held.open += 1
                held.requests += 1
                stats.asking_host[host] += 1
                stats.asking_peak[host] = max(stats.asking_peak[host], stats.asking_host[host])
                try:
                    done = await self._respond(kind, host, path, reader, writer, keep)
                finally:
                    held.open -= 1
                    stats.asking_host[host] -= 1
                    held.last = time.monotonic()
                if not done:
                    self.stats.hung_up[kind] += 1
                    return
                keep = keep and done != "close"
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            stats.open_by_host[host] -= 1
            writer.close()

    async def _wait(self, reader: asyncio.StreamReader, seconds: float) -> bool:
        """Wait `seconds`; False as soon as the client hangs up (so the hold time is the client's)."""
        if seconds <= 0:
            return True
        try:
            data = await asyncio.wait_for(reader.read(1), seconds)
        except asyncio.TimeoutError:
            return True
        except ConnectionError:
            return False
        return bool(data)  # b"": the client closed; a pipelined byte is not expected of image clients

    async def _send(
        self,
        writer,
        reader,
        status: int,
        body: bytes,
        ctype: str,
        keep: bool,
        extra: dict | None = None,
        length: int | None = None,
        rate: float | None = None,
    ) -> bool:
        self.stats.responses[status] += 1
        reason = {
            200: "OK",
            403: "Forbidden",
            404: "Not Found",
            429: "Too Many Requests",
            500: "Internal Server Error",
            502: "Bad Gateway",
            503: "Service Unavailable",
        }.get(status, "Status")
        head = [
            f"HTTP/1.1 {status} {reason}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body) if length is None else length}",
            "Connection: keep-alive" if keep else "Connection: close",
        ]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if rate is None:
            writer.write(body)
            await writer.drain()
            return True
        chunk = 32 << 10
        for start in range(0, len(body), chunk):
            writer.write(body[start : start + chunk])
            await writer.drain()
            if start + chunk < len(body) and not await self._wait(reader, chunk / rate):
                return False
        return True

    async def _respond(self, kind: str, host: str, path: str, reader, writer, keep: bool):
        """Serve one request; returns False if the client hung up, "close" to end the connection."""
        cfg = self.cfg
        if kind == "silent":  # the request was read; no answer ever comes
            while await self._wait(reader, 3600):
                pass
            return False
        head, _, rest = path.lstrip("/").partition("/")
        if head == "calm":
            spec = parse_spec(rest)
            if spec is None:
                await self._send(writer, reader, 404, b"not found\n", "text/plain", keep)
                return True
            return await self._send(writer, reader, 200, self.cache.get(spec), CONTENT_TYPES[spec.fmt], keep)
        if kind == "busy" and not self._take_busy_token():
            await self._send(writer, reader, 429, b"slow down\n", "text/plain", keep, {"Retry-After": "1"})
            return True
        if not await self._wait(reader, latency(cfg, host, path)):
            return False
        if head == "status":
            code = int(rest.split("/", 1)[0])
            await self._send(writer, reader, code, b"error %d\n" % code, "text/plain", keep)
            return True
        spec = parse_spec(rest.rsplit("/", 1)[-1])
        if spec is None:
            await self._send(writer, reader, 404, b"not found\n", "text/plain", keep)
            return True
        data = self.cache.get(spec)
        ctype = CONTENT_TYPES[spec.fmt]
        if kind == "drip":
            await self._send(writer, reader, 200, b"", ctype, False, length=len(data))
            for i in range(int(cfg.drip_seconds / cfg.drip_interval)):
                writer.write(data[i : i + 1])
                await writer.drain()
                if not await self._wait(reader, cfg.drip_interval):
                    return False
            return "close"  # the drip gives up: the body stays short of its Content-Length
        if kind == "big":
            body = data + bytes(cfg.big_bytes - len(data))
            return await self._send(writer, reader, 200, body, ctype, keep, rate=8 * cfg.bandwidth)
        if kind == "heavy":  # decoders stop at the image's end: the padding only costs time on the wire
            size, rate = heavy_plan(cfg, host, path)
            body = data + bytes(max(size - len(data), 0))
            return await self._send(writer, reader, 200, body, ctype, keep, rate=rate)
        return await self._send(writer, reader, 200, data, ctype, keep, rate=cfg.bandwidth)

    def _take_busy_token(self) -> bool:
        now = time.monotonic()
        rate = self.cfg.busy_rate
        self._busy_tokens = min(rate, self._busy_tokens + (now - self._busy_at) * rate)
        self._busy_at = now
        if self._busy_tokens >= 1:
            self._busy_tokens -= 1
            return True
        return False


def _raise_open_files() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def process_cpu_seconds(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> None:
    """Serve; print `ready <port>` once every image of --urls is rendered; then per stdin line
    `stats` print one JSON line of stats and start a new count; exit when stdin closes."""
    p = argparse.ArgumentParser(prog="python -m tests.support.internet", description=__doc__.split("\n")[0])
    defaults = Config()
    for name, value in defaults.__dict__.items():
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--urls", help="a file of URLs (one a line) whose images are rendered before serving")
    p.add_argument("--image-dir", help="a folder keeping rendered images between runs (read first, written after)")
    p.add_argument("--cert", default="", help="server certificate chain (PEM), with --tls")
    p.add_argument("--key", default="", help="its private key (PEM)")
    args = vars(p.parse_args(argv))
    port, url_file, image_dir = args.pop("port"), args.pop("urls"), args.pop("image_dir")
    cert, key = args.pop("cert"), args.pop("key")
    _raise_open_files()  # one listening socket a host, and thousands of hosts
    server = InternetServer(Config(**args), port, cert=cert, key=key).start()
    if url_file:
        with open(url_file) as f:
            server.warm(f.read().split(), store=image_dir)
    print(f"ready {server.port}", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps(server.snapshot(reset=True)), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
