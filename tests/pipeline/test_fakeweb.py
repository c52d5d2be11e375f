"""The fake web answers real HTTP requests the way its URL says, and outcome_of predicts it."""

import http.client
import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from tests.support.failing_web import ImageServer, outcome_of

OPERATOR_DIR = Path(__file__).resolve().parents[2] / "operator"


@pytest.fixture(scope="module")
def server():
    with ImageServer() as s:
        yield s


def get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read(), r.geturl()


def classify(url, timeout, min_image_size=0, max_aspect_ratio=None):
    """What a urllib client (like img2dataset) observes, in the failure vocabulary of outcome_of."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            if "noai" in r.headers.get("X-Robots-Tag", ""):
                return "opt_out"
            body = r.read()
    except urllib.error.HTTPError as e:
        return f"http_{e.code // 100}xx"
    except TimeoutError:
        return "timeout"
    except urllib.error.URLError as e:
        return "timeout" if isinstance(e.reason, (TimeoutError, socket.timeout)) else "connection"
    except http.client.IncompleteRead:
        return "decode"
    except (http.client.RemoteDisconnected, ConnectionError):
        return "connection"
    try:
        img = Image.open(io.BytesIO(body))
        img.load()
    except Exception:  # noqa: BLE001 - whatever Pillow raises, the image does not decode
        return "decode"
    w, h = img.size
    if min(w, h) < min_image_size:
        return "too_small"
    if max_aspect_ratio is not None and max(w, h) / min(w, h) > max_aspect_ratio:
        return "aspect_ratio"
    return "ok"


@pytest.mark.parametrize(
    "fmt,pil_format,ctype", [("jpg", "JPEG", "image/jpeg"), ("png", "PNG", "image/png"), ("webp", "WEBP", "image/webp")]
)
def test_img_serves_decodable_image_of_the_declared_size(server, fmt, pil_format, ctype):
    status, headers, body, _ = get(f"{server.base_url}/img/7_321x123.{fmt}")
    assert status == 200
    assert headers["Content-Type"] == ctype
    assert int(headers["Content-Length"]) == len(body)
    img = Image.open(io.BytesIO(body))
    assert (img.format, img.size) == (pil_format, (321, 123))


def test_images_are_deterministic_per_id_and_photo_sized(server):
    a = get(f"{server.base_url}/img/42_1024x768.jpg")[2]
    server.cache.clear()  # force a re-render rather than a cache hit
    b = get(f"{server.base_url}/img/42_1024x768.jpg")[2]
    c = get(f"{server.base_url}/img/43_1024x768.jpg")[2]
    assert a == b
    assert a != c
    assert 50_000 < len(a) < 600_000  # a JPEG photo, not a flat 10 KB block
    assert get(f"{server.base_url}/small/42_1024x768.jpg")[2] == a


def test_cache_stays_within_its_byte_budget():
    with ImageServer(cache_bytes=300_000) as s:
        for i in range(12):
            get(f"{s.base_url}/img/{i}_400x300.jpg")
        assert 0 < s.cache.nbytes <= 300_000
        assert 0 < len(s.cache) < 12


def test_redirect_lands_on_the_image(server):
    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(f"{server.base_url}/redirect/5_200x100.png", timeout=5)
    assert e.value.code == 302 and e.value.headers["Location"] == "/img/5_200x100.png"
    status, _, body, final = get(f"{server.base_url}/redirect/5_200x100.png")
    assert status == 200 and final.endswith("/img/5_200x100.png")
    assert body == get(f"{server.base_url}/img/5_200x100.png")[2]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_noai_sends_robots_header_with_a_real_image(server):
    status, headers, body, _ = get(f"{server.base_url}/noai/9_300x200.jpg")
    assert status == 200
    assert headers["X-Robots-Tag"] == "noai, noimageai"
    assert Image.open(io.BytesIO(body)).size == (300, 200)


def test_truncated_declares_full_length_but_sends_half(server):
    full = get(f"{server.base_url}/img/11_800x600.jpg")[2]
    with urllib.request.urlopen(f"{server.base_url}/truncated/11_800x600.jpg", timeout=5) as r:
        assert int(r.headers["Content-Length"]) == len(full)
        with pytest.raises(http.client.IncompleteRead) as e:
            r.read()
    assert e.value.partial == full[: len(full) // 2]


def test_garbage_is_labelled_jpeg_but_is_not_an_image(server):
    status, headers, body, _ = get(f"{server.base_url}/garbage/whatever.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and len(body) > 1000
    with pytest.raises(OSError):  # Pillow: UnidentifiedImageError or a truncated image
        Image.open(io.BytesIO(body)).load()


@pytest.mark.parametrize("code", [403, 404, 410, 500, 502, 503])
def test_status_returns_that_code(server, code):
    with pytest.raises(urllib.error.HTTPError) as e:
        get(f"{server.base_url}/status/{code}/x.jpg")
    assert e.value.code == code


@pytest.mark.parametrize(
    "path,code",
    [
        ("/nowhere/1_10x10.jpg", 404),
        ("/img/not-a-spec.jpg", 404),
        ("/img/1_10x10.gif", 404),
        ("/img/1_9000x10.jpg", 400),
        ("/img/1_0x10.jpg", 400),
        ("/status/200/x", 400),
        ("/slow/abc/x", 400),
    ],
)
def test_malformed_paths_are_client_errors(server, path, code):
    with pytest.raises(urllib.error.HTTPError) as e:
        get(server.base_url + path)
    assert e.value.code == code
    assert outcome_of(server.base_url + path) == "http_4xx"


def test_slow_delays_then_serves_and_times_out_short_clients(server):
    t = time.monotonic()
    status, _, body, _ = get(f"{server.base_url}/slow/0.4/3_64x48.jpg", timeout=3)
    assert time.monotonic() - t >= 0.4
    assert Image.open(io.BytesIO(body)).size == (64, 48)
    t = time.monotonic()
    with pytest.raises((TimeoutError, socket.timeout)):
        get(f"{server.base_url}/slow/5/3_64x48.jpg", timeout=0.3)
    assert time.monotonic() - t < 2


def test_reset_closes_without_answering(server):
    with pytest.raises(http.client.RemoteDisconnected):
        get(f"{server.base_url}/reset/x")


def test_outcome_of_rules():
    u = "http://127.0.0.1:1"
    assert outcome_of(f"{u}/img/1_500x400.jpg") == "ok"
    assert outcome_of(f"{u}/img/1_500x400.jpg", min_image_size=401) == "too_small"
    assert outcome_of(f"{u}/img/1_500x400.jpg", min_image_size=400) == "ok"
    assert outcome_of(f"{u}/img/1_1000x200.jpg", max_aspect_ratio=4) == "aspect_ratio"
    assert outcome_of(f"{u}/redirect/1_50x50.png", min_image_size=64) == "too_small"
    assert outcome_of(f"{u}/slow/3/1_500x400.jpg", timeout=2) == "timeout"
    assert outcome_of(f"{u}/slow/3/1_500x400.jpg", timeout=10) == "ok"
    assert outcome_of(f"{u}/slow/999/x", timeout=29) == "timeout"  # clamped to 30 s
    assert outcome_of(f"{u}/slow/999/x", timeout=31) == "ok"
    assert outcome_of(f"{u}/noai/1_10x10.jpg", min_image_size=64) == "opt_out"  # header checked first
    assert outcome_of(f"{u}/truncated/1_500x400.jpg") == "decode"
    assert outcome_of(f"{u}/garbage/anything?q=1") == "decode"
    assert outcome_of(f"{u}/status/404/a") == "http_4xx"
    assert outcome_of(f"{u}/status/503/a") == "http_5xx"
    assert outcome_of(f"{u}/reset/a") == "connection"


def test_outcome_of_agrees_with_a_real_client(server):
    b = server.base_url
    urls = [
        f"{b}/img/1_640x480.jpg",
        f"{b}/img/2_90x200.png",
        f"{b}/img/3_1000x200.webp",
        f"{b}/small/4_32x32.jpg",
        f"{b}/redirect/5_300x300.jpg",
        f"{b}/redirect/6_50x80.png",
        f"{b}/noai/7_400x400.jpg",
        f"{b}/noai/8_20x20.png",
        f"{b}/truncated/9_600x400.jpg",
        f"{b}/garbage/10.jpg",
        f"{b}/status/404/11.jpg",
        f"{b}/status/403/12.jpg",
        f"{b}/status/500/13.jpg",
        f"{b}/status/503/14.jpg",
        f"{b}/slow/0.1/15_200x200.jpg",
        f"{b}/slow/3/16_200x200.jpg",
        f"{b}/slow/2/garbage",
        f"{b}/reset/17",
        f"{b}/nope/18",
        f"{b}/img/19_8192x8192.jpg",
    ]
    settings = dict(timeout=1.0, min_image_size=100, max_aspect_ratio=3)
    with ThreadPoolExecutor(len(urls)) as pool:
        observed = list(pool.map(lambda u: classify(u, **settings), urls))
    expected = [outcome_of(u, **settings) for u in urls]
    assert observed == expected
    assert set(expected) == {
        "ok",
        "too_small",
        "aspect_ratio",
        "opt_out",
        "decode",
        "http_4xx",
        "http_5xx",
        "timeout",
        "connection",
    }


def test_hundreds_of_concurrent_connections(server):
    urls = [f"{server.base_url}/slow/0.3/c{i % 20}_64x64.jpg" for i in range(300)]
    t = time.monotonic()
    with ThreadPoolExecutor(300) as pool:
        statuses = list(pool.map(lambda u: get(u, timeout=10)[0], urls))
    assert statuses == [200] * 300
    assert time.monotonic() - t < 8  # served concurrently, not 300 x 0.3 s in a row


def test_hits_are_counted_per_route():
    with ImageServer() as s:
        get(f"{s.base_url}/img/1_10x10.jpg")
        get(f"{s.base_url}/redirect/1_10x10.jpg")
        assert s.hits == {"img": 2, "redirect": 1}


def test_stop_does_not_wait_for_slow_requests():
    s = ImageServer().start()
    pool = ThreadPoolExecutor(1)
    pending = pool.submit(classify, f"{s.base_url}/slow/20/x", 30)
    time.sleep(0.3)
    t = time.monotonic()
    s.stop()
    assert time.monotonic() - t < 2
    assert pending.result(timeout=5) == "connection"
    pool.shutdown()


def test_cli_serves_until_killed():
    env = dict(os.environ, PYTHONPATH=str(OPERATOR_DIR))
    proc = subprocess.Popen(
        [sys.executable, "-m", "laion_operator.testbed.fakeweb", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        base = proc.stdout.readline().strip()
        assert base.startswith("http://127.0.0.1:")
        assert Image.open(io.BytesIO(get(f"{base}/img/1_30x20.jpg")[2])).size == (30, 20)
    finally:
        proc.kill()
        proc.wait()


def test_new_failure_routes_behave_as_documented(server):
    from urllib.parse import quote

    from tests.support.failing_web import Silent, refused_address

    b = server.base_url
    opener = urllib.request.build_opener(NoRedirect)
    for path, location in [
        ("/loop/x", "/loop/x"),
        ("/hops/2/1_10x10.jpg", "/hops/1/1_10x10.jpg"),
        ("/hops/1/1_10x10.jpg", "/hops/0/1_10x10.jpg"),
        (f"/to/{quote('file:///etc/passwd', safe='')}", "file:///etc/passwd"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as e:
            opener.open(b + path, timeout=5)
        assert e.value.code == 302 and e.value.headers["Location"] == location
    assert get(f"{b}/hops/0/1_10x10.jpg")[2] == get(f"{b}/img/1_10x10.jpg")[2]
    status, headers, body, _ = get(f"{b}/big/100000/x")
    assert int(headers["Content-Length"]) == len(body) == 100000 and body[:2] == b"\xff\xd8"
    with urllib.request.urlopen(f"{b}/bigstream/70000/x", timeout=5) as r:
        assert "Content-Length" not in r.headers and len(r.read()) == 70000
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        for fmt, size in [("jpg", (40000, 30000)), ("png", (40000, 30000))]:
            body = get(f"{b}/bomb/1_{size[0]}x{size[1]}.{fmt}")[2]
            assert len(body) < 100 and Image.open(io.BytesIO(body)).size == size
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    webp = get(f"{b}/bomb/1_16000x9000.webp")[2]  # a VP8X header: canvas width - 1, height - 1
    assert webp[12:16] == b"VP8X" and webp[24:30] == (15999).to_bytes(3, "little") + (8999).to_bytes(3, "little")
    gif = get(f"{b}/bomb/1_40000x30000.gif")[2]
    assert gif[:6] == b"GIF89a" and gif[6:10] == (40000).to_bytes(2, "little") + (30000).to_bytes(2, "little")
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as e:
            get(f"{b}/retry/429/7/2/ra_10x10.jpg")
        assert e.value.code == 429 and e.value.headers["Retry-After"] == "7"
    assert get(f"{b}/retry/429/7/2/ra_10x10.jpg")[0] == 200
    t = time.monotonic()
    with pytest.raises((TimeoutError, socket.timeout)):
        get(f"{b}/drip/1/2_64x64.jpg", timeout=0.5)  # headers at once, then a byte a second
    assert time.monotonic() - t < 3
    with pytest.raises(urllib.error.URLError):
        get(f"http://{refused_address()}/img/1_10x10.jpg")
    with Silent() as silent, pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        get(f"{silent.base_url}/img/1_10x10.jpg", timeout=0.5)


def test_outcome_of_new_routes():
    u = "http://127.0.0.1:1"
    assert outcome_of(f"{u}/loop/a") == "redirect"
    assert outcome_of(f"{u}/hops/5/1_100x100.jpg") == "ok"
    assert outcome_of(f"{u}/hops/6/1_100x100.jpg") == "redirect"
    assert outcome_of(f"{u}/hops/2/1_100x100.jpg", max_redirects=1) == "redirect"
    assert outcome_of(f"{u}/drip/1/1_100x100.jpg") == "timeout"
    assert outcome_of(f"{u}/big/40000000/x") == "too_large"
    assert outcome_of(f"{u}/bigstream/1000/x") == "decode"
    assert outcome_of(f"{u}/bomb/1_20000x20000.png") == "too_large"
    assert outcome_of(f"{u}/bomb/1_200x200.png") == "decode"
    assert outcome_of(f"{u}/retry/429/1/2/1_100x100.jpg", timeout=5) == "ok"
    assert outcome_of(f"{u}/retry/429/1/100/1_100x100.jpg", timeout=5) == "rate_limited"
    assert outcome_of(f"{u}/retry/503/-/1/1_100x100.jpg") == "http_5xx"
    assert outcome_of(f"{u}/to/http%3A%2F%2F127.0.0.1%3A1%2Fstatus%2F404%2Fx") == "http_4xx"
    assert outcome_of("file:///etc/passwd") == "bad_url"
