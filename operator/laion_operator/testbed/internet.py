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

The server also records, per URL, how long clients held it: from the request's arrival to the last
byte sent or the client hanging up, across every request for that URL (retries included) — the
"longest time any URL held a slot", measured from outside the client, for any client.

    python -m laion_operator.testbed.internet --seed 1 --hosts 200   # serve until stdin closes
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

from .fakeweb import CONTENT_TYPES, ImageCache, parse_spec

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
}
FIVE_XX = [500, 502, 503]
NET = 77  # hosts are 127.NET.x.y


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

    def to_args(self) -> list[str]:
        return [f"--{k.replace('_', '-')}={v}" for k, v in self.__dict__.items()]


def _address(i: int) -> str:
    return f"127.{NET}.{i // 250}.{i % 250 + 1}"


@dataclass
class Hosts:
    """The addresses of each role, from the config alone."""

    ordinary: list[str]
    refused: list[str]
    silent: list[str]
    busy: str

    @classmethod
    def of(cls, cfg: Config) -> Hosts:
        addrs = [_address(i) for i in range(cfg.hosts + cfg.refused_hosts + cfg.silent_hosts + 1)]
        n, r, s = cfg.hosts, cfg.refused_hosts, cfg.silent_hosts
        return cls(addrs[:n], addrs[n : n + r], addrs[n + r : n + r + s], addrs[n + r + s])

    def listening(self) -> list[str]:
        return [*self.ordinary, *self.silent, self.busy]


def _unit(seed: int, key: str) -> float:
    """A uniform number in (0, 1) from the seed and a key: the same URL, the same draw."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2**64


def latency(cfg: Config, host: str, path: str) -> float:
    sigma = math.log(cfg.latency_p99 / cfg.latency_median) / statistics.NormalDist().inv_cdf(0.99)
    z = statistics.NormalDist().inv_cdf(_unit(cfg.seed, host + path))
    return min(cfg.latency_median * math.exp(sigma * z), 60.0)


def kind_of(cfg: Config, hosts: Hosts, url: str) -> str:
    """Which of DEFAULT_MIX's kinds `url` is (the server's behaviour for it)."""
    parts = urlsplit(url)
    host, path = parts.hostname, parts.path
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
    return {"img": "ok", "calm": "ok", "drip": "drip", "big": "big"}.get(head[0], "http_404")


# --- metadata ---------------------------------------------------------------------------------


def urls(cfg: Config, n: int, specs: list[str], port: int, mix: dict[str, float] | None = None) -> list[str]:
    """`n` URLs over the hosts, kinds drawn from `mix`, images taken from `specs` in turn
    (`<id>_<w>x<h>.<fmt>`), all deterministic by `cfg.seed`."""
    mix = dict(DEFAULT_MIX if mix is None else mix)
    hosts = Hosts.of(cfg)
    rng = np.random.default_rng([cfg.seed, 0x1E7])
    kinds = list(mix)
    kind = rng.choice(len(kinds), n, p=np.array([mix[k] for k in kinds]) / sum(mix.values()))
    # A heavy tail of hosts: a few carry many URLs, most a few (as image CDNs and blogs do).
    weights = 1.0 / np.arange(1, len(hosts.ordinary) + 1) ** 1.1
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
        elif k in ("drip", "big"):
            path = f"/{k}/{spec}"
        out.append(f"http://{host}:{port}{path}")
    return out


def calm(url: str) -> str:
    """The same image with no latency and no bandwidth limit: /img/ → /calm/."""
    return url.replace("/img/", "/calm/", 1)


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
        }


class InternetServer:
    """The hosts of `cfg` on one port, served by one asyncio loop in a thread of its own."""

    def __init__(self, cfg: Config, port: int = 0, cache_bytes: int = 4 << 30):
        self.cfg = cfg
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
        for addr in self.hosts.listening():
            self._servers.append(
                await asyncio.start_server(self._handle, addr, self.port, backlog=1024, reuse_address=True)
            )

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close():
            for s in self._servers:
                s.close()
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

    def warm(self, url_list: list[str], workers: int | None = None) -> int:
        """Render every image behind the URLs now, so that runs measure the clients, not the rendering."""
        specs = {parse_spec(urlsplit(u).path.rsplit("/", 1)[1]) for u in url_list}
        specs.discard(None)
        with ThreadPoolExecutor(workers or os.cpu_count() or 2) as pool:
            list(pool.map(self.cache.get, specs))
        return len(specs)

    def snapshot(self, reset: bool = False) -> dict:
        """The stats so far (from any thread); `reset` starts a new count."""

        async def take():
            data = self.stats.to_json(time.monotonic())
            if reset:
                self.stats = Stats()
            return data

        return asyncio.run_coroutine_threadsafe(take(), self._loop).result(30)

    # serving

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host = writer.get_extra_info("sockname")[0]
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
                try:
                    done = await self._respond(kind, host, path, reader, writer, keep)
                finally:
                    held.open -= 1
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


def process_cpu_seconds(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> None:
    """Serve; print `ready <port>` once every image of --urls is rendered; then per stdin line
    `stats` print one JSON line of stats and start a new count; exit when stdin closes."""
    p = argparse.ArgumentParser(prog="python -m laion_operator.testbed.internet", description=__doc__.split("\n")[0])
    defaults = Config()
    for name, value in defaults.__dict__.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--urls", help="a file of URLs (one a line) whose images are rendered before serving")
    args = vars(p.parse_args(argv))
    port, url_file = args.pop("port"), args.pop("urls")
    server = InternetServer(Config(**args), port).start()
    if url_file:
        with open(url_file) as f:
            server.warm(f.read().split())
    print(f"ready {server.port}", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps(server.snapshot(reset=True)), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
