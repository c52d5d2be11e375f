"""The operator keeps its promises under the faults a cluster has (issue 20): one job per part, a
status that tells the truth, a queue that always moves, finished work never redone. Each test is one
fault: a job that vanishes (Jobs API 404, a RayJob deleted by hand), an edit or a delete while the
operator is down, a standby taking over, suspend and resume of a finished dataset, an API server
connection that hangs, a dataset range shrunk. Each failed on the operator before issue 20."""

from __future__ import annotations

import threading
import time

import pytest

from laion_operator.testbed.demo_data import write_metadata
from tests.support.operator_proc import operator_starter
from tests.support.services import free_port
from tests.support.specs import laionpart
from tests.test_datasets import dataset_doc, five_small_parts, parts_of, wait_dataset, wait_for_finished_shard
from tests.test_faults_operator import JobWatch, apply, jobs_of, wait_phase
from tests.test_operator import RAYJOB_CRD

GROUP, VERSION, PLURAL = "laion-operator.io", "v1alpha1", "laionparts"
ACTIVE = ("PENDING", "RUNNING")


@pytest.fixture(scope="module")
def api(kube_api):
    kube_api.install_crd(RAYJOB_CRD)  # the parts' CRDs come with the chart, installed for the session
    return kube_api


@pytest.fixture
def operators(api, ray_cluster, tmp_path):
    """Start operators with a given configuration; all are stopped after the test."""
    with operator_starter(tmp_path, api, ray_cluster) as start:
        yield start


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, image_server):
    """Five small parts, meta_1.parquet to meta_5.parquet."""
    return five_small_parts(tmp_path_factory.mktemp("dataset-meta"), image_server)


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


@pytest.fixture(autouse=True)
def default_chart_after(api):
    """Tests here may install the chart with values of their own: its default install again after."""
    yield
    from tests.support.chart import install

    api.operator_env = install(api)


def chart_allows(api, secret: str) -> dict[str, str]:
    """The operator's environment once the chart lets it read the Secret `secret` (credentialsSecrets)."""
    from tests.support.chart import install

    return install(api, {"credentialsSecrets": [secret]})


def reason(status: dict, kind: str = "Failed") -> str | None:
    return next((c.get("reason") for c in status.get("conditions") or [] if c["type"] == kind), None)


class Forgetful:
    """The Ray dashboard behind a proxy that forgets jobs, as a head restarted without GCS persistence
    does: `forget(id)` makes the Jobs API answer 404 for the job and leave it out of its list (and
    stops it, which the operator cannot see any more)."""

    def __init__(self, ray_cluster):
        import http.server
        import json
        import urllib.error
        import urllib.request

        self.cluster, self.forgotten = ray_cluster, set()
        upstream, forgotten = ray_cluster.dashboard_url.rstrip("/"), self.forgotten

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def forward(self):
                path = self.path.split("?")[0].rstrip("/")
                if path.startswith("/api/jobs/") and path.split("/")[3] in forgotten:
                    return self.answer(404, b"Job not found")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                request = urllib.request.Request(upstream + self.path, data=body, method=self.command, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        code, data = response.status, response.read()
                except urllib.error.HTTPError as err:
                    code, data = err.code, err.read()
                if path == "/api/jobs" and self.command == "GET" and code == 200:
                    data = json.dumps([j for j in json.loads(data) if j.get("submission_id") not in forgotten]).encode()
                self.answer(code, data)

            def answer(self, code, data):
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.dashboard_url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def client_env(self) -> dict[str, str]:
        return self.cluster.client_env()

    def forget(self, job_id: str) -> None:
        self.forgotten.add(job_id)
        jobs_client(self.cluster).stop_job(job_id)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def forgetful(ray_cluster):
    proxy = Forgetful(ray_cluster)
    yield proxy
    proxy.close()


def test_a_job_the_ray_head_forgot_fails_the_part_and_frees_its_slot(
    api, operators, forgetful, kube_namespace, slow, tiny, tmp_path
):
    """The Jobs API answers 404 for the part's job: the part stops reading Downloading within two
    polls (Failed, reason JobVanished: no retries left), and the part queued behind it runs."""
    ns = kube_namespace
    operators({"maxConcurrentParts": 1}, ray=forgetful)
    apply(api, ns, laionpart("lost", slow, tmp_path / "lost", maxRetries=0, download={"parallelism": 1}))
    job_id = wait_phase(api, ns, "lost", "Downloading")["submissionId"]
    time.sleep(1.1)  # creationTimestamp has a resolution of a second: "behind" is younger
    apply(api, ns, laionpart("behind", tiny / "meta_1.parquet", tmp_path / "behind"))
    wait_phase(api, ns, "behind", "Queued")
    forgetful.forget(job_id)
    forgotten = time.monotonic()
    status = wait_phase(api, ns, "lost", "Failed", timeout=60)
    assert time.monotonic() - forgotten < 20, "not noticed within two polls (1 s each, on a busy machine)"
    assert reason(status) == "JobVanished" and job_id in status["message"], status
    assert wait_phase(api, ns, "behind", ("Succeeded", "Failed"), timeout=300)["phase"] == "Succeeded"


def test_a_vanished_job_with_retries_left_is_run_again(
    api, operators, forgetful, ray_cluster, kube_namespace, slow, tmp_path
):
    ns = kube_namespace
    operators(ray=forgetful)
    apply(api, ns, laionpart("again", slow, tmp_path / "again", maxRetries=1, download={"parallelism": 1}))
    job_id = wait_phase(api, ns, "again", "Downloading")["submissionId"]
    forgetful.forget(job_id)
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


def test_a_backoff_ends_when_the_part_is_suspended(api, operators, forgetful, kube_namespace, slow, tmp_path):
    """A retry waits retryBackoffSeconds × 2^attempt (here 10 minutes) in phase Queued, its slot free;
    a suspend ends the wait at once."""
    ns = kube_namespace
    operators(ray=forgetful, env={"LAION_OPERATOR_RETRY_BACKOFF_SECONDS": "600"})
    apply(api, ns, laionpart("patient", slow, tmp_path / "patient", maxRetries=2, download={"parallelism": 1}))
    job_id = wait_phase(api, ns, "patient", "Downloading")["submissionId"]
    forgetful.forget(job_id)
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
