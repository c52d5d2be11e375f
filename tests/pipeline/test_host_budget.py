"""The cluster-wide host budget (pipeline/fetch/budget.py): the ledger's rules on their own, then shard
fetches sharing it against one loopback host that counts the requests it serves at once, first with
the ledger in this process, then as the named Ray actors every part on a cluster finds."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest

from laion_operator.pipeline import fetch
from laion_operator.pipeline.fetch import budget
from laion_operator.pipeline.fetch.budget import Ask, Ledger
from laion_operator.spec import PartSpec
from tests.support.failing_web import ImageServer


def options(**download):
    download.setdefault("allowedNetworks", ["127.0.0.0/8"])
    return PartSpec.from_dict(
        {"partId": "t", "source": {"urls": ["m.parquet"]}, "output": {"uri": "out"}, "download": download}
    ).download


# --- the ledger's rules -------------------------------------------------------------------------


def test_slots_are_shared_within_the_budget_and_split_evenly_when_contended():
    ledger = Ledger()
    a = ledger.sync("a", {"h": Ask(want=16, in_use=0, budget=10)}, ttl=10, now=0)["h"]
    assert (a.held, a.allowed, a.contended) == (10, 10, False)  # all of it while nobody else asks
    b = ledger.sync("b", {"h": Ask(want=5, in_use=0, budget=10)}, ttl=10, now=1)["h"]
    assert (b.held, b.allowed) == (0, 0)  # nothing past the budget
    # a hears of b without asking anything (its renewal), and gives back down to an even share as its
    # URLs end, never under what it still uses
    a = ledger.sync("a", {}, ttl=10, now=2)["h"]
    assert a.contended and a.allowed == 5 and a.held == 10
    a = ledger.sync("a", {"h": Ask(want=16, in_use=8, budget=10)}, ttl=10, now=3)["h"]
    assert (a.held, a.allowed) == (8, 5)
    b = ledger.sync("b", {"h": Ask(want=5, in_use=0, budget=10)}, ttl=10, now=3)["h"]
    assert b.held == 2  # what a gave back, and no more
    a = ledger.sync("a", {"h": Ask(want=16, in_use=5, budget=10)}, ttl=10, now=4)["h"]
    b = ledger.sync("b", {"h": Ask(want=5, in_use=2, budget=10)}, ttl=10, now=4)["h"]
    assert (a.held, b.held) == (5, 5)
    assert sum(ledger.hosts["h"].held.values()) <= 10
    # b is done with the host: a may take it all again
    ledger.sync("b", {"h": Ask(want=0, in_use=0, budget=10)}, ttl=10, now=5)
    a = ledger.sync("a", {"h": Ask(want=16, in_use=5, budget=10)}, ttl=10, now=5)["h"]
    assert (a.held, a.allowed, a.contended) == (10, 10, False)


def test_a_slow_down_halves_the_limit_for_every_task_and_it_grows_back():
    ledger = Ledger(cut_interval=1, raise_interval=1)
    ledger.sync("a", {"h": Ask(8, 0, budget=8)}, ttl=10, now=0)
    b = ledger.sync("b", {"h": Ask(0, 0, budget=8, slowed=3)}, ttl=10, now=0.5)["h"]
    assert b.limit == 4 and b.wait == pytest.approx(3)
    # the same burst seen by another task: no second cut
    assert ledger.sync("b", {"h": Ask(0, 0, 8, slowed=3)}, ttl=10, now=0.7)["h"].limit == 4
    a = ledger.sync("a", {}, ttl=10, now=0.8)["h"]  # told without asking: its Retry-After and share
    assert a.limit == 4 and a.allowed == 4 and a.wait == pytest.approx(3.7 - 0.8)  # the later Retry-After
    for now, limit in ((2, 2), (3, 1), (4, 1)):  # a host that keeps saying so goes down to 1, not 0
        assert ledger.sync("b", {"h": Ask(0, 0, 8, slowed=1)}, ttl=10, now=now)["h"].limit == limit
    assert ledger.hosts["h"].slowdowns == 4
    limits = [ledger.sync("a", {"h": Ask(8, 1, 8, answered=5)}, ttl=10, now=now)["h"].limit for now in range(5, 15)]
    assert limits == [2, 3, 4, 5, 6, 7, 8, 8, 8, 8]  # one more per interval of answers, up to the budget
    assert ledger.sync("a", {"h": Ask(8, 1, 8)}, ttl=10, now=15)["h"].held == 8


def test_a_task_that_stops_renewing_loses_its_leases_after_their_ttl():
    ledger = Ledger()
    ledger.sync("killed", {"h": Ask(4, 0, budget=4)}, ttl=5, now=0)
    assert ledger.sync("b", {"h": Ask(4, 0, budget=4)}, ttl=5, now=4.9)["h"].held == 0
    assert ledger.sync("b", {"h": Ask(4, 0, budget=4)}, ttl=5, now=5.1)["h"].held == 4
    assert "killed" not in ledger.expiry


def test_host_keys_name_the_schemes_port():
    assert budget.host_key("http://Example.COM/a.jpg") == "example.com:80"
    assert budget.host_key("https://example.com:8443/a") == "example.com:8443"
    assert budget.host_key("https://example.com/a") == "example.com:443"
    assert budget.host_key("not a url") is None


# --- shard fetches sharing one ledger in this process -------------------------------------------


class _InProcessActor:
    """One of the ledger's actors in this process: Ray's transport left out, the ledger and the
    tasks' side of it kept."""

    def __init__(self, **ledger):
        self.actor = budget.LedgerActor(**ledger)
        self.lock = threading.Lock()
        self.sync = self  # `actor.sync.remote(...)`, as Ray spells a call

    async def remote(self, *args):
        with self.lock:
            return self.actor.sync(*args)


def in_process_budget(**ledger) -> budget.ClusterBudget:
    return budget.ClusterBudget(tuple(_InProcessActor(**ledger) for _ in range(budget.ACTORS)))


def run_tasks(urls_by_task: list[list[str]], opts, cluster: budget.ClusterBudget | None) -> list:
    """Shard fetches at once, one thread each (as shard tasks on several cores); every outcome."""
    results: list[list] = [[] for _ in urls_by_task]

    def task(i: int) -> None:
        def handle(index, data, error):
            results[i].append(error.reason if error else "ok")

        fetch.run(urls_by_task[i], opts, handle, 1, cluster)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(len(urls_by_task))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.fixture
def busy_host():
    with ImageServer(host="127.0.0.41") as server:
        yield server


def test_tasks_sharing_a_budget_never_exceed_it_where_each_alone_would(busy_host):
    urls = [[f"{busy_host.base_url}/busy/0.2/t{t}u{i}_32x32.jpg" for i in range(24)] for t in range(3)]
    opts = options(maxPerHost=4, maxInFlight=16)
    results = run_tasks(urls, opts, in_process_budget())
    assert all(r == ["ok"] * 24 for r in results)
    assert busy_host.busy.peak <= 4
    assert busy_host.busy.peak >= 3  # the budget is used, not merely respected
    # The same tasks each counting their own: the server sees what the budget prevents.
    busy_host.busy.peak = 0
    results = run_tasks(urls, options(maxPerHost=4, maxInFlight=16, hostBudget="task"), None)
    assert all(r == ["ok"] * 24 for r in results)
    assert busy_host.busy.peak > 4


def test_a_task_that_comes_later_gets_its_share_before_the_first_is_done(busy_host):
    """A task holding all of a host's budget with many URLs to go gives back an even share to one
    that asks later, rather than keeping it to its end."""
    cluster = in_process_budget()
    opts = options(maxPerHost=4, maxInFlight=16)
    ends: dict[str, float] = {}

    def task(name: str, count: int, delay: float) -> None:
        time.sleep(delay)
        urls = [f"{busy_host.base_url}/busy/0.2/f{name}{i}_32x32.jpg" for i in range(count)]
        fetch.run(urls, opts, lambda i, d, e: None, 1, cluster)
        ends[name] = time.monotonic()

    threads = [threading.Thread(target=task, args=a) for a in (("first", 60, 0.0), ("later", 8, 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert busy_host.busy.served == 68 and busy_host.busy.peak <= 4
    # 60 URLs at 4 at once take 3 s; the later task's 8 at an even share (2) take about 1 s of them
    assert ends["later"] < ends["first"] - 0.5


def test_a_host_that_says_slow_down_slows_every_task_and_recovers(busy_host):
    """8 slots across 3 tasks; the host answers 429 (Retry-After 1) for half a second: after it, the
    tasks together send fewer requests at once than before, and later as many again."""
    busy_host.retry_after = 1
    urls = [[f"{busy_host.base_url}/busy/0.2/s{t}u{i}_32x32.jpg" for i in range(100)] for t in range(3)]
    opts = options(maxPerHost=8, maxInFlight=16, timeout=10)
    start = time.monotonic()
    marks = {}

    def push_back():
        time.sleep(1.5)
        marks["from"] = time.monotonic()
        busy_host.pushing_back = True
        time.sleep(0.5)
        busy_host.pushing_back = False
        marks["to"] = time.monotonic()

    pusher = threading.Thread(target=push_back)
    pusher.start()
    results = run_tasks(urls, opts, in_process_budget())
    pusher.join()
    end = time.monotonic()
    assert all(r == ["ok"] * 100 for r in results)  # every 429 waited out and fetched again
    assert busy_host.busy.refused >= 1
    before = busy_host.busy.peak_between(start + 0.5, marks["from"])
    after = busy_host.busy.peak_between(marks["to"] + 0.6, marks["to"] + 1.2)
    later = busy_host.busy.peak_between(marks["to"] + 4.0, end)
    assert before == 8
    assert 0 < after <= 6  # halved (4), grown back by one a second since (a slow machine: by two)
    assert later == 8


# --- the named Ray actors, shared by every part on the cluster ----------------------------------


def _fetch_task():
    import ray

    @ray.remote(num_cpus=0)
    def shard(urls: list[str], spec: dict) -> tuple[list[str], int]:
        from laion_operator.pipeline import fetch
        from laion_operator.spec import PartSpec

        opts = PartSpec.from_dict(spec).download
        outcomes: list[str] = []
        engine = fetch.run(
            urls, opts, lambda i, d, e: outcomes.append(e.reason if e else "ok"), 1, fetch.cluster_budget(opts)
        )
        return outcomes, engine.slow_downs

    return shard


def _spec(**download) -> dict:
    return {
        "partId": "budget",
        "source": {"urls": ["m.parquet"]},
        "output": {"uri": "out"},
        "download": {"allowedNetworks": ["127.0.0.0/8"], **download},
    }


ANOTHER_PART = """
import json, sys, ray
from laion_operator.pipeline.runtime import ensure_ray
ensure_ray(sys.argv[1])

@ray.remote(num_cpus=0)
def shard(urls, spec):
    from laion_operator.pipeline import fetch
    from laion_operator.spec import PartSpec
    opts = PartSpec.from_dict(spec).download
    out = []
    fetch.run(urls, opts, lambda i, d, e: out.append(e.reason if e else "ok"), 1, fetch.cluster_budget(opts))
    return out

urls, spec = json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(json.dumps(ray.get(shard.remote(urls, spec), timeout=300)))
"""


def test_parts_on_one_cluster_share_one_budget_per_host(ray_driver, busy_host):
    """Three shard tasks of this driver and one of another Ray job (another part) against one host:
    together never more than its maxPerHost, every URL fetched."""
    import json

    import ray

    spec = _spec(maxPerHost=4, maxInFlight=16)
    urls = [[f"{busy_host.base_url}/busy/0.3/r{t}u{i}_32x32.jpg" for i in range(16)] for t in range(4)]
    other = subprocess.Popen(
        [sys.executable, "-c", ANOTHER_PART, ray_driver.address, json.dumps(urls[3]), json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    shard = _fetch_task()
    refs = [shard.remote(u, spec) for u in urls[:3]]
    mine = ray.get(refs, timeout=300)
    out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err[-3000:]
    assert all(outcomes == ["ok"] * 16 for outcomes, _ in mine)
    assert json.loads(out.splitlines()[-1]) == ["ok"] * 16
    assert busy_host.busy.served == 64
    assert busy_host.busy.peak <= 4
    # The ledger is the named actors, found by any job in the namespace.
    key = budget.host_key(busy_host.base_url)
    actor = ray.get_actor(f"host-budget-{budget.__version__}-{budget.shard_of(key)}", namespace=budget.NAMESPACE)
    held, limit, _ = ray.get(actor.state.remote(key), timeout=60)
    assert held == 0  # every lease given back at the tasks' ends
    assert limit in (0, 4)
    # The actors outlive the jobs that made them: they hold none of a job's credentials (this driver's
    # working_dir carries the test bed's S3 keys to its tasks, which created the actors).
    from laion_operator import credentials

    def files(ledger):
        import os

        return sorted(os.listdir("."))

    for i in range(budget.ACTORS):
        named = ray.get_actor(f"host-budget-{budget.__version__}-{i}", namespace=budget.NAMESPACE)
        assert ray.get(named.__ray_call__.remote(files), timeout=60) == ["HOST-BUDGET"]
    task_files = ray.get(ray.remote(num_cpus=0)(lambda: __import__("os").listdir(".")).remote(), timeout=60)
    assert credentials.FILE in task_files  # what the actors would otherwise have inherited


def test_a_429_seen_by_one_ray_task_slows_the_others(ray_driver, busy_host):
    import ray

    busy_host.retry_after = 2
    spec = _spec(maxPerHost=6, maxInFlight=16, timeout=10)
    urls = [[f"{busy_host.base_url}/busy/0.25/k{t}u{i}_32x32.jpg" for i in range(60)] for t in range(3)]
    shard = _fetch_task()
    refs = [shard.remote(u, spec) for u in urls]
    while busy_host.busy.served < 12:  # the tasks at full speed first
        time.sleep(0.05)
    start = time.monotonic()
    busy_host.pushing_back = True
    time.sleep(0.3)
    busy_host.pushing_back = False
    stop = time.monotonic()
    results = ray.get(refs, timeout=300)
    assert all(outcomes == ["ok"] * 60 for outcomes, _ in results)
    assert sum(slowed for _, slowed in results) >= 1
    before = busy_host.busy.peak_between(0, start)
    after = busy_host.busy.peak_between(stop + 2.0, stop + 2.8)  # past the Retry-After, which all honoured
    # Nobody asks before the Retry-After, once the 429's news reached every task (a sync: about a second).
    assert busy_host.busy.peak_between(stop + 1.2, stop + 1.6) == 0
    assert before == 6
    assert 0 < after <= 5  # halved (3), grown back by one a second since


def test_a_killed_tasks_leases_come_back_after_their_ttl(ray_driver):
    import ray

    opts = options(maxPerHost=4)
    key = "killed.example:80"

    @ray.remote(num_cpus=0)
    def hold(spec: dict, key: str) -> None:
        import asyncio

        from laion_operator.pipeline.fetch import budget
        from laion_operator.spec import PartSpec

        opts = PartSpec.from_dict(spec).download

        async def main():
            async with budget.Leases(opts, budget.cluster_budget(opts), ttl=3) as leases:
                leases.want(key, 4, 0)
                await asyncio.sleep(3600)  # holding them until killed

        asyncio.run(main())

    cluster = budget.cluster_budget(opts)
    assert cluster is not None
    actor = cluster.call(key)
    ref = hold.remote(_spec(maxPerHost=4), key)
    deadline = time.monotonic() + 120
    while ray.get(actor.state.remote(key), timeout=60)[0] < 4:
        assert time.monotonic() < deadline, "the task never leased its slots"
        time.sleep(0.1)
    ray.cancel(ref, force=True)
    killed = time.monotonic()

    async def lease() -> tuple[int, float]:
        async with budget.Leases(opts, cluster) as leases:
            leases.want(key, 4, 0)
            while leases.allowed(key) < 4:
                await asyncio.sleep(0.05)
            return leases.allowed(key), time.monotonic()

    allowed, when = asyncio.run(asyncio.wait_for(lease(), 60))
    assert allowed == 4
    assert 2.0 <= when - killed <= 3 + 1.0 + 5  # not before the killed task's TTL ran out; soon after
