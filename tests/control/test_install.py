"""The operator as the chart configures it: credentials from a Secret (jobs mode), and KubeRay mode."""

from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from laion_operator.spec import PartSpec
from laion_operator.testbed.demo_data import write_metadata
from tests.support.chart import install, manifests, one, operator_config, render
from tests.support.kinds import GROUP, PLURAL, RAYJOB_CRD, VERSION, wait_until
from tests.support.operator_proc import OperatorProcess
from tests.support.services import LOOPBACK_RAY, RayCluster
from tests.support.specs import laionpart

ROOT = Path(__file__).resolve().parents[2]
SECRET = "laion-s3"
# Each test here installs the chart with values of its own.
pytestmark = pytest.mark.usefixtures("default_chart_after")


@pytest.fixture(scope="module")
def metadata(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("meta") / "part.parquet"
    write_metadata(path, 50, image_server.base_url, seed=31, failure_mix={"ok": 0.8, "http_4xx": 0.2})
    return path


@pytest.fixture
def chart_operator(api, ray_cluster, tmp_path):
    """The operator run with the configuration file the chart renders for the given values."""
    started = []

    def start(values: dict) -> OperatorProcess:
        config = operator_config(manifests(render(values)))
        # As the chart's operator.extraEnv would: this test bed's Ray instead of the in-cluster Service.
        env = {**ray_cluster.client_env(), "LAION_OPERATOR_RAY_ADDRESS": ray_cluster.dashboard_url}
        op = OperatorProcess(tmp_path, install(api, values), config, env=env)
        started.append(op)
        return op.start()

    yield start
    for op in started:
        op.stop()


def part_doc(name: str, source: Path, output: dict, **spec) -> dict:
    return laionpart(name, source, output, samples_per_shard=20, **spec)


def wait_status(api, namespace, name, predicate, timeout=240) -> dict:
    return wait_until(api, PLURAL, namespace, name, predicate, timeout)["status"]


def test_part_succeeds_with_credentials_from_a_secret(api, chart_operator, ray_cluster, s3, metadata, kube_namespace):
    op = chart_operator({"credentialsSecrets": [SECRET]})
    bucket = s3.create_bucket("secret-parts")
    api.kubectl(
        "create",
        "secret",
        "generic",
        SECRET,
        "-n",
        kube_namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.ACCESS_KEY}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.SECRET_KEY}",
        f"--from-literal=AWS_ENDPOINT_URL={s3.endpoint}",
    )
    # Two parts with one Secret at once, as a dataset's parts have: each job gets a credentials
    # package of its own (Ray would unpack a shared one again over the first job's running workers).
    for name, prefix in (("secret-part", "p"), ("secret-twin", "twin")):
        doc = part_doc(
            name,
            metadata,
            {"uri": f"s3://{bucket}/{prefix}", "region": "us-east-1", "pathStyle": True, "credentialsSecret": SECRET},
        )
        api.kubectl("apply", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(doc))
    status = wait_status(api, kube_namespace, "secret-part", lambda s: s.get("phase") in ("Succeeded", "Failed"))
    assert status["phase"] == "Succeeded", (status, op.logs())
    twin = wait_status(api, kube_namespace, "secret-twin", lambda s: s.get("phase") in ("Succeeded", "Failed"))
    assert twin["phase"] == "Succeeded", (twin, op.logs())

    summary = json.loads(s3.client().get_object(Bucket=bucket, Key="p/part_secret-part_summary.json")["Body"].read())
    assert status["images"]["ok"] == summary["images"]["ok"] > 0
    assert "p/part_secret-part_stats.csv" in s3.keys(bucket, "p/")

    # The secret's values appear nowhere users or logs can see.
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    job = client.get_job_info(status["submissionId"])
    packages = {job.runtime_env["working_dir"], client.get_job_info(twin["submissionId"]).runtime_env["working_dir"]}
    assert len(packages) == 2, packages
    visible = {
        "LaionPart": api.kubectl("get", "lp", "secret-part", "-n", kube_namespace, "-o", "json").stdout,
        "Ray job": repr(job) + json.dumps(job.runtime_env) + job.entrypoint,
        "Ray job logs": client.get_job_logs(status["submissionId"]),
        "operator logs": op.logs(),
        "metrics": op.metrics(),
    }
    for where, text in visible.items():
        assert s3.SECRET_KEY not in text, where
        assert s3.ACCESS_KEY not in text, where
    assert "laion_part_images_total" in visible["metrics"]


@pytest.fixture(scope="module")
def token_ray():
    """A Ray cluster of its own with token authentication on: Ray's default from 2.61."""
    cluster = RayCluster(auth_token=f"laion-test-{secrets.token_hex(16)}").start()
    yield cluster
    cluster.stop()


def container_env(docs: list[dict], api, namespace: str) -> dict[str, str]:
    """The operator container's environment as the kubelet sets it: values, and Secret keys read from the API."""
    env = {}
    for item in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            secret = json.loads(api.kubectl("get", "secret", ref["name"], "-n", namespace, "-o", "json").stdout)
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        elif "value" in item:
            env[item["name"]] = item["value"]
    return env


def test_jobs_mode_with_ray_token_authentication(api, token_ray, metadata, kube_namespace, tmp_path):
    token = token_ray.auth["RAY_AUTH_TOKEN"]
    api.kubectl(
        "create", "secret", "generic", "raycluster-auth", "-n", kube_namespace, f"--from-literal=auth_token={token}"
    )
    docs = manifests(render({"operator": {"rayAuthTokenSecret": {"name": "raycluster-auth"}}}))
    config = operator_config(docs)
    ray = {**LOOPBACK_RAY, "LAION_OPERATOR_RAY_ADDRESS": token_ray.dashboard_url}
    args = ("--standalone", "--namespace", kube_namespace)
    doc = part_doc("token-part", metadata, {"uri": str(tmp_path / "out")})

    # Without the token, the part says what is missing and where to give it.
    (tmp_path / "without").mkdir()
    operator_env = install(api, {"operator": {"rayAuthTokenSecret": {"name": "raycluster-auth"}}})
    op = OperatorProcess(tmp_path / "without", operator_env, config, env=ray, args=args).start()
    try:
        api.kubectl("apply", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(doc))
        status = wait_status(
            api, kube_namespace, "token-part", lambda s: "rayAuthTokenSecret" in s.get("message", ""), timeout=120
        )
        assert "refused the operator" in status["message"] and status.get("phase") != "Succeeded"
        assert "submissionId" not in status
    finally:
        op.stop()

    # With the environment the chart's Deployment gives the operator from that Secret, it runs.
    env = container_env(docs, api, kube_namespace)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == token
    (tmp_path / "with").mkdir()
    op = OperatorProcess(
        tmp_path / "with",
        operator_env,
        config,
        args=args,
        env={**ray, **{k: v for k, v in env.items() if k.startswith("RAY_AUTH")}},
    ).start()
    try:
        status = wait_status(api, kube_namespace, "token-part", lambda s: s.get("phase") in ("Succeeded", "Failed"))
        assert status["phase"] == "Succeeded", (status, op.logs())
        assert status["images"]["ok"] > 0
        job_id = status["submissionId"]
        visible = {
            "LaionPart": api.kubectl("get", "lp", "token-part", "-n", kube_namespace, "-o", "json").stdout,
            "Ray job": json.dumps(token_ray.jobs_api(f"/api/jobs/{job_id}")),
            "Ray job logs": json.dumps(token_ray.jobs_api(f"/api/jobs/{job_id}/logs")),
            "operator logs": op.logs(),
            "metrics": op.metrics(),
        }
        assert (
            "laion-operator job" in visible["Ray job"] and "token-part" in visible["Ray job logs"] + visible["Ray job"]
        )
        for where, text in visible.items():
            assert token not in text, where
    finally:
        op.stop()


def rayjob_schema() -> dict:
    crd = yaml.safe_load(RAYJOB_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def closed(schema: dict) -> dict:
    """The schema refusing fields it does not declare, which the API server would silently drop."""
    schema = dict(schema)
    if (
        schema.get("type") == "object"
        and "properties" in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
        schema["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
    if "items" in schema:
        schema["items"] = closed(schema["items"])
    return schema


def rayjob_status(api, namespace, name) -> dict:
    return (api.get("ray.io", "v1", "rayjobs", namespace, name) or {}).get("status") or {}


def wait_rayjob(api, namespace, name, deployment: str, timeout: float = 120) -> dict:
    """Until KubeRay itself has written `deployment` as the RayJob's jobDeploymentStatus."""
    deadline = time.monotonic() + timeout
    while (status := rayjob_status(api, namespace, name)).get("jobDeploymentStatus") != deployment:
        assert time.monotonic() < deadline, (deployment, status, api.components["kuberay-operator"].logs()[-3000:])
        time.sleep(0.5)
    return status


def pods_of(api, namespace: str, selector: str) -> list[dict]:
    return api.list("", "v1", "pods", namespace, label_selector=selector)


def kubelet_sets(api, pod: dict, phase: str, ready: bool = False, exit_code: int | None = None) -> None:
    """What the kubelet of the pod's node would write, and nothing else: phase, conditions, container states."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    containers = pod["spec"]["containers"]
    if phase == "Running":
        states = [
            {
                "name": c["name"],
                "ready": ready,
                "restartCount": 0,
                "image": c["image"],
                "imageID": "",
                "started": True,
                "state": {"running": {"startedAt": now}},
            }
            for c in containers
        ]
    else:
        states = [
            {
                "name": c["name"],
                "ready": False,
                "restartCount": 0,
                "image": c["image"],
                "imageID": "",
                "state": {
                    "terminated": {
                        "exitCode": exit_code or 0,
                        "startedAt": now,
                        "finishedAt": now,
                        "reason": "Error" if exit_code else "Completed",
                    }
                },
            }
            for c in containers
        ]
    conditions = [
        {"type": t, "status": "True" if (ready or t == "PodScheduled") else "False", "lastTransitionTime": now}
        for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
    ]
    api.patch_status(
        "",
        "v1",
        "pods",
        pod["metadata"]["namespace"],
        pod["metadata"]["name"],
        {"phase": phase, "conditions": conditions, "containerStatuses": states, "startTime": now},
    )


def fail_submitter(api, namespace: str, rayjob: str, timeout: float = 120) -> None:
    """The submitter Job's pods fail, each as the Job controller makes it, until KubeRay sees the Job fail."""
    deadline = time.monotonic() + timeout
    failed: set[str] = set()
    while rayjob_status(api, namespace, rayjob).get("jobDeploymentStatus") == "Running":
        for pod in pods_of(api, namespace, f"job-name={rayjob}"):
            if pod["metadata"]["name"] not in failed and not pod["metadata"].get("deletionTimestamp"):
                kubelet_sets(api, pod, "Failed", exit_code=1)
                failed.add(pod["metadata"]["name"])
        assert time.monotonic() < deadline, rayjob_status(api, namespace, rayjob)
        time.sleep(0.5)


def kubelet_starts_ray_pods(api, namespace: str, rayjob: str, timeout: float = 90) -> None:
    """The kubelet runs the RayCluster's pods, ready, until KubeRay moves the RayJob to Running (it
    then has created the submitter Job)."""
    cluster = wait_rayjob(api, namespace, rayjob, "Initializing")["rayClusterName"]
    deadline = time.monotonic() + timeout
    while rayjob_status(api, namespace, rayjob).get("jobDeploymentStatus") != "Running":
        for pod in pods_of(api, namespace, f"ray.io/cluster={cluster}"):
            if pod.get("status", {}).get("phase") != "Running":
                kubelet_sets(api, pod, "Running", ready=True)
        assert time.monotonic() < deadline, (
            rayjob_status(api, namespace, rayjob),
            api.components["kuberay-operator"].logs()[-3000:],
        )
        time.sleep(1)


@pytest.fixture(scope="module")
def kuberay(api):
    """The real KubeRay operator, built from its pinned release, reconciling the operator's RayJobs."""
    return api.start_kuberay()


def test_kuberay_mode_rayjobs_pass_kuberays_validation_and_its_states_reach_the_part(
    api, kuberay, chart_operator, metadata, kube_namespace, tmp_path
):
    """There is no kubelet and no Ray in these pods: the test sets only what a kubelet would (pod
    phases and readiness), and every RayJob state the part reacts to is one KubeRay itself wrote. A
    RayJob cannot complete here (KubeRay reads a job's end from the Ray dashboard behind the head
    Service, which needs pod networking), so the failure path is the one followed to its end."""
    chart_operator({"operator": {"config": {"mode": "kuberay"}}, "credentialsSecrets": [SECRET]})
    api.kubectl("create", "secret", "generic", SECRET, "-n", kube_namespace, "--from-literal=AWS_ACCESS_KEY_ID=x")
    doc = part_doc("kr", metadata, {"uri": str(tmp_path / "out"), "credentialsSecret": SECRET}, maxRetries=1)
    api.kubectl("apply", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(doc))
    name = wait_status(api, kube_namespace, "kr", lambda s: bool(s.get("submissionId")))["submissionId"]
    rayjob = api.get("ray.io", "v1", "rayjobs", kube_namespace, name)
    manifest = {k: rayjob[k] for k in ("apiVersion", "kind", "spec")}
    manifest["metadata"] = {"name": name, "namespace": kube_namespace}
    jsonschema.validate(manifest, closed(rayjob_schema()), cls=jsonschema.Draft4Validator)
    lp = api.get(GROUP, VERSION, PLURAL, kube_namespace, "kr")
    owner = rayjob["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("LaionPart", lp["metadata"]["uid"], True)
    cluster = rayjob["spec"]["rayClusterSpec"]
    containers = [
        c for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]
    ]
    assert all({"secretRef": {"name": SECRET}} in c["envFrom"] for c in containers)
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]
    assert PartSpec.from_dict(json.loads(env["LAION_PART_SPEC"])).to_dict() == PartSpec.from_dict(doc["spec"]).to_dict()

    # KubeRay takes the RayJob: its validation passes, it makes the RayCluster and the head pod.
    status = wait_rayjob(api, kube_namespace, name, "Initializing")
    raycluster = api.get("ray.io", "v1", "rayclusters", kube_namespace, status["rayClusterName"])
    assert raycluster["metadata"]["ownerReferences"][0]["name"] == name
    deadline = time.monotonic() + 60
    while not pods_of(api, kube_namespace, f"ray.io/cluster={status['rayClusterName']}"):
        assert time.monotonic() < deadline, "KubeRay made no pod"
        time.sleep(0.5)
    assert wait_status(api, kube_namespace, "kr", lambda s: s.get("phase") == "Pending")["submissionId"] == name

    # The kubelet starts the Ray pods: the cluster is ready, KubeRay creates the submitter Job.
    kubelet_starts_ray_pods(api, kube_namespace, name)
    assert api.get("batch", "v1", "jobs", kube_namespace, name) is not None  # the submitter

    # The submitter's pods fail: KubeRay marks the RayJob Failed, the part retries as a new RayJob ...
    fail_submitter(api, kube_namespace, name)
    failed = wait_rayjob(api, kube_namespace, name, "Failed")
    assert failed["reason"] == "SubmissionFailed", failed
    retry = wait_status(api, kube_namespace, "kr", lambda s: s.get("submissionId", name) != name)["submissionId"]
    assert retry.endswith("-a1")
    # ... whose submitter fails too: past maxRetries the part fails, with KubeRay's reason in its message.
    kubelet_starts_ray_pods(api, kube_namespace, retry)
    fail_submitter(api, kube_namespace, retry)
    part = wait_status(api, kube_namespace, "kr", lambda s: s.get("phase") == "Failed")
    conditions = {c["type"]: c for c in part["conditions"]}
    assert conditions["Failed"]["reason"] == "RetriesExhausted", part
    assert "Job submission has failed" in part["message"] and "BackoffLimitExceeded" in part["message"], part["message"]


def test_two_replicas_with_peering_never_both_handle_a_part(api, ray_cluster, metadata, kube_namespace, tmp_path):
    docs = manifests(render({"replicas": 2}))
    operator_env = install(api, {"replicas": 2})  # the peering CRD and object come with the chart
    peering = next(d for d in docs if d["kind"] == "ClusterKopfPeering")
    config = operator_config(docs)
    assert config["peeringName"] == peering["metadata"]["name"]
    env = {**ray_cluster.client_env(), "LAION_OPERATOR_RAY_ADDRESS": ray_cluster.dashboard_url}
    replicas = []
    try:
        for i in range(2):  # as the chart's Deployment runs them: with peering, not --standalone
            workdir = tmp_path / f"replica-{i}"
            workdir.mkdir()
            replicas.append(
                OperatorProcess(workdir, operator_env, config, env={**env, "POD_ID": f"replica-{i}"}, args=()).start()
            )

        def working(op) -> bool:
            # kopf starts a replica paused until its first peering event and logs each change after;
            # a replica whose first event already shows a higher peer stays paused without a line.
            states = [
                line for line in op.logs().splitlines() if "Pausing operations" in line or "Resuming operations" in line
            ]
            return bool(states) and "Resuming" in states[-1]

        # Once both keep-alives are in the peering object, the replica of the highest priority works
        # and the other waits (kopf's peering is eventual: until then both may act, and a part applied
        # meanwhile would get the same job id from both, so one job).
        ids = [f"replica-{i}" for i in range(2)]
        deadline = time.monotonic() + 150
        while True:
            peers = (api.get("kopf.dev", "v1", "clusterkopfpeerings", None, peering["metadata"]["name"]) or {}).get(
                "status"
            ) or {}
            if set(ids) <= set(peers):
                leader = max(ids, key=lambda i: peers[i]["priority"])
                if [working(op) for op in replicas] == [i == leader for i in ids]:
                    break
            assert time.monotonic() < deadline, "\n\n".join(op.logs() for op in replicas)
            time.sleep(0.5)
        doc = part_doc("peered", metadata, {"uri": str(tmp_path / "out")})
        api.kubectl("apply", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(doc))
        status = wait_status(api, kube_namespace, "peered", lambda s: s.get("phase") in ("Succeeded", "Failed"))
        assert status["phase"] == "Succeeded", status
        from ray.job_submission import JobSubmissionClient

        jobs = [
            j
            for j in JobSubmissionClient(ray_cluster.dashboard_url).list_jobs()
            if (j.metadata or {}).get("laion-operator.io/part") == "peered"
        ]
        assert [j.submission_id for j in jobs] == [status["submissionId"]]
        handled = [op for op in replicas if f"submitted job {status['submissionId']}" in op.logs()]
        assert len(handled) == 1

        assert [working(op) for op in replicas] == [i == leader for i in ids]
        idle = replicas[1 - ids.index(leader)]
        assert "laion_operator.control.parts" not in idle.logs()  # the paused replica never touched the part
    finally:
        for op in replicas:
            op.stop()
