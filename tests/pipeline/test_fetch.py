"""The fetch engine (pipeline/fetch/) against the fake web on loopback: many URLs in flight, deadlines,
size caps, the address guard, redirects, per-host politeness, DNS, robots.txt and failure reasons.

Times are asserted as bounds only ("ended within the deadline plus 2 s"), never as speed.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_operator.contract import FAILURE_REASONS
from laion_operator.pipeline import fetch
from laion_operator.pipeline.fetch import AddressGuard, Engine, FetchError, classify
from laion_operator.pipeline.fetch import engine as fetch_engine
from laion_operator.pipeline.fetch import shard as fetch_shard
from laion_operator.pipeline.image_header import declared_pixels
from laion_operator.spec import PartSpec, SpecError
from tests.support.failing_web import ImageServer, Silent, outcome_of, refused_address

LOOPBACK = ["127.0.0.0/8"]
SLACK = 2.0  # seconds a bound allows past a deadline


def options(**download):
    download.setdefault("allowedNetworks", LOOPBACK)
    return PartSpec.from_dict(
        {"partId": "t", "source": {"urls": ["m.parquet"]}, "output": {"uri": "out"}, "download": download}
    ).download


class Result:
    def __init__(self, url, data, error, seconds):
        self.url, self.data, self.error, self.seconds = url, data, error, seconds

    @property
    def reason(self) -> str:
        return self.error.reason if self.error else "ok"


def fetch_each(urls, **download) -> list[Result]:
    """Every URL at once through one engine (no scheduler): body or error, and the time it took."""
    opts = options(**download)

    async def main():
        async with Engine(opts) as engine:

            async def one(url):
                start = time.monotonic()
                try:
                    return Result(url, await engine.fetch(url), None, time.monotonic() - start)
                except FetchError as err:
                    return Result(url, None, err, time.monotonic() - start)

            return await asyncio.gather(*(one(u) for u in urls)), engine

    results, engine = asyncio.run(main())
    fetch_each.engine = engine
    return results


def fetch_one(url, **download) -> Result:
    return fetch_each([url], **download)[0]


def run_shard(urls, threads=2, **download) -> tuple[dict[int, Result], float]:
    """The shard path (`fetch.run`): scheduler, per-host limits and decode threads."""
    results: dict[int, Result] = {}
    start = time.monotonic()

    def handle(index, data, error):
        results[index] = Result(urls[index], data, error, time.monotonic() - start)

    fetch.run(urls, options(**download), handle, threads)
    return results, time.monotonic() - start


@pytest.fixture(scope="module")
def web():
    with ImageServer() as server:
        yield server


@pytest.fixture(scope="module")
def web2():
    """A second host (another loopback address)."""
    with ImageServer(host="127.0.0.2") as server:
        yield server


# --- failure reasons ----------------------------------------------------------------------------


def test_every_route_ends_as_the_fake_web_predicts(web):
    b = web.base_url
    urls = [
        f"{b}/img/1_640x480.jpg",
        f"{b}/img/2_300x200.png",
        f"{b}/img/3_200x300.webp",
        f"{b}/redirect/4_300x300.jpg",
        f"{b}/noai/5_300x300.jpg",
        f"{b}/truncated/6_600x400.jpg",
        f"{b}/garbage/7.jpg",
        f"{b}/status/404/8",
        f"{b}/status/503/9",
        f"{b}/reset/10",
        f"{b}/slow/4/11_64x64.jpg",
        f"{b}/drip/0.5/12_64x64.jpg",
        f"{b}/big/40000000/13",
        f"{b}/bigstream/40000000/14",
        f"{b}/bomb/15_30000x30000.png",
        f"{b}/bomb/16_20x20.gif",
        f"{b}/hops/5/17_64x64.jpg",
        f"{b}/hops/6/18_64x64.jpg",
        f"{b}/loop/19",
        f"{b}/to/{quote('file:///etc/hostname', safe='')}",
        "file:///etc/hostname",
        "ftp://example.com/a.jpg",
        f"{b}/retry/429/3600/1/20_64x64.jpg",
        f"{b}/retry/503/-/5/21_64x64.jpg",
    ]
    results = fetch_each(urls, timeout=2)
    expected = [outcome_of(u, timeout=2) for u in urls]
    # The engine hands undecodable bodies over as bytes: only a truncated body is `decode` already.
    fetched = [e if e != "decode" or "/truncated/" in u else "ok" for u, e in zip(urls, expected)]
    assert [r.reason for r in results] == fetched
    assert set(expected) >= {
        "ok",
        "opt_out",
        "decode",
        "http_4xx",
        "http_5xx",
        "connection",
        "timeout",
        "too_large",
        "redirect",
        "bad_url",
        "rate_limited",
    }
    assert {r.reason for r in results} <= set(FAILURE_REASONS) | {"ok"}


def test_the_taxonomy_carries_the_new_reasons():
    assert {"too_large", "blocked_address", "bad_url", "redirect", "rate_limited"} <= set(FAILURE_REASONS)
    assert FAILURE_REASONS[-1] == "other"


def test_classify_names_aiohttp_failures():
    key = aiohttp.client_reqrep.ConnectionKey("h", 80, False, True, None, None, None)
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))
    dns = aiohttp.ClientConnectorDNSError(key, socket.gaierror(-2, "Name or service not known"))
    import ssl

    cert = aiohttp.ClientConnectorCertificateError(key, ssl.SSLCertVerificationError("bad cert"))
    assert classify(refused) == "connection"
    assert classify(dns) == "dns"
    assert classify(cert) == "tls"
    assert classify(asyncio.TimeoutError()) == "timeout"
    assert classify(asyncio.TimeoutError(), phase="dns") == "dns"
    assert classify(aiohttp.ServerDisconnectedError()) == "connection"
    assert classify(aiohttp.ClientPayloadError("short")) == "decode"
    assert classify(aiohttp.InvalidURL("x")) == "bad_url"
    assert classify(fetch.BlockedAddress("x")) == "blocked_address"
    assert classify(ValueError("?")) == "other"


def test_bodies_are_the_servers_bytes(web):
    """What is hashed and resized is exactly what the server sent (no decompression, no re-encoding)."""
    urls = [f"{web.base_url}/img/{i}_{300 + i}x200.{fmt}" for i, fmt in enumerate(["jpg", "png", "webp"])]
    for r in fetch_each(urls):
        with urllib.request.urlopen(r.url) as answer:
            assert r.data == answer.read()


def download_one_shard(urls, tmp_path, **download):
    """download_shard (no Ray) of `urls` in one shard, in row order, into parquet: its stats and the
    per-sample rows by URL."""
    import pyarrow as pa

    from laion_operator.pipeline.download import download_shard
    from laion_operator.pipeline.filter import run_filter
    from laion_operator.storage import Store

    meta = tmp_path / "m.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"c{i}" for i in range(len(urls))]}), meta)
    spec = PartSpec.from_dict(
        {
            "partId": "t",
            "source": {"urls": [str(meta)]},
            "output": {"uri": str(tmp_path / "o")},
            "filter": {"shuffle": False},
            "download": {"allowedNetworks": LOOPBACK, "outputFormat": "parquet", **download},
        }
    )
    run_filter(spec, Store(spec.output))
    stats = download_shard(spec, 0, threads=2)
    return stats, {r["url"]: r for r in pq.read_table(tmp_path / "o" / "00000.parquet").to_pylist()}


def test_shard_writes_every_reason_per_sample(web, tmp_path):
    """download_shard (no Ray): the per-sample parquet and the stats carry the new reasons."""
    b = web.base_url
    urls = [
        f"{b}/img/1_300x200.jpg",
        f"{b}/bomb/2_30000x30000.jpg",
        f"{b}/loop/3",
        "file:///etc/hostname",
        f"{b}/retry/429/3600/1/4_64x64.jpg",
        f"{b}/big/40000000/5",
        f"{b}/status/404/6",
    ]
    stats, by_url = download_one_shard(urls, tmp_path, timeout=3)
    want = {u: outcome_of(u, timeout=3) for u in urls}
    assert {u: by_url[u]["failure_reason"] or "ok" for u in urls} == want
    assert stats.failed_by_reason == {k: v for k, v in Counter(want.values()).items() if k != "ok"}
    assert stats.successes == 1 and by_url[urls[0]]["status"] == "success"
    assert json.loads((tmp_path / "o" / "00000_stats.json").read_text())["failed_by_reason"] == stats.failed_by_reason


# --- 1. many URLs in flight, keep-alive, decode threads -------------------------------------------


def test_many_urls_are_in_flight_at_once(web):
    urls = [f"{web.base_url}/slow/1/inflight{i}_64x64.jpg" for i in range(40)]
    results, seconds = run_shard(urls, maxInFlight=40, maxPerHost=40, timeout=10)
    assert [r.reason for r in results.values()] == ["ok"] * 40
    assert seconds < 1 + 8  # one after another would take 40 s


def test_max_in_flight_bounds_the_urls_at_once():
    with ImageServer() as server:
        urls = [f"{server.base_url}/slow/0.3/bound{i}_64x64.jpg" for i in range(12)]
        results, _ = run_shard(urls, maxInFlight=3, maxPerHost=10, timeout=10)
        assert all(r.reason == "ok" for r in results.values())
        assert server.peak_active == 3


def test_keep_alive_connections_are_reused():
    with ImageServer(keep_alive=True) as server:
        urls = [f"{server.base_url}/img/ka{i}_64x64.jpg" for i in range(30)]
        results, _ = run_shard(urls, maxInFlight=8, maxPerHost=2)
        assert all(r.reason == "ok" for r in results.values())
        assert server.connections <= 2  # 30 requests on at most maxPerHost connections


def test_bodies_are_decoded_on_the_task_threads_not_the_loop(web):
    names, at_once, peak = set(), [0], [0]
    lock = threading.Lock()

    def handle(index, data, error):
        with lock:
            names.add(threading.current_thread().name)
            at_once[0] += 1
            peak[0] = max(peak[0], at_once[0])
        time.sleep(0.05)
        with lock:
            at_once[0] -= 1

    urls = [f"{web.base_url}/img/dec{i}_64x64.jpg" for i in range(20)]
    fetch.run(urls, options(maxInFlight=20, maxPerHost=20), handle, 2)
    assert names and all(n.startswith("decode") for n in names)
    assert peak[0] <= 2


def test_the_network_runs_ahead_of_slow_decoding(web):
    """A URL that only ends at its deadline starts while earlier bodies wait for the decode thread, so
    its wait overlaps the decoding instead of following it (a shard's tail)."""
    handled = []

    def handle(index, data, error):
        time.sleep(0.1)  # a slow decode: 40 bodies take 4 s on the one thread
        handled.append((index, error.reason if error else "ok"))

    with Silent() as silent:
        urls = [f"{web.base_url}/img/ahead{i}_64x64.jpg" for i in range(40)] + [f"{silent.base_url}/x.jpg"]
        start = time.monotonic()
        fetch.run(urls, options(maxInFlight=2, maxPerHost=4, timeout=3), handle, 1)
        seconds = time.monotonic() - start
    assert sorted(handled) == [(i, "ok") for i in range(40)] + [(40, "timeout")]
    # Were a slot held until its body was decoded, the silent URL would start after ~4 s of decoding
    # and end 3 s later; started at once, its deadline passes while the bodies are decoded.
    assert seconds < 4 + SLACK


def test_queued_bodies_are_bounded_in_bytes(monkeypatch):
    """While the decode thread is stuck, fetching stops once the queue is full: the bodies a task holds
    stay bounded, whatever the network could deliver."""
    monkeypatch.setattr(fetch_shard, "DECODE_BACKLOG_BYTES", 1)  # one body at a time
    release = threading.Event()
    fetched_while_stuck = []

    def handle(index, data, error):
        if not release.is_set():
            time.sleep(0.5)  # the fetch slots fill and wait meanwhile
            fetched_while_stuck.append(server.hits["img"])
            release.set()

    with ImageServer() as server:
        urls = [f"{server.base_url}/img/bound{i}_64x64.jpg" for i in range(20)]
        fetch.run(urls, options(maxInFlight=3, maxPerHost=10), handle, 1)
        assert server.hits["img"] == 20
    # One body being handled, and each of the 3 slots holding the body it fetched.
    assert fetched_while_stuck[0] <= 1 + 3


def test_a_handler_error_ends_the_shard(web):
    def handle(index, data, error):
        if index == 3:
            raise OSError("disk full")

    urls = [f"{web.base_url}/img/err{i}_64x64.jpg" for i in range(40)]
    with pytest.raises(OSError, match="disk full"):
        fetch.run(urls, options(maxInFlight=4), handle, 2)


# --- 2. deadlines -------------------------------------------------------------------------------


def test_a_drip_fed_body_ends_at_the_deadline_as_timeout(web):
    r = fetch_one(f"{web.base_url}/drip/0.5/drip_256x256.jpg", timeout=2)
    assert r.reason == "timeout"
    assert r.seconds < 2 + SLACK
    r = fetch_one(f"{web.base_url}/drip/0.5/drip_256x256.jpg", timeout=1.5, retries=1)
    assert r.reason == "timeout"
    assert 1.5 * 2 - 0.1 <= r.seconds < 1.5 * 2 + SLACK  # each attempt its own deadline


def test_no_url_holds_its_slot_past_its_deadlines_and_backoff(web):
    with Silent() as silent:
        b = web.base_url
        urls = [
            f"{b}/drip/0.3/h1_256x256.jpg",
            f"{silent.base_url}/img/h2_64x64.jpg",
            f"{b}/slow/20/h3_64x64.jpg",
            f"{b}/retry/429/1/100/h4_64x64.jpg",
            f"{b}/hops/3/h5_64x64.jpg",
            f"{b}/bigstream/2000000000/h6",
        ]
        results = fetch_each(urls, timeout=2, retries=1)
    for r in results:
        assert r.seconds < 2 * 2 + SLACK, (r.url, r.seconds, r.reason)
    assert [r.reason for r in results] == ["timeout", "timeout", "timeout", "rate_limited", "ok", "too_large"]


# --- 3. size caps and memory ----------------------------------------------------------------------


def test_content_length_over_the_cap_is_refused_before_reading(web):
    sent = web.bytes_sent["big"]
    r = fetch_one(f"{web.base_url}/big/500000000/cl", maxImageBytes=1 << 20)
    assert r.reason == "too_large" and "Content-Length" in str(r.error)
    time.sleep(0.2)
    assert web.bytes_sent["big"] - sent < 64 << 20  # at most what socket buffers took, not 500 MB


def test_reading_stops_once_the_cap_is_exceeded(web):
    sent = web.bytes_sent["bigstream"]
    r = fetch_one(f"{web.base_url}/bigstream/500000000/nolength", maxImageBytes=1 << 20)
    assert r.reason == "too_large"
    time.sleep(0.2)
    assert web.bytes_sent["bigstream"] - sent < (1 << 20) + (64 << 20)
    assert fetch_one(f"{web.base_url}/big/2000000/under", maxImageBytes=4 << 20).reason == "ok"  # under: read


@pytest.mark.parametrize("fmt", ["jpg", "png", "gif", "webp"])
def test_declared_pixels_over_the_cap_are_refused_before_decoding(web, fmt):
    r = fetch_one(f"{web.base_url}/bomb/b_16000x16000.{fmt}")
    assert r.reason == "too_large" and "256000000 pixels" in str(r.error)
    assert fetch_one(f"{web.base_url}/bomb/b_100x100.{fmt}").reason == "ok"  # small: left to the decoder
    assert fetch_one(f"{web.base_url}/bomb/b_100x100.{fmt}", maxImagePixels=9999).reason == "too_large"


def test_declared_pixels_reads_headers_only():
    for fmt, _extension in [
        ("JPEG", "jpg"),
        ("PNG", "png"),
        ("GIF", "gif"),
        ("WEBP", "webp"),
        ("BMP", "bmp"),
        ("TIFF", "tif"),
    ]:
        buf = io.BytesIO()
        Image.new("RGB", (123, 45)).save(buf, fmt)
        assert declared_pixels(buf.getvalue()) == 123 * 45, fmt
        assert declared_pixels(buf.getvalue()[:200]) in (123 * 45, None), fmt
    lossless = io.BytesIO()
    Image.new("RGBA", (77, 33)).save(lossless, "WEBP", lossless=True)
    assert declared_pixels(lossless.getvalue()) == 77 * 33
    assert declared_pixels(b"<html>not an image</html>") is None


MEMORY_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import pyarrow as pa, pyarrow.parquet as pq
from laion_operator.pipeline.download import download_shard
from laion_operator.pipeline.filter import run_filter
from laion_operator.spec import PartSpec
from laion_operator.storage import Store

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

base, out = sys.argv[2], sys.argv[3]
urls = [f"{base}/bigstream/600000000/a", f"{base}/bigstream/600000000/b", f"{base}/big/600000000/c",
        f"{base}/img/1_640x480.jpg"]
pq.write_table(pa.table({"URL": urls, "TEXT": ["x"] * 4}), out + "/m.parquet")
spec = PartSpec.from_dict({"partId": "m", "source": {"urls": [out + "/m.parquet"]}, "output": {"uri": out + "/o"},
                           "download": {"allowedNetworks": ["127.0.0.0/8"], "timeout": 60}})
run_filter(spec, Store(spec.output))
download_shard(spec, 0, threads=1)  # a first run: everything imported and allocated once
try:
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
except OSError:
    pass
before = status("VmRSS")
stats = download_shard(spec, 0, threads=1)
print(json.dumps({"before": before, "peak": status("VmHWM"), "reasons": stats.failed_by_reason,
                  "ok": stats.successes}))
"""


def test_a_shard_of_huge_bodies_stays_small_in_memory(web, tmp_path):
    """Two 600 MB bodies without Content-Length and one with: the shard's peak memory grows by far less."""
    operator_dir = str(Path(__file__).resolve().parents[2] / "operator")
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, operator_dir, web.base_url, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["reasons"] == {"too_large": 3} and result["ok"] == 1
    growth = result["peak"] - result["before"]
    assert growth < 200 << 20, f"peak memory grew by {growth >> 20} MB"


# --- 4. the address guard -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "192.0.2.5",
        "198.18.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::",
        "2001:db8::1",
        "not-an-address",
    ],
)
def test_guard_refuses_non_public_addresses(address):
    assert not AddressGuard().allows(address)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_guard_allows_public_addresses(address):
    assert AddressGuard().allows(address)


def test_allowed_networks_open_ranges():
    guard = AddressGuard(["10.0.0.0/8", "fd00::/8"])
    assert guard.allows("10.1.2.3") and guard.allows("::ffff:10.1.2.3") and guard.allows("fd00::5")
    assert not guard.allows("192.168.0.1") and not guard.allows("127.0.0.1")


def test_by_default_a_loopback_url_is_blocked_without_connecting(web):
    hits = sum(web.hits.values())
    r = fetch_one(f"{web.base_url}/img/g1_64x64.jpg", allowedNetworks=[])
    assert r.reason == "blocked_address"
    assert sum(web.hits.values()) == hits  # no request reached the server


def test_by_default_a_name_that_resolves_to_loopback_is_blocked(web):
    hits = sum(web.hits.values())
    r = fetch_one(f"http://localhost:{web.port}/img/g2_64x64.jpg", allowedNetworks=[])
    assert r.reason == "blocked_address" and "localhost" in str(r.error)
    assert sum(web.hits.values()) == hits
    assert fetch_one(f"http://localhost:{web.port}/img/g2_64x64.jpg").reason == "ok"  # opened: fetched


def test_a_redirect_into_loopback_is_blocked(web, web2):
    """127.0.0.2 is allowed; it redirects to 127.0.0.1, which is not."""
    target = f"{web.base_url}/img/g3_64x64.jpg"
    hits = sum(web.hits.values())
    allowed = ["127.0.0.2/32"]
    assert fetch_one(f"{web2.base_url}/img/g4_64x64.jpg", allowedNetworks=allowed).reason == "ok"
    r = fetch_one(f"{web2.base_url}/to/{quote(target, safe='')}", allowedNetworks=allowed)
    assert r.reason == "blocked_address"
    assert sum(web.hits.values()) == hits
    assert web2.hits["to"] >= 1
    r = fetch_one(
        f"http://localhost:{web2.port}/img/g5_64x64.jpg".replace("localhost", "127.0.0.2"), allowedNetworks=allowed
    )
    assert r.reason == "ok"


def test_only_http_and_https_are_fetched(tmp_path):
    image = tmp_path / "secret.jpg"
    Image.new("RGB", (64, 64)).save(image)
    for url in [
        image.as_uri(),
        "ftp://example.com/a.jpg",
        "data:image/png;base64,AAAA",
        "gopher://x/",
        "/relative.jpg",
        "http:///no-host.jpg",
        "not a url at all",
    ]:
        r = fetch_one(url)
        assert r.reason == "bad_url", (url, r.reason)
        assert r.seconds < 1


def test_guard_applies_to_every_redirect_hop_and_scheme(web):
    r = fetch_one(f"{web.base_url}/to/{quote('file:///etc/hostname', safe='')}")
    assert r.reason == "bad_url"
    r = fetch_one(f"{web.base_url}/to/{quote('http://169.254.169.254/latest/meta-data/', safe='')}")
    assert r.reason == "blocked_address"


# --- 5. redirects ---------------------------------------------------------------------------------


def test_redirects_are_limited_and_loops_caught(web, web2):
    b = web.base_url
    assert fetch_one(f"{b}/hops/5/r1_64x64.jpg").reason == "ok"
    assert fetch_one(f"{b}/hops/6/r1_64x64.jpg").reason == "redirect"
    assert fetch_one(f"{b}/hops/2/r1_64x64.jpg", maxRedirects=2).reason == "ok"
    assert fetch_one(f"{b}/redirect/r2_64x64.jpg", maxRedirects=0).reason == "redirect"
    r = fetch_one(f"{b}/loop/r3")
    assert r.reason == "redirect" and "loop" in str(r.error)
    # Hops on other hosts count too: A -> B -> A, then 3 more.
    chain = f"{b}/to/" + quote(f"{web2.base_url}/to/" + quote(f"{b}/hops/3/r4_64x64.jpg", safe=""), safe="")
    assert fetch_one(chain, maxRedirects=5).reason == "ok"
    assert fetch_one(chain, maxRedirects=4).reason == "redirect"


# --- 6. politeness --------------------------------------------------------------------------------


def test_at_most_max_per_host_connections_at_once():
    with ImageServer() as server:
        urls = [f"{server.base_url}/slow/0.3/p{i}_64x64.jpg" for i in range(15)]
        results, _ = run_shard(urls, maxInFlight=15, maxPerHost=3)
        assert all(r.reason == "ok" for r in results.values())
        assert server.peak_active == 3


def test_a_busy_host_does_not_hold_up_other_hosts(web, web2):
    slow = [f"{web.base_url}/slow/1/q{i}_64x64.jpg" for i in range(12)]
    fast = [f"{web2.base_url}/img/q{i}_64x64.jpg" for i in range(3)]
    results, _ = run_shard(slow + fast, maxInFlight=6, maxPerHost=3)
    assert all(r.reason == "ok" for r in results.values())
    assert max(results[i].seconds for i in range(12, 15)) < 1  # not behind the first host's 4 s
    assert max(results[i].seconds for i in range(12)) >= 4 - 0.2  # 12 x 1 s, 3 at a time


def test_retry_after_is_honoured(web):
    r = fetch_one(f"{web.base_url}/retry/429/1/2/ra1_64x64.jpg", timeout=5)
    assert r.reason == "ok" and r.seconds >= 2 - 0.1  # waited as asked, twice
    assert fetch_one(f"{web.base_url}/retry/503/1/1/ra2_64x64.jpg", timeout=5).reason == "ok"
    assert fetch_one(f"{web.base_url}/retry/429/-/1/ra3_64x64.jpg", timeout=5).reason == "ok"  # backoff
    date = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)).strftime(
        "%a, %d %b %Y %H:%M:%S GMT"
    )
    assert fetch_engine.retry_after(date, 0) == pytest.approx(2, abs=1.1)


def test_rate_limits_past_the_budget_are_rate_limited(web):
    r = fetch_one(f"{web.base_url}/retry/429/1/1000/rl1_64x64.jpg", timeout=3)
    assert r.reason == "rate_limited" and r.seconds < 3 + SLACK
    r = fetch_one(f"{web.base_url}/retry/429/3600/1/rl2_64x64.jpg", timeout=3)
    assert r.reason == "rate_limited" and r.seconds < 1  # no point waiting an hour


def test_a_host_that_never_answers_is_marked_dead():
    with Silent() as silent:
        urls = [f"{silent.base_url}/img/d{i}_64x64.jpg" for i in range(8)]
        results, seconds = run_shard(urls, maxInFlight=1, timeout=1)
    reasons = [results[i].reason for i in range(8)]
    assert reasons == ["timeout"] * 3 + ["connection"] * 5
    assert all("not answering" in str(results[i].error) for i in range(3, 8))
    assert seconds < 3 * 1 + SLACK


def test_a_host_that_refuses_is_marked_dead():
    address = refused_address()
    urls = [f"http://{address}/img/e{i}_64x64.jpg" for i in range(6)]
    results, _ = run_shard(urls, maxInFlight=1)
    assert [results[i].reason for i in range(6)] == ["connection"] * 6
    assert sum("not answering" in str(results[i].error) for i in range(6)) == 3


def test_a_live_host_with_slow_urls_is_not_marked_dead(web):
    urls = []
    for i in range(6):
        urls += [f"{web.base_url}/slow/5/s{i}_64x64.jpg", f"{web.base_url}/img/live{i}_64x64.jpg"]
    results, _ = run_shard(urls, maxInFlight=8, maxPerHost=8, timeout=1)
    assert [results[i].reason for i in range(len(urls))] == ["timeout", "ok"] * 6


# --- 7. DNS ---------------------------------------------------------------------------------------


class TinyDNS:
    """A DNS server on loopback UDP answering A queries for `records` (name -> IPv4), NXDOMAIN otherwise."""

    def __init__(self, records: dict[str, str]):
        self.records = {k.lower(): v for k, v in records.items()}
        self.queries: list[tuple[str, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                data, peer = self.sock.recvfrom(2048)
            except OSError:
                return
            qid = struct.unpack(">H", data[:2])[0]
            i, labels = 12, []
            while data[i]:
                labels.append(data[i + 1 : i + 1 + data[i]].decode())
                i += 1 + data[i]
            qtype = struct.unpack(">H", data[i + 1 : i + 3])[0]
            name = ".".join(labels).lower()
            self.queries.append((name, qtype))
            ip = self.records.get(name)
            answer = b""
            if ip and qtype == 1:
                answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
            flags = 0x8180 | (0 if ip else 3)
            header = struct.pack(">HHHHHH", qid, flags, 1, 1 if answer else 0, 0, 0)
            self.sock.sendto(header + data[12 : i + 5] + answer, peer)

    def close(self):
        self.sock.close()


@pytest.fixture
def dns():
    server = TinyDNS({"images.example": "127.0.0.1", "private.example": "10.9.8.7"})
    yield server
    server.close()


def test_dns_servers_resolve_and_answers_are_cached(web, dns):
    urls = [f"http://images.example:{web.port}/img/n{i}_64x64.jpg" for i in range(10)]
    results = fetch_each(urls, dnsServers=[dns.address])
    assert [r.reason for r in results] == ["ok"] * 10
    assert fetch_each.engine.resolver.lookups == 1
    assert {q for q, _ in dns.queries} == {"images.example"}
    assert sum(t == 1 for _, t in dns.queries) == 1  # one A query for ten URLs


def test_dns_failures_count_as_dns(web, dns):
    results = fetch_each([f"http://nowhere.example:{web.port}/img/x_64x64.jpg"] * 3, dnsServers=[dns.address])
    assert [r.reason for r in results] == ["dns"] * 3
    assert fetch_each.engine.resolver.lookups == 1  # the failure is remembered too


def test_a_dns_answer_is_checked_by_the_guard(web, dns):
    r = fetch_one(f"http://images.example:{web.port}/img/y_64x64.jpg", dnsServers=[dns.address], allowedNetworks=[])
    assert r.reason == "blocked_address"
    r = fetch_one("http://private.example/img/y_64x64.jpg", dnsServers=[dns.address], allowedNetworks=[])
    assert r.reason == "blocked_address" and "10.9.8.7" in str(r.error)


def test_the_system_resolver_is_cached_per_task(web):
    results = fetch_each([f"http://localhost:{web.port}/img/z{i}_64x64.jpg" for i in range(5)])
    assert [r.reason for r in results] == ["ok"] * 5
    assert fetch_each.engine.resolver.lookups == 1


def test_spec_checks_networks_and_dns_servers():
    with pytest.raises(SpecError, match=r"allowedNetworks\[1\]: 'ten' is not a network"):
        options(allowedNetworks=["10.0.0.0/8", "ten"])
    with pytest.raises(SpecError, match=r"dnsServers\[0\]: 'dns.google' is not an IP address"):
        options(dnsServers=["dns.google"])
    assert options(dnsServers=["1.1.1.1", "127.0.0.1:5353", "[2606:4700:4700::1111]:53", "::1"]).dns_servers
    defaults = PartSpec.from_dict({"partId": "t", "source": {"urls": ["m"]}, "output": {"uri": "o"}}).download
    assert defaults.allowed_networks == () and defaults.max_image_bytes == 32 << 20 and defaults.max_redirects == 5
    assert not defaults.respect_robots_txt


# --- 9. opt-out -----------------------------------------------------------------------------------


def test_robots_txt_is_respected_when_asked_and_fetched_once():
    robots = "User-agent: img2dataset\nDisallow: /small/\n\nUser-agent: *\nDisallow:\n"
    with ImageServer(robots=robots) as server:
        urls = [f"{server.base_url}/img/o{i}_64x64.jpg" for i in range(5)]
        urls += [f"{server.base_url}/small/o{i}_64x64.jpg" for i in range(5)]
        results = fetch_each(urls, respectRobotsTxt=True)
        assert [r.reason for r in results] == ["ok"] * 5 + ["opt_out"] * 5
        assert server.hits["robots"] == 1
        assert [r.reason for r in fetch_each(urls)] == ["ok"] * 10  # off by default: not even fetched
        assert server.hits["robots"] == 1


def test_robots_txt_errors_follow_rfc_9309():
    with ImageServer(robots=503) as server:
        assert fetch_one(f"{server.base_url}/img/o_64x64.jpg", respectRobotsTxt=True).reason == "opt_out"
    with ImageServer(robots=None) as server:  # 404: everything allowed
        assert fetch_one(f"{server.base_url}/img/o_64x64.jpg", respectRobotsTxt=True).reason == "ok"
    with Silent() as silent:  # unreachable: the image's own fetch says what is wrong
        r = fetch_one(f"{silent.base_url}/img/o_64x64.jpg", respectRobotsTxt=True, timeout=1)
        assert r.reason == "timeout" and r.seconds < 2 * 1 + SLACK


def test_x_robots_tag_still_opts_out(web):
    assert fetch_one(f"{web.base_url}/noai/x_64x64.jpg").reason == "opt_out"
    assert fetch_one(f"{web.base_url}/noai/x_64x64.jpg", disallowedHeaderDirectives=[]).reason == "ok"


# --- 10. TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fakeweb")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(folder / "cert.pem"), str(folder / "key.pem")


def test_broken_certificates_are_tls_unless_verification_is_off(tls_files):
    with ImageServer(tls=tls_files) as server:
        url = f"{server.base_url}/img/t_64x64.jpg"
        assert url.startswith("https://")
        assert fetch_one(url, timeout=5).reason == "tls"
        assert fetch_one(url, timeout=5, verifyTls=False).reason == "ok"


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["noai"],
        ["NoAI, noindex"],
        ["nofollow"],
        ["img2dataset: noai"],
        ["otherbot: noai"],
        ["otherbot: noai", "img2dataset: noimageai"],
        ["unavailable_after: 25 Jun 2010 15:00:00 PST"],
        ["all"],
        ["noimageindex,nofollow"],
        ["IMG2DATASET: noai"],
    ],
)
def test_x_robots_tag_is_read_as_img2dataset_reads_it(values):
    from email.message import Message

    from img2dataset.downloader import is_disallowed

    from laion_operator.pipeline.fetch import robots_tag_disallows

    headers = Message()
    for value in values:
        headers["X-Robots-Tag"] = value
    directives = ["noai", "noimageai", "noindex", "noimageindex"]
    ours = robots_tag_disallows(values, "img2dataset", directives)
    assert ours == is_disallowed(headers, "img2dataset", directives)
    assert ours == (
        values not in ([], ["nofollow"], ["otherbot: noai"], ["all"], ["unavailable_after: 25 Jun 2010 15:00:00 PST"])
    )
