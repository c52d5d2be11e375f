"""The operator keeps its promises under the faults a cluster has (issue 20): one job per part, a
status that tells the truth, a queue that always moves, finished work never redone. Each test is one
fault: a job that vanishes (Jobs API 404, a RayJob deleted by hand), an edit or a delete while the
operator is down, a standby taking over, suspend and resume of a finished dataset, an API server
connection that hangs, a dataset range shrunk. Each failed on the operator before issue 20.

The second round (issue 30), at the end: a fact that changes while the operator decides — a
failover that leaves a replica's knowledge of running parts stale, an edit made while a part is
being failed, a dataset whose parts change under its poll, a success the operator did not see
before a suspend, a delete while Ray is gone. Each failed on the operator before issue 30."""

from __future__ import annotations

import threading
import time

import pytest

from laion_operator.testbed.demo_data import write_metadata
from tests.support.kinds import (
    DATASETS,
    GROUP,
    PLURAL,
    VERSION,
    JobWatch,
    dataset_doc,
    jobs_of,
    parts_of,
    status_of,
    wait_dataset,
    wait_for_finished_shard,
)

# apply and wait_phase that assert success and give the part's status, as in test_faults_operator
from tests.support.kinds import apply_ok as apply
from tests.support.kinds import wait_phase_status as wait_phase
from tests.support.operator_proc import OperatorProcess, operator_starter
from tests.support.rayproxy import RayProxy
from tests.support.specs import laionpart

ACTIVE = ("PENDING", "RUNNING")
# Tests here may install the chart with values of their own.
pytestmark = pytest.mark.usefixtures("default_chart_after")


@pytest.fixture(scope="module")
def tiny(sources):
    """Five small parts, meta_1.parquet to meta_5.parquet (conftest's `sources`)."""
    return sources


@pytest.fixture(scope="module")
def slow(tmp_path_factory, image_server):
    """Every image answers after a second: a part still downloading when the test acts."""
    path = tmp_path_factory.mktemp("slow") / "slow.parquet"
    write_metadata(path, 40, image_server.base_url, seed=61, slow_seconds=1, failure_mix={"ok": 0.5, "timeout": 0.5})
    return path


def jobs_client(ray_cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_cluster.dashboard_url)


def job_ids(ray_cluster, namespace: str, name: str) -> list[str]:
    return sorted(j["submission_id"] for j in jobs_of(ray_cluster, namespace, name))


def chart_allows(api, secret: str) -> dict[str, str]:
    """The operator's environment once the chart lets it read the Secret `secret` (credentialsSecrets)."""
    from tests.support.chart import install

    return install(api, {"credentialsSecrets": [secret]})


def reason(status: dict, kind: str = "Failed") -> str | None:
    return next((c.get("reason") for c in status.get("conditions") or [] if c["type"] == kind), None)


@pytest.fixture
def ray_proxy(ray_cluster):
    """The Ray dashboard behind a proxy that can forget jobs, hold their stops, or be gone."""
    proxy = RayProxy(ray_cluster)
    yield proxy
    proxy.close()


def test_a_job_the_ray_head_forgot_fails_the_part_and_frees_its_slot(
    api, operators, ray_proxy, kube_namespace, slow, tiny, tmp_path
):
    """The Jobs API answers 404 for the part's job: the part stops reading Downloading within two
    polls (Failed, reason JobVanished: no retries left), and the part queued behind it runs."""
    ns = kube_namespace
    operators({"maxConcurrentParts": 1}, ray=ray_proxy)
    apply(api, ns, laionpart("lost", slow, tmp_path / "lost", maxRetries=0, download={"parallelism": 1}))
    job_id = wait_phase(api, ns, "lost", "Downloading")["submissionId"]
    time.sleep(1.1)  # creationTimestamp has a resolution of a second: "behind" is younger
    apply(api, ns, laionpart("behind", tiny / "meta_1.parquet", tmp_path / "behind"))
    wait_phase(api, ns, "behind", "Queued")
    ray_proxy.forget(job_id)
    forgotten = time.monotonic()
    status = wait_phase(api, ns, "lost", "Failed", timeout=60)
    assert time.monotonic() - forgotten < 20, "not noticed within two polls (1 s each, on a busy machine)"
    assert reason(status) == "JobVanished" and job_id in status["message"], status
    assert wait_phase(api, ns, "behind", ("Succeeded", "Failed"), timeout=300)["phase"] == "Succeeded"


def test_a_vanished_job_with_retries_left_is_run_again(
    api, operators, ray_proxy, ray_cluster, kube_namespace, slow, tmp_path
):
    ns = kube_namespace
    operators(ray=ray_proxy)
    apply(api, ns, laionpart("again", slow, tmp_path / "again", maxRetries=1, download={"parallelism": 1}))
    job_id = wait_phase(api, ns, "again", "Downloading")["submissionId"]
    ray_proxy.forget(job_id)
    status = api.wait_for(
        GROUP,
        VERSION,
        PLURAL,
        ns,
        "again",
        lambda o: (o.get("status") or {}).get("submissionId", job_id) != job_id,
        timeout=60,
    )["status"]
    assert status["submissionId"].endswith("-g1-a1") and status["retries"] == 1, status
    assert "vanished" in " ".join(e.get("message", "") for e in api.events(ns, involved_name="again"))
    assert wait_phase(api, ns, "again", ("Succeeded", "Failed"))["phase"] == "Succeeded"
    # The forgotten job was stopped by the proxy (as a lost head ends its jobs): the only other one is a1.
    assert job_ids(ray_cluster, ns, "again") == sorted([job_id, status["submissionId"]])


def test_a_rayjob_deleted_by_hand_is_noticed(api, kube_namespace, tiny, tmp_path):
    """KubeRay mode, with the real KubeRay and no Ray: a RayJob that Kueue suspends (it sets
    spec.suspend, and KubeRay writes Suspending, then Suspended) reads as suspended, not as Pending
    forever; then the RayJob goes (`kubectl delete rayjob`) and the part resubmits it as a new attempt."""
    from tests.support.chart import installed, manifests, operator_config, render

    ns = kube_namespace
    api.start_kuberay()
    values = {"operator": {"config": {"mode": "kuberay"}}}
    config = operator_config(manifests(render(values)))
    with installed(api, values) as env, operator_starter(tmp_path, api) as start:
        start(config, env=env)
        apply(api, ns, laionpart("kr", tiny / "meta_1.parquet", tmp_path / "kr", maxRetries=1))
        first = api.wait_for(
            GROUP, VERSION, PLURAL, ns, "kr", lambda o: bool((o.get("status") or {}).get("submissionId")), timeout=120
        )["status"]
        name = first["submissionId"]
        api.patch("ray.io", "v1", "rayjobs", ns, name, {"spec": {"suspend": True}})  # what Kueue does
        api.wait_for(
            "ray.io",
            "v1",
            "rayjobs",
            ns,
            name,
            lambda o: (o.get("status") or {}).get("jobDeploymentStatus") == "Suspended",
            timeout=120,
        )
        suspended = api.wait_for(
            GROUP,
            VERSION,
            PLURAL,
            ns,
            "kr",
            lambda o: "suspended" in (o.get("status") or {}).get("message", ""),
            timeout=60,
        )["status"]
        assert suspended["phase"] == "Pending", suspended
        api.kubectl("delete", "rayjob", name, "-n", ns)
        status = api.wait_for(
            GROUP,
            VERSION,
            PLURAL,
            ns,
            "kr",
            lambda o: (o.get("status") or {}).get("submissionId", name) != name,
            timeout=60,
        )["status"]
        assert status["submissionId"].endswith("-a1") and status["retries"] == 1, status
        assert api.get("ray.io", "v1", "rayjobs", ns, status["submissionId"]) is not None


def test_a_spec_change_while_the_operator_is_down_never_runs_two_jobs(
    api, operators, ray_cluster, kube_namespace, slow, tmp_path
):
    ns, out = kube_namespace, tmp_path / "out"
    op = operators()
    doc = laionpart("edited", slow, out, download={"parallelism": 1})
    apply(api, ns, doc)
    first = wait_phase(api, ns, "edited", "Downloading")["submissionId"]
    wait_for_finished_shard(out)
    watch = JobWatch(ray_cluster, ns, "edited")
    op.kill()
    doc["spec"]["download"]["timeout"] = 4  # what the output depends on: a new generation must run
    apply(api, ns, doc)
    operators()
    status = wait_phase(api, ns, "edited", ("Succeeded", "Failed"))
    assert status["phase"] == "Succeeded", status
    assert status["submissionId"].endswith("-g2-a0")
    assert watch.stop() == 1, f"two jobs ran at once: {watch.running}"
    assert str(jobs_client(ray_cluster).get_job_status(first).value) == "STOPPED"


def test_a_part_deleted_while_the_operator_is_down_frees_its_slot(
    api, operators, ray_cluster, kube_namespace, slow, tiny, tmp_path
):
    ns = kube_namespace
    op = operators({"maxConcurrentParts": 1})
    apply(api, ns, laionpart("gone", slow, tmp_path / "gone", download={"parallelism": 1}))
    job_id = wait_phase(api, ns, "gone", "Downloading")["submissionId"]
    op.kill()
    api.kubectl("delete", "lp", "gone", "-n", ns, "--wait=false")
    apply(api, ns, laionpart("next", tiny / "meta_2.parquet", tmp_path / "next"))
    operators({"maxConcurrentParts": 1})
    api.wait_for_deletion(GROUP, VERSION, PLURAL, ns, "gone", timeout=120)
    assert str(jobs_client(ray_cluster).get_job_status(job_id).value) == "STOPPED"
    status = wait_phase(api, ns, "next", ("Succeeded", "Failed"), timeout=300)
    assert status["phase"] == "Succeeded", status


def test_a_standby_taking_over_keeps_one_job_and_the_queue_moving(
    api, ray_cluster, kube_namespace, slow, tiny, tmp_path
):
    """Two replicas with peering: the standby, started while the first replica ran a part (and so once
    counting it as running), takes over after the part finished and the first replica died: the next
    part runs, with one job. (kopf picks the leader by a random priority: the standby may also take
    over while the first part runs, which it must then follow, not run again.)"""
    from tests.support.chart import install, manifests, operator_config, render
    from tests.support.operator_proc import OperatorProcess

    ns = kube_namespace
    docs = manifests(render({"replicas": 2}))
    operator_env = install(api, {"replicas": 2})  # the peering CRD and object come with the chart
    config = {**operator_config(docs), "maxConcurrentParts": 1}
    env = {**ray_cluster.client_env(), "LAION_OPERATOR_RAY_ADDRESS": ray_cluster.dashboard_url}

    def replica(i: int) -> OperatorProcess:
        workdir = tmp_path / f"replica-{i}"
        workdir.mkdir()
        return OperatorProcess(workdir, operator_env, config, args=(), env={**env, "POD_ID": f"replica-{i}"}).start()

    replicas = [replica(0)]
    try:
        first_watch = JobWatch(ray_cluster, ns, "first")
        apply(api, ns, laionpart("first", slow, tmp_path / "first", download={"parallelism": 1}))
        wait_phase(api, ns, "first", "Downloading")
        replicas.append(replica(1))
        watch = JobWatch(ray_cluster, ns, "second")
        assert wait_phase(api, ns, "first", ("Succeeded", "Failed"))["phase"] == "Succeeded"
        replicas[0].kill()
        apply(api, ns, laionpart("second", tiny / "meta_4.parquet", tmp_path / "second"))
        status = wait_phase(api, ns, "second", ("Succeeded", "Failed"), timeout=300)
        assert status["phase"] == "Succeeded", status
        assert watch.stop() == 1 and first_watch.stop() == 1
        assert len(jobs_of(ray_cluster, ns, "first")) == 1
        assert f"submitted job {status['submissionId']}" in replicas[1].logs()
    finally:
        for op in replicas:
            op.stop()


def test_suspend_and_resume_of_a_succeeded_dataset_runs_nothing_again(
    api, operators, ray_cluster, kube_namespace, tiny, tmp_path
):
    ns = kube_namespace
    operators()
    doc = dataset_doc("finished", tiny, tmp_path / "finished")
    doc["spec"]["source"]["last"] = 2
    apply(api, ns, doc)
    wait_dataset(api, ns, "finished", lambda s: s.get("phase") in ("Succeeded", "Failed"), timeout=600)
    before = {p["metadata"]["name"]: p["status"] for p in parts_of(api, ns, "finished")}
    assert {s["phase"] for s in before.values()} == {"Succeeded"}, before
    jobs = {name: job_ids(ray_cluster, ns, name) for name in before}

    for generation, suspend in ((2, True), (3, False)):
        doc["spec"]["suspend"] = suspend
        apply(api, ns, doc)
        deadline = time.monotonic() + 120
        while {p["status"].get("observedGeneration") for p in parts_of(api, ns, "finished")} != {generation}:
            assert time.monotonic() < deadline, [p["status"] for p in parts_of(api, ns, "finished")]
            time.sleep(0.3)
    time.sleep(5)  # five polls: nothing starts
    after = {p["metadata"]["name"]: p["status"] for p in parts_of(api, ns, "finished")}
    assert {s["phase"] for s in after.values()} == {"Succeeded"}, after
    assert {n: s["submissionId"] for n, s in after.items()} == {n: s["submissionId"] for n, s in before.items()}
    assert {name: job_ids(ray_cluster, ns, name) for name in before} == jobs
    assert (
        wait_dataset(api, ns, "finished", lambda s: s.get("observedGeneration") == 3)["status"]["phase"] == "Succeeded"
    )


def test_a_hung_api_server_connection_never_freezes_the_queue(api, ray_cluster, kube_namespace, slow, tiny, tmp_path):
    """Requests sent while the API server hangs (the fault proxy holds them, unanswered) never get an
    answer: every Kubernetes call the operator makes times out and is retried, and no lock is held
    meanwhile, so the queue moves once the server answers again."""
    from tests.support.faultproxy import FaultProxy

    ns = kube_namespace
    with FaultProxy(api) as proxy, operator_starter(tmp_path, api, ray_cluster) as start:
        start({"maxConcurrentParts": 1}, env=proxy.kubeconfig_env(api.operator_env))
        apply(api, ns, laionpart("running", tiny / "meta_5.parquet", tmp_path / "running", download={"parallelism": 1}))
        wait_phase(api, ns, "running", ("Pending", "Filtering", "Downloading", "Annotating"))
        hang = proxy.hang("*", ".", times=1_000_000)
        time.sleep(1.1)
        apply(api, ns, laionpart("waiting", tiny / "meta_1.parquet", tmp_path / "waiting"))
        deadline = time.monotonic() + 60
        while hang.hits < 2:  # requests of the operator went into the hang
            assert time.monotonic() < deadline, hang.hits
            time.sleep(0.2)
        time.sleep(3)
        proxy.clear()
        for name in ("running", "waiting"):
            status = wait_phase(api, ns, name, ("Succeeded", "Failed"), timeout=400)
            assert status["phase"] == "Succeeded", status


def test_a_shrunk_range_deletes_the_parts_left_outside(api, kube_namespace, tiny, tmp_path):
    """No Ray: a suspended dataset's parts. `last` 5 → 3 deletes parts 4 and 5 (their output stays)."""
    ns = kube_namespace
    with operator_starter(tmp_path, api) as start:
        start()
        doc = dataset_doc("shrinking", tiny, tmp_path / "shrinking", suspend=True)
        apply(api, ns, doc)
        wait_dataset(api, ns, "shrinking", lambda s: s.get("partsByPhase") == {"Suspended": 5}, timeout=120)
        doc["spec"]["source"]["last"] = 3
        apply(api, ns, doc)
        deadline = time.monotonic() + 120
        while sorted(p["spec"]["partId"] for p in parts_of(api, ns, "shrinking")) != ["1", "2", "3"]:
            assert time.monotonic() < deadline, [p["spec"]["partId"] for p in parts_of(api, ns, "shrinking")]
            time.sleep(0.3)
        status = wait_dataset(api, ns, "shrinking", lambda s: s.get("partsTotal") == 3, timeout=60)["status"]
        assert status["partsByPhase"] == {"Suspended": 3}
        events = {e["reason"] for e in api.events(ns, involved_name="shrinking")}
        assert "PartsDeleted" in events


def test_a_backoff_ends_when_the_part_is_suspended(api, operators, ray_proxy, kube_namespace, slow, tmp_path):
    """A retry waits retryBackoffSeconds × 2^attempt (here 10 minutes) in phase Queued, its slot free;
    a suspend ends the wait at once."""
    ns = kube_namespace
    operators(ray=ray_proxy, env={"LAION_OPERATOR_RETRY_BACKOFF_SECONDS": "600"})
    apply(api, ns, laionpart("patient", slow, tmp_path / "patient", maxRetries=2, download={"parallelism": 1}))
    job_id = wait_phase(api, ns, "patient", "Downloading")["submissionId"]
    ray_proxy.forget(job_id)
    waiting = wait_phase(api, ns, "patient", "Queued", timeout=60)
    assert "retry 1 of 2 in 600s" in waiting["message"], waiting
    api.kubectl("patch", "lp", "patient", "-n", ns, "--type=merge", "-p", '{"spec": {"suspend": true}}')
    suspended = time.monotonic()
    wait_phase(api, ns, "patient", "Suspended", timeout=60)
    assert time.monotonic() - suspended < 20


def test_credentials_a_secret_brings_later_are_waited_for(api, operators, kube_namespace, tiny, tmp_path):
    """A Secret an external-secrets controller makes seconds later: the part waits, saying so, and runs
    once it is there; it never fails for it."""
    ns = kube_namespace
    operators(env=chart_allows(api, "made-later"))
    output = {"uri": str(tmp_path / "late"), "credentialsSecret": "made-later"}
    apply(api, ns, laionpart("late", tiny / "meta_2.parquet", output))
    status = api.wait_for(
        GROUP,
        VERSION,
        PLURAL,
        ns,
        "late",
        lambda o: "waiting for credentials" in (o.get("status") or {}).get("message", ""),
        timeout=60,
    )["status"]
    assert reason(status, "CredentialsAvailable") == "CredentialsUnavailable" and status.get("phase") != "Failed"
    api.kubectl("create", "secret", "generic", "made-later", "-n", ns, "--from-literal=UNUSED=x")
    assert wait_phase(api, ns, "late", ("Succeeded", "Failed"), timeout=300)["phase"] == "Succeeded"


def test_jobs_mode_sends_no_credentials_to_a_ray_cluster_without_token_auth(
    api, operators, ray_cluster, kube_namespace, tiny, tmp_path
):
    ns = kube_namespace
    operators(env={**chart_allows(api, "s3"), "LAION_OPERATOR_ALLOW_CREDENTIALS_WITHOUT_RAY_AUTH": "false"})
    api.kubectl("create", "secret", "generic", "s3", "-n", ns, "--from-literal=AWS_SECRET_ACCESS_KEY=not-shown")
    apply(
        api, ns, laionpart("exposed", tiny / "meta_3.parquet", {"uri": str(tmp_path / "x"), "credentialsSecret": "s3"})
    )
    status = wait_phase(api, ns, "exposed", "Failed", timeout=120)
    assert reason(status) == "CredentialsRefused" and "allowCredentialsWithoutRayAuth" in status["message"]
    assert jobs_of(ray_cluster, ns, "exposed") == []


# --- issue 30: a fact that changes while the operator decides -------------------------------------


def test_a_failover_leaves_no_slot_taken_by_a_part_deleted_meanwhile(
    api, ray_cluster, kube_namespace, slow, tiny, tmp_path
):
    """maxConcurrentParts 1. Replica A runs part `gone`; B, of a higher priority, arrives and A
    pauses; `gone` is deleted (B stops its job); B goes and A resumes: the next part runs. A paused
    replica's watches are closed, so no DELETED event ever told A that `gone` went."""
    from tests.support.chart import install, manifests, operator_config, render

    ns = kube_namespace
    operator_env = install(api, {"replicas": 2})  # the peering CRD and object come with the chart
    config = {**operator_config(manifests(render({"replicas": 2}))), "maxConcurrentParts": 1}
    env = {**ray_cluster.client_env(), "LAION_OPERATOR_RAY_ADDRESS": ray_cluster.dashboard_url}

    def replica(name: str, priority: int) -> OperatorProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        args = ("--priority", str(priority))
        return OperatorProcess(workdir, operator_env, config, args=args, env={**env, "POD_ID": name}).start()

    a = replica("a", 1)
    b = None
    try:
        apply(api, ns, laionpart("gone", slow, tmp_path / "gone", download={"parallelism": 1}))
        job_id = wait_phase(api, ns, "gone", "Downloading")["submissionId"]
        b = replica("b", 2)
        wait_log(a, "Pausing operations in favour of")
        api.kubectl("delete", "lp", "gone", "-n", ns, "--wait=false")
        api.wait_for_deletion(GROUP, VERSION, PLURAL, ns, "gone", timeout=120)
        assert str(jobs_client(ray_cluster).get_job_status(job_id).value) == "STOPPED"
        b.stop()  # a rollout: B leaves the peering, and A resumes
        wait_log(a, "Resuming operations after the pause")
        apply(api, ns, laionpart("next", tiny / "meta_2.parquet", tmp_path / "next"))
        status = wait_phase(api, ns, "next", ("Succeeded", "Failed"), timeout=240)
        assert status["phase"] == "Succeeded", status
    finally:
        for op in (a, b):
            if op is not None:
                op.stop()


def wait_log(op: OperatorProcess, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in op.logs():
        assert time.monotonic() < deadline, f"{text!r} not in the operator's log:\n{op.logs()[-3000:]}"
        time.sleep(0.2)


def test_an_edit_made_while_a_part_is_being_failed_runs(api, operators, ray_proxy, kube_namespace, slow, tmp_path):
    """The deadline passes and the part is failed; its job takes a while to stop (the proxy holds the
    stop), and the user raises activeDeadlineSeconds meanwhile. The failure is recorded for the
    generation it was decided on, and the user's generation runs, to the end."""
    ns = kube_namespace
    operators(ray=ray_proxy)
    doc = laionpart("late", slow, tmp_path / "late", activeDeadlineSeconds=5, download={"parallelism": 1})
    ray_proxy.hold("stop")
    apply(api, ns, doc)
    assert ray_proxy.seen["stop"].wait(120), status_of(api, ns, "late")  # DeadlineExceeded decided, stopping
    doc["spec"]["activeDeadlineSeconds"] = 3600
    apply(api, ns, doc)
    api.wait_for(GROUP, VERSION, PLURAL, ns, "late", lambda o: o["metadata"]["generation"] == 2, timeout=30)
    ray_proxy.let_go("stop")
    status = wait_phase(api, ns, "late", ("Succeeded",), timeout=300)
    assert status["observedGeneration"] == 2 and status["submissionId"].endswith("-g2-a0"), status
    assert "DeadlineExceeded" in {e["reason"] for e in api.events(ns, involved_name="late")}


class StatusLog:
    """Every status of one dataset the API server held, polled far faster than the operator writes."""

    def __init__(self, api, namespace: str, name: str):
        self.args = (GROUP, VERSION, DATASETS, namespace, name)
        self.api, self.seen = api, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        version = None
        while not self._stop.is_set():
            obj = self.api.get(*self.args) or {}
            if obj and obj["metadata"]["resourceVersion"] != version:
                version = obj["metadata"]["resourceVersion"]
                self.seen.append(obj.get("status") or {})
            time.sleep(0.05)

    def first(self, generation: int) -> dict:
        return next(s for s in self.seen if s.get("observedGeneration") == generation)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_dataset_says_succeeded_only_for_a_generation_its_parts_ran(
    api, operators, kube_namespace, ray_cluster, tiny, tmp_path
):
    """A range grown from one part to two, then a template change: the first status of each new
    generation is not Succeeded (the new part has not run; both parts run again), and the dataset
    ends Succeeded with both parts done for that generation."""
    ns = kube_namespace
    operators()
    doc = dataset_doc("growing", tiny, tmp_path / "growing")
    doc["spec"]["source"]["last"] = 1
    apply(api, ns, doc)
    wait_dataset(api, ns, "growing", lambda s: s.get("phase") in ("Succeeded", "Failed"), timeout=300)
    log = StatusLog(api, ns, "growing")
    try:
        doc["spec"]["source"]["last"] = 2
        apply(api, ns, doc)

        def done(generation: int):
            return lambda s: s.get("observedGeneration") == generation and s.get("phase") in ("Succeeded", "Failed")

        grown = wait_dataset(api, ns, "growing", done(2), timeout=300)["status"]
        assert (grown["phase"], grown["partsProgress"]) == ("Succeeded", "2/2"), grown
        first = log.first(2)
        assert first["phase"] != "Succeeded" and first["partsTotal"] == 2, first

        doc["spec"]["template"]["download"]["timeout"] = 9  # what the output depends on: both run again
        apply(api, ns, doc)
        changed = wait_dataset(api, ns, "growing", done(3), timeout=300)["status"]
        assert changed["phase"] == "Succeeded", changed
        first = log.first(3)
        assert first["phase"] != "Succeeded", first
        assert not any(c["type"] == "Complete" and c["status"] == "True" for c in first.get("conditions", [])), first
    finally:
        log.stop()
    for part in parts_of(api, ns, "growing"):  # each part ran its template generation's job
        generation = part["metadata"]["generation"]
        assert part["status"]["observedGeneration"] == generation, part["status"]
        assert part["status"]["submissionId"].endswith(f"-g{generation}-a0"), part["status"]


def test_a_success_the_operator_did_not_see_is_never_redone(
    api, operators, ray_cluster, kube_namespace, tiny, tmp_path
):
    """The job succeeds while the operator is down, and the part is suspended before it comes back:
    the part is Succeeded (not Suspended), and the resume runs nothing again."""
    ns = kube_namespace
    op = operators()
    doc = laionpart("unseen", tiny / "meta_3.parquet", tmp_path / "unseen")
    apply(api, ns, doc)
    job_id = wait_phase(api, ns, "unseen", ("Pending", "Filtering", "Downloading"))["submissionId"]
    op.kill()
    client = jobs_client(ray_cluster)
    deadline = time.monotonic() + 300
    while str(client.get_job_status(job_id).value) != "SUCCEEDED":
        assert time.monotonic() < deadline, client.get_job_status(job_id)
        time.sleep(0.5)
    for generation, suspend in ((2, True), (3, False)):
        doc["spec"]["suspend"] = suspend
        apply(api, ns, doc)
        if generation == 2:
            operators()
        status = api.wait_for(
            GROUP,
            VERSION,
            PLURAL,
            ns,
            "unseen",
            lambda o, g=generation: (o.get("status") or {}).get("observedGeneration") == g,
            timeout=120,
        )["status"]
        assert status["phase"] == "Succeeded", status
    time.sleep(3)  # three polls: nothing starts
    assert status_of(api, ns, "unseen")["phase"] == "Succeeded"
    assert job_ids(ray_cluster, ns, "unseen") == [job_id]


def test_a_finished_part_is_deleted_while_ray_is_unreachable(api, operators, ray_proxy, kube_namespace, tiny, tmp_path):
    ns = kube_namespace
    operators(ray=ray_proxy)
    apply(api, ns, laionpart("finished", tiny / "meta_4.parquet", tmp_path / "finished"))
    assert wait_phase(api, ns, "finished", ("Succeeded", "Failed"), timeout=300)["phase"] == "Succeeded"
    ray_proxy.down()  # Ray decommissioned: nothing answers at the operator's rayAddress
    api.kubectl("delete", "lp", "finished", "-n", ns, "--wait=false")
    api.wait_for_deletion(GROUP, VERSION, PLURAL, ns, "finished", timeout=60)
    assert (tmp_path / "finished").exists()  # its output stays


def test_a_part_deleted_while_its_job_is_being_submitted_leaves_no_job_running(
    api, operators, ray_proxy, ray_cluster, kube_namespace, tiny, tmp_path
):
    """The delete comes while the operator waits on the Jobs API's answer to the submission: the
    job the answer brings is stopped before the part goes, never left running without an owner."""
    ns = kube_namespace
    operators(ray=ray_proxy)
    ray_proxy.hold("submit")
    apply(api, ns, laionpart("racing", tiny / "meta_5.parquet", tmp_path / "racing"))
    assert ray_proxy.seen["submit"].wait(120), status_of(api, ns, "racing")
    api.kubectl("delete", "lp", "racing", "-n", ns, "--wait=false")
    time.sleep(3)  # the delete handler runs meanwhile
    ray_proxy.let_go("submit")
    api.wait_for_deletion(GROUP, VERSION, PLURAL, ns, "racing", timeout=120)
    deadline = time.monotonic() + 120
    while any(j["status"] in ACTIVE for j in jobs_of(ray_cluster, ns, "racing")):
        assert time.monotonic() < deadline, jobs_of(ray_cluster, ns, "racing")
        time.sleep(0.5)
    assert {j["status"] for j in jobs_of(ray_cluster, ns, "racing")} <= {"STOPPED"}


def test_a_submission_refused_for_good_never_freezes_the_queue(
    api, operators, ray_proxy, kube_namespace, tiny, tmp_path
):
    """maxConcurrentParts 1: Ray refuses every submission of one part (a 400: a runtime env it cannot
    set up). That part says so and tries again, and the part queued behind it runs meanwhile."""
    ns = kube_namespace
    operators({"maxConcurrentParts": 1}, ray=ray_proxy)
    ray_proxy.refuse("refused")
    apply(api, ns, laionpart("refused", tiny / "meta_1.parquet", tmp_path / "refused"))
    api.wait_for(
        GROUP,
        VERSION,
        PLURAL,
        ns,
        "refused",
        lambda o: "400" in (o.get("status") or {}).get("message", ""),
        timeout=120,
    )
    time.sleep(1.1)  # creationTimestamp has a resolution of a second: "behind" is younger
    apply(api, ns, laionpart("behind", tiny / "meta_2.parquet", tmp_path / "behind"))
    assert wait_phase(api, ns, "behind", ("Succeeded", "Failed"), timeout=300)["phase"] == "Succeeded"
    assert status_of(api, ns, "refused").get("phase") in (None, "Queued"), status_of(api, ns, "refused")


def test_a_retry_keeps_its_backoff_across_a_restart_and_ends_at_the_deadline(
    api, operators, ray_proxy, ray_cluster, kube_namespace, slow, tmp_path
):
    """A retry waits 10 minutes (retryBackoffSeconds 600); the operator restarts meanwhile and keeps
    to the wait instead of resubmitting at once; the run's activeDeadlineSeconds passes during the
    wait, and the part fails then, not after it."""
    ns = kube_namespace
    env = {"LAION_OPERATOR_RETRY_BACKOFF_SECONDS": "600"}
    op = operators(ray=ray_proxy, env=env)
    doc = laionpart("patient", slow, tmp_path / "patient", maxRetries=2, activeDeadlineSeconds=60)
    apply(api, ns, doc)
    job_id = wait_phase(api, ns, "patient", "Downloading")["submissionId"]
    ray_proxy.forget(job_id)
    assert "in 600s" in wait_phase(api, ns, "patient", "Queued", timeout=60)["message"]
    op.kill()
    operators(ray=ray_proxy, env=env)
    time.sleep(8)  # eight polls of the new operator
    assert job_ids(ray_cluster, ns, "patient") == [job_id], "the restarted operator did not keep to the backoff"
    status = wait_phase(api, ns, "patient", "Failed", timeout=120)
    assert reason(status) == "DeadlineExceeded", status
    assert job_ids(ray_cluster, ns, "patient") == [job_id]


def test_a_dataset_announces_the_parts_a_shrunk_range_deletes_once(
    api, operators, ray_proxy, kube_namespace, tiny, tmp_path
):
    """Part 2 runs when the range shrinks to part 1; its job takes a while to stop (the proxy holds
    the stop), and the dataset polls meanwhile: one PartsDeleted Event, not one a poll."""
    ns = kube_namespace
    operators({"maxConcurrentParts": 2}, ray=ray_proxy)
    doc = dataset_doc("shrunk", tiny, tmp_path / "shrunk")
    doc["spec"]["source"]["last"] = 2
    apply(api, ns, doc)
    wait_phase(api, ns, "shrunk-2", ("Pending", "Filtering", "Downloading"), timeout=120)
    ray_proxy.hold("stop")
    doc["spec"]["source"]["last"] = 1
    apply(api, ns, doc)
    assert ray_proxy.seen["stop"].wait(60)
    time.sleep(5)  # five polls of the dataset while part 2 terminates
    ray_proxy.let_go("stop")
    api.wait_for_deletion(GROUP, VERSION, PLURAL, ns, "shrunk-2", timeout=120)
    deleted = [e for e in api.events(ns, involved_name="shrunk") if e["reason"] == "PartsDeleted"]
    assert sum(e.get("count") or 1 for e in deleted) == 1, deleted
