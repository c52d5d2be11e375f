"""Faults around the operator (issue 12): the operator killed at each step of a part's life, a job's
driver killed, the API server failing, the storage gone, and many parts at once. Each part ends with
each sample exactly once, one job per generation, and never two jobs of a part running at once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from laion_operator.control import crash
from laion_operator.testbed.demo_data import write_metadata
from tests.support.exactly_once import check_exactly_once
from tests.support.faults import Outage
from tests.support.kinds import GROUP, PLURAL, VERSION, JobWatch, jobs_of, status_of

# apply and wait_phase that assert success and give the part's status: what every test here wants
from tests.support.kinds import apply_ok as apply
from tests.support.kinds import wait_phase_status as wait_phase
from tests.support.operator_proc import OperatorProcess, operator_starter
from tests.support.specs import laionpart, mixed_metadata

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def metadata(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("meta") / "part.parquet"
    write_metadata(path, 40, image_server.base_url, seed=41, failure_mix={"ok": 0.8, "http_4xx": 0.1, "decode": 0.1})
    return path


@pytest.fixture(scope="module")
def slow_metadata(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("slow") / "part.parquet"
    write_metadata(path, 40, image_server.base_url, seed=42, slow_seconds=1, failure_mix={"ok": 0.5, "timeout": 0.5})
    return path


def wait_exit(op: OperatorProcess, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while op.proc.poll() is None:
        assert time.monotonic() < deadline, f"the operator did not crash:\n{op.logs()[-3000:]}"
        time.sleep(0.2)
    return op.proc.returncode


def test_operator_killed_at_each_step_ends_with_one_job(
    api, operators, ray_cluster, kube_namespace, metadata, tmp_path
):
    """One part walked through every crash point, a new operator after each: one job, then Succeeded."""
    ns, out = kube_namespace, tmp_path / "out"
    watch = JobWatch(ray_cluster, ns, "crashy")
    apply(api, ns, laionpart("crashy", metadata, out))
    for point in crash.POINTS:
        op = operators(env={crash.ENV: point}, wait=False).launch()
        assert wait_exit(op) == crash.EXIT_CODE, op.logs()[-3000:]
        assert f"{crash.ENV}={point}" in op.logs()
        jobs = jobs_of(ray_cluster, ns, "crashy")
        if point == "before-submit":
            assert jobs == []
        else:  # submitted once, whatever the operator wrote before it died
            assert len(jobs) == 1, jobs
    final = operators()
    status = wait_phase(api, ns, "crashy", ("Succeeded", "Failed"))
    assert status["phase"] == "Succeeded", status
    jobs = jobs_of(ray_cluster, ns, "crashy")
    assert [j["submission_id"] for j in jobs] == [status["submissionId"]]
    assert status["submissionId"].endswith("-g1-a0") and status["retries"] == 0
    assert watch.stop() <= 1
    time.sleep(2)  # one more poll: the metrics come from the final status
    check_exactly_once(out, status, final.metrics(), ns, "crashy")


def test_killed_job_driver_is_retried_never_two_jobs_at_once(
    api, operators, ray_cluster, kube_namespace, slow_metadata, tmp_path
):
    ns, out = kube_namespace, tmp_path / "out"
    op = operators()
    watch = JobWatch(ray_cluster, ns, "driverless")
    apply(api, ns, laionpart("driverless", slow_metadata, out, maxRetries=2, download={"parallelism": 1}))
    wait_phase(api, ns, "driverless", "Downloading")
    deadline = time.monotonic() + 120
    while not list(out.glob("*_stats.json")):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    job_id = status_of(api, ns, "driverless")["submissionId"]
    pid = ray_cluster.jobs_api(f"/api/jobs/{job_id}")["driver_info"]["pid"]
    os.kill(int(pid), signal.SIGKILL)  # this cluster's driver of this job, nobody else's
    status = wait_phase(api, ns, "driverless", ("Succeeded", "Failed"), timeout=300)
    assert status["phase"] == "Succeeded", status
    assert status["retries"] == 1 and status["submissionId"].endswith("-a1")
    assert watch.stop() == 1, f"two jobs ran at once: {watch.running}"
    assert len(jobs_of(ray_cluster, ns, "driverless")) == 2
    time.sleep(2)
    check_exactly_once(out, status, op.metrics(), ns, "driverless")


def test_api_server_faults_converge_without_a_second_job(api, ray_cluster, kube_namespace, metadata, tmp_path):
    """The operator reaches the real API server through the fault proxy: status writes answered 500
    and 409, watch streams cut and a watch answered 410 Gone."""
    from tests.support.faultproxy import FaultProxy

    ns, out = kube_namespace, tmp_path / "out"
    status = rf"^/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/shaky/status$"
    with FaultProxy(api) as proxy, operator_starter(tmp_path, api, ray_cluster) as start:
        proxy.fail("PATCH", status, 500, times=3)
        proxy.fail("PATCH", status, 409, times=3)
        op = start(env=proxy.kubeconfig_env(api.operator_env))
        watch = JobWatch(ray_cluster, ns, "shaky")
        apply(api, ns, laionpart("shaky", metadata, out))
        wait_phase(api, ns, "shaky", ("Pending", "Filtering", "Downloading", "Annotating", "Succeeded"))
        proxy.expire(rf"/{PLURAL}$")
        proxy.drop_streams()  # cut watch streams: kopf reconnects, gets 410 Gone, and lists again
        status = wait_phase(api, ns, "shaky", ("Succeeded", "Failed"))
        assert status["phase"] == "Succeeded", status
        assert [j["submission_id"] for j in jobs_of(ray_cluster, ns, "shaky")] == [status["submissionId"]]
        assert watch.stop() <= 1
        assert [r.hits for r in proxy.rules] == [3, 3, 1], proxy.seen[-20:]  # every fault reached the operator
        assert "500" in op.logs() or "409" in op.logs()
        time.sleep(2)
        check_exactly_once(out, status, op.metrics(), ns, "shaky")


def test_unreachable_storage_fails_the_part_as_storage_unavailable(
    api, operators, ray_cluster, s3, kube_namespace, metadata
):
    from tests.support.chart import installed

    ns = kube_namespace
    bucket = s3.create_bucket(f"gone-{ns[-6:]}")
    outage = Outage(s3.port)  # never up: the endpoint refuses every connection
    api.kubectl(
        "create",
        "secret",
        "generic",
        "s3",
        "-n",
        ns,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.ACCESS_KEY}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.SECRET_KEY}",
    )
    with installed(api, {"credentialsSecrets": ["s3"]}) as env:  # the chart lets the operator read this Secret
        operators(env=env)
        output = {
            "uri": f"s3://{bucket}/part",
            "endpoint": outage.endpoint,
            "region": "us-east-1",
            "pathStyle": True,
            "credentialsSecret": "s3",
            "retrySeconds": 3,
        }
        apply(api, ns, laionpart("nostore", metadata, output, maxRetries=0))
        status = wait_phase(api, ns, "nostore", "Failed")
    reasons = {c["type"]: c.get("reason") for c in status["conditions"]}
    assert reasons["Failed"] == "StorageUnavailable", status
    assert outage.endpoint in status["message"], status["message"]
    assert s3.SECRET_KEY not in str(status)


@pytest.fixture(scope="module")
def tiny_metadata(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("tiny") / "part.parquet"
    write_metadata(path, 5, image_server.base_url, seed=43, failure_mix={"ok": 0.8, "http_4xx": 0.2})
    return path


# The suite's version of the 200-part soak (bench/soak_bench.py); LAION_TEST_LOAD_PARTS changes the count.
LOAD_PARTS = int(os.environ.get("LAION_TEST_LOAD_PARTS", "6"))  # the soak (bench/soak_bench.py) runs 200


def test_many_parts_at_once_run_oldest_first_within_the_limit(
    api, operators, ray_cluster, kube_namespace, tiny_metadata, tmp_path
):
    from tests.support.load import run_many

    limit = 2  # below the parts, so that most of them queue
    op = operators({"maxConcurrentParts": limit})
    run = run_many(
        api, kube_namespace, ray_cluster, op, tiny_metadata, tmp_path, LOAD_PARTS, timeout=900, idle_seconds=10
    )
    assert set(run.phases.values()) == {"Succeeded"}, run.phases
    assert sorted(run.started) == run.names  # one job each
    assert run.order_slip() < limit, run.started  # oldest first, give or take the parts starting together
    # The queue metric follows the parts: all but `limit` wait at first, it only shrinks, it ends empty.
    peak = run.queue.index(max(run.queue))
    assert max(run.queue) >= LOAD_PARTS - 2 * limit, run.queue
    assert all(b <= a for a, b in zip(run.queue[peak:], run.queue[peak + 1 :])), run.queue
    assert run.queue[-1] == 0
    assert run.rss_peak < 200 * 2**20, run.rss_peak
    assert run.idle_cpu < 0.05, run.idle_cpu
    for name in run.names:
        check_exactly_once(tmp_path / name, run.statuses[name])


@pytest.fixture(scope="module")
def timing_out_metadata(tmp_path_factory, image_server):
    """Slow images: they time out at a 1 s timeout and come at 5 s — the transient failures a heal is for."""
    path = tmp_path_factory.mktemp("heal") / "part.parquet"
    return mixed_metadata(path, 30, image_server, seed=44, slow_seconds=2, ok=0.5, timeout=0.3, http_4xx=0.2)


def test_heal_field_starts_a_heal_job_and_the_status_follows(
    api, operators, ray_cluster, kube_namespace, timing_out_metadata, tmp_path
):
    ns, out = kube_namespace, tmp_path / "out"
    op = operators()
    doc = laionpart("healed", timing_out_metadata, out, download={"timeout": 1, "maxInFlight": 8})
    apply(api, ns, doc)
    first = wait_phase(api, ns, "healed", ("Succeeded", "Failed"))
    assert first["phase"] == "Succeeded", first
    timeouts = first["images"]["failedByReason"]["timeout"]
    assert timeouts > 0

    doc["spec"]["download"]["timeout"] = 5  # the network is better now
    doc["spec"]["heal"] = {"reasons": ["timeout"]}
    apply(api, ns, doc)
    status = api.wait_for(
        GROUP,
        VERSION,
        PLURAL,
        ns,
        "healed",
        lambda o: o["status"].get("observedGeneration") == 2 and o["status"].get("phase") in ("Succeeded", "Failed"),
        timeout=240,
    )["status"]
    assert status["phase"] == "Succeeded", status
    assert status["images"]["ok"] == first["images"]["ok"] + timeouts
    assert "timeout" not in status["images"]["failedByReason"]
    assert "healed" in status["message"]
    assert sorted(j["submission_id"] for j in jobs_of(ray_cluster, ns, "healed")) == sorted(
        [first["submissionId"], status["submissionId"]]
    )
    time.sleep(2)
    summary = check_exactly_once(out, status, op.metrics(), ns, "healed")
    assert summary["heal"]["refetched"] == timeouts
