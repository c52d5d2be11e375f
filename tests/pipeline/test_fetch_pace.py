"""A body's pace (pipeline/fetch/pace.py, download.minBodyRate): a large image served slowly but steadily
is kept past the attempt's `timeout`, as a per-read timeout keeps it; a drip-fed or too slow body ends
within the first window, as the old whole-request deadline ended it; no URL holds its slot past the
documented bound, timeout + size / minBodyRate from its request.

Times are asserted as bounds only, never as speed.
"""

from __future__ import annotations

import pytest

from laion_operator.pipeline.fetch.pace import Pace, body_limit
from tests.pipeline.test_fetch import SLACK, fetch_each, fetch_one
from tests.support.failing_web import ImageServer, Silent, outcome_of


@pytest.fixture(scope="module")
def web():
    with ImageServer(host="127.0.0.3") as server:
        yield server


def test_the_window_is_curls_low_speed_limit():
    pace = Pace(rate=10, window=1.0, start=0.0)
    assert pace.deadline == 1.0  # nothing yet: the first window ends a window after the request
    pace.add(0.5, 5)
    assert pace.deadline == 1.0  # 5 of the 10 bytes (0, 1] needs
    pace.add(0.9, 6)
    assert pace.deadline == 1.5  # (0.5, 1.5] would hold 6 bytes: under 10
    pace.add(1.4, 20)
    assert pace.deadline == 2.4  # only the newest read's 20 bytes are past the floor: it leaves at 2.4
    assert body_limit(10, 16384 * 50, 16384) == 60


def test_a_slow_but_steady_body_longer_than_the_timeout_is_kept(web):
    # 600 kB at 200 kB/s: 3 s of body, three times the attempt's timeout, at 12x the minimum rate.
    url = f"{web.base_url}/steady/200000/600000/st_256x256.jpg"
    r = fetch_one(url, timeout=1)
    assert r.reason == "ok", r.error
    assert len(r.data) == 600000
    assert r.seconds > 2  # longer than the old whole-request deadline allowed
    assert outcome_of(url, timeout=1) == "ok"


def test_a_body_below_the_minimum_rate_ends_within_a_window(web):
    url = f"{web.base_url}/steady/4000/600000/sl_256x256.jpg"  # 4 kB/s: 150 s of body
    r = fetch_one(url, timeout=1)
    assert r.reason == "timeout" and "minBodyRate" in str(r.error)
    assert r.seconds < 1 + SLACK
    assert outcome_of(url, timeout=1) == "timeout"
    # the same body kept by a lower minimum rate, in its window (the first second needs 3 kB)
    r = fetch_one(url.replace("600000", "12000"), timeout=1, minBodyRate=3000)
    assert r.reason == "ok", r.error


def test_a_drip_fed_body_ends_within_a_window_however_long_its_limit(web):
    # A byte every 0.5 s of a 256x256 JPEG at a minimum of 16 B/s: its limit (timeout + size / rate)
    # is minutes, the window (32 bytes in every 2 s) ends it with the first one, at `timeout`.
    r = fetch_one(f"{web.base_url}/drip/0.5/dr_256x256.jpg", timeout=2, minBodyRate=16)
    assert r.reason == "timeout" and "minBodyRate" in str(r.error)
    assert r.seconds < 2 + SLACK


def test_no_url_holds_its_slot_past_its_bound(web):
    timeout, rate = 1.0, 16384
    with Silent(host="127.0.0.3") as silent:
        b = web.base_url
        urls = {
            f"{b}/steady/100000/400000/b1_256x256.jpg": 400000,  # kept: 4 s
            f"{b}/steady/20000/60000/b2_256x256.jpg": 60000,  # kept: 20 kB/s is above the minimum
            f"{b}/steady/2000/400000/b3_256x256.jpg": 400000,  # too slow
            f"{b}/drip/0.3/b4_256x256.jpg": 1 << 20,
            f"{silent.base_url}/img/b5_64x64.jpg": 0,
            f"{b}/slow/20/b6_64x64.jpg": 0,
            f"{b}/bigstream/2000000000/b7": 32 << 20,
        }
        results = fetch_each(list(urls), timeout=timeout, minBodyRate=rate)
    for r in results:
        bound = body_limit(timeout, urls[r.url], rate)
        assert r.seconds < bound + SLACK, (r.url, r.seconds, r.reason)
    assert [r.reason for r in results] == ["ok", "ok", "timeout", "timeout", "timeout", "timeout", "too_large"]
    assert [r.reason for r in results][:4] == [outcome_of(u, timeout=timeout) for u in list(urls)[:4]]
