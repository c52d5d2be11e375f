"""The opt-outs (pipeline/fetch/): TDMRep's `tdm-reservation` header and /.well-known/tdmrep.json,
X-Robots-Tag's noml beside noai/noimageai, robots.txt, each counted by the rule that refused the image;
and the User-Agent a server sees."""

from __future__ import annotations

import json
from collections import Counter
from urllib.parse import quote

import pytest

from laion_operator import __version__
from laion_operator.contract import OPT_OUT_RULES, Progress, ShardStats
from laion_operator.pipeline.fetch import tdmrep
from laion_operator.spec import PartSpec
from laion_operator.summary import Summary
from tests.pipeline.test_fetch import SLACK, download_one_shard, fetch_each, fetch_one
from tests.support.failing_web import ImageServer, outcome_of

RULES = json.dumps(
    [
        {"location": "/img/private*", "tdm-reservation": 1, "tdm-policy": "https://example.com/policy.json"},
        {"location": "/img/*", "tdm-reservation": 0},
        {"location": "/small/*.png$", "tdm-reservation": 1},
    ]
)


@pytest.fixture(scope="module")
def web():
    with ImageServer(host="127.0.0.4") as server:
        yield server


def rules_of(error) -> str | None:
    return error.rule if error is not None else None


def test_tdm_reservation_header_opts_out_unless_turned_off(web):
    reserved, free = f"{web.base_url}/tdm/1/t_64x64.jpg", f"{web.base_url}/tdm/0/t_64x64.jpg"
    r = fetch_one(reserved)
    assert (r.reason, r.error.rule) == ("opt_out", "tdm_reservation")
    assert "tdm-reservation" in str(r.error)
    assert fetch_one(free).reason == "ok"
    assert fetch_one(reserved, respectTdmRep=False).reason == "ok"
    assert [outcome_of(reserved), outcome_of(free)] == ["opt_out", "ok"]


@pytest.mark.parametrize(
    "value, reason",
    [("noml", "opt_out"), ("img2dataset: noml", "opt_out"), ("otherbot: noml", "ok"), ("noarchive", "ok")],
)
def test_noml_opts_out_beside_noai(web, value, reason):
    url = f"{web.base_url}/xrobots/{quote(value, safe='')}/x_64x64.jpg"
    r = fetch_one(url)
    assert r.reason == reason and rules_of(r.error) == ("x_robots_tag" if reason == "opt_out" else None)
    assert outcome_of(url) == reason
    assert fetch_one(url, disallowedHeaderDirectives=["noai", "noimageai"]).reason == "ok"  # turned off


def test_tdmrep_json_is_fetched_once_per_host_and_its_first_matching_rule_decides():
    with ImageServer(host="127.0.0.5", tdmrep=RULES) as server:
        b = server.base_url
        urls = [
            f"{b}/img/private-1_64x64.jpg",  # rule 1: reserved
            f"{b}/img/public_64x64.jpg",  # rule 2: not reserved
            f"{b}/small/a_64x64.png",  # rule 3: reserved
            f"{b}/small/a_64x64.jpg",  # no rule: not reserved
            f"{b}/img/private-2_64x64.jpg",
        ]
        results = fetch_each(urls)
        assert [r.reason for r in results] == ["opt_out", "ok", "opt_out", "ok", "opt_out"]
        assert {r.error.rule for r in results if r.error} == {"tdmrep_json"}
        assert "/img/private*" in str(results[0].error) and "tdmrep.json" in str(results[0].error)
        assert server.hits["tdmrep"] == 1
        assert [r.reason for r in fetch_each(urls, respectTdmRep=False)] == ["ok"] * 5  # not even fetched
        assert server.hits["tdmrep"] == 1


@pytest.mark.parametrize(
    "served",
    [404, 500, "not json", json.dumps({"location": "/", "tdm-reservation": 1}), " " * (70 << 10) + RULES],
    ids=["404", "500", "garbage", "not-an-array", "over-64KiB"],
)
def test_a_tdmrep_json_that_says_nothing_reserves_nothing(served):
    with ImageServer(host="127.0.0.6", tdmrep=served) as server:
        r = fetch_one(f"{server.base_url}/img/private_64x64.jpg", timeout=2)
        assert r.reason == "ok" and r.seconds < 2 + SLACK
        assert server.hits["tdmrep"] == 1


def test_tdmrep_locations_read_as_robots_txt_patterns():
    rules = tdmrep.parse(200, RULES.encode())
    assert rules is not None
    assert rules.reserving("/img/private/deep/x.jpg").location == "/img/private*"
    assert rules.reserving("/img/x.jpg") is None  # the first match, rule 2, reserves nothing
    assert rules.reserving("/small/x.png").location == "/small/*.png$"
    assert rules.reserving("/small/x.png?v=2") is None  # `$`: the path ends there
    assert rules.reserving("/other") is None


def test_the_user_agent_names_the_project_and_no_browser(web):
    web.agents.clear()
    assert fetch_one(f"{web.base_url}/img/ua_64x64.jpg").reason == "ok"
    agent = f"laion-operator/{__version__} (+https://laion-operator.io; compatible; img2dataset)"
    assert set(web.agents) == {agent}  # the image, and the site's tdmrep.json
    web.agents.clear()
    fetch_one(f"{web.base_url}/img/ua_64x64.jpg", userAgent="my-crawler/1.0 (+mailto:me@example.com)")
    assert set(web.agents) == {"my-crawler/1.0 (+mailto:me@example.com)"}


def test_each_refusal_is_counted_by_its_rule_in_shard_stats_and_summary(tmp_path):
    """download_shard (no Ray) and the summary's counts: `opt_out` split by OPT_OUT_RULES."""
    from laion_operator.pipeline.annotate import written

    robots = "User-agent: img2dataset\nDisallow: /small/\n"
    with ImageServer(host="127.0.0.7", tdmrep=RULES, robots=robots) as server:
        b = server.base_url
        urls = [
            f"{b}/img/ok_64x64.jpg",
            f"{b}/tdm/1/t_64x64.jpg",
            f"{b}/xrobots/noml/x_64x64.jpg",
            f"{b}/noai/n_64x64.jpg",
            f"{b}/img/private_64x64.jpg",
            f"{b}/small/r_64x64.jpg",
        ]
        stats, _ = download_one_shard(urls, tmp_path, respectRobotsTxt=True)
    want = {"tdm_reservation": 1, "x_robots_tag": 2, "tdmrep_json": 1, "robots_txt": 1}
    assert stats.failed_by_reason == {"opt_out": 5} and stats.successes == 1
    assert stats.opted_out_by == want and set(want) == set(OPT_OUT_RULES)
    on_disk = ShardStats.from_json(json.loads((tmp_path / "o" / "00000_stats.json").read_text()))
    assert on_disk.opted_out_by == want
    spec = PartSpec.from_dict({"partId": "t", "source": {"urls": ["m.parquet"]}, "output": {"uri": "o"}})
    summary = Summary("t", str(tmp_path / "o"), written(spec, [on_disk, on_disk], Progress(part_id="t")))
    again = Summary.from_json(json.loads(json.dumps(summary.to_json())))
    assert again.written is not None and again.written.opted_out_by == dict(Counter(want) + Counter(want))
    assert summary.to_json()["images"]["optedOutBy"] == again.written.opted_out_by
    # The same split reaches the progress, the LaionPart's status and its metrics, one series a rule.
    from prometheus_client import generate_latest

    from laion_operator.control.metrics import Metrics
    from laion_operator.control.status import cr_status

    progress = Progress(part_id="t")
    progress.count_images([on_disk], [on_disk])
    assert progress.opted_out_by == dict(Counter(want) + Counter(want))
    assert cr_status(progress)["images"]["optedOutBy"] == progress.opted_out_by
    metrics = Metrics()
    metrics.observe_part("ns", "p", "Downloading", progress)
    exposed = generate_latest(metrics.registry).decode()
    for rule, n in progress.opted_out_by.items():
        assert f'laion_part_images_opted_out_total{{namespace="ns",part="p",rule="{rule}"}} {float(n)}' in exposed
