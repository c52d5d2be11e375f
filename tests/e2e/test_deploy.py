"""The deployment as users run it, end to end, in real pods on the test bed's node.

`helm install` of the previous chart release, the new CRDs applied and `helm upgrade` to this tree's
chart (as the README tells users), with the operator and ray-worker images built from this tree
(`scripts/build-images --testbed`). Then, with `kubectl apply`: a LaionPart as a RayJob that KubeRay
drives to its end in pods of the ray-worker image (kuberay mode); the same part against a RayCluster
in pods, reached by its Service name through CoreDNS (jobs mode); a LaionDataset of three parts; a
real Prometheus scraping the operator pod as the chart's ServiceMonitor describes; the faults a
cluster has (the operator pod deleted, the Ray head pod killed, the kubelet restarted, each in the
middle of a part); `helm uninstall`, leaving the output.

The tests run in file order and share the release: each one leaves it as the next expects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from laion_operator.control.backend import submission_prefix
from laion_operator.control.rayjobs import kuberay_state
from laion_operator.spec import Output
from laion_operator.storage import Store
from laion_operator.testbed.demo_data import write_metadata
from tests.e2e.conftest import (
    CHART,
    PREVIOUS_CHART,
    SECRET,
    pod_logs,
    ray_cluster_doc,
    remove_crds,
    small_ray_template,
    wait_pods_ready,
    wait_rollout,
)
from tests.support.exactly_once import check_exactly_once
from tests.support.kuberay_states import expected_state
from tests.support.network import TESTBED_BLOCK
from tests.support.prometheus import Prometheus, dashboard_exprs, grafana_substitute, service_monitor_scrape
from tests.support.specs import OPERATOR_DOWNLOAD

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION = "laion-operator.io", "v1alpha1"
RELEASE, SYSTEM, PARTS = "e2e", "laion-e2e", "laion-e2e-parts"
FULLNAME = f"{RELEASE}-laion-operator"
OPERATOR_PODS = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/name=laion-operator"
BUCKET = "e2e"
RAY_CLUSTER = "e2e-ray"
# Images from the bridge's image server: pods reach it there, and the downloader opens that block
# only because the part says so.
DOWNLOAD = {**OPERATOR_DOWNLOAD, "allowedNetworks": [TESTBED_BLOCK]}


@pytest.fixture(scope="module")
def e2e(kube_api, kube_node, helm, bridge_s3, bridge_images):
    """The release, installed at the previous chart version and upgraded to this tree's chart."""
    images = kube_node.images
    kube_api.create_namespace(PARTS)
    bridge_s3.create_bucket(BUCKET)
    kube_api.kubectl(
        "create",
        "secret",
        "generic",
        SECRET,
        "-n",
        PARTS,
        f"--from-literal=AWS_ACCESS_KEY_ID={bridge_s3.ACCESS_KEY}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={bridge_s3.SECRET_KEY}",
        f"--from-literal=AWS_ENDPOINT_URL={bridge_s3.endpoint}",
        "--from-literal=AWS_DEFAULT_REGION=us-east-1",
    )
    values = {
        "image": {"repository": images["operator"].repository, "tag": images["operator"].tag},
        "rayWorkerImage": {"repository": images["ray-worker"].repository, "tag": images["ray-worker"].tag},
        "watchNamespaces": [PARTS],
        "credentialsSecrets": [SECRET],
        "operator": {"config": {"mode": "kuberay", "pollSeconds": 2, "rayJobTemplate": small_ray_template()}},
    }
    values_file = helm.values_file(values)
    remove_crds(kube_api, CHART / "crds")
    installed = helm("install", RELEASE, str(PREVIOUS_CHART), "-n", SYSTEM, "--create-namespace", "-f", values_file)
    wait_rollout(kube_api, SYSTEM, FULLNAME, OPERATOR_PODS)
    # The README's upgrade: the new CRDs first (Helm never upgrades crds/), then the chart.
    kube_api.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    upgraded = helm("upgrade", RELEASE, str(CHART), "-n", SYSTEM, "-f", values_file)
    wait_rollout(kube_api, SYSTEM, FULLNAME, OPERATOR_PODS)
    state = {"images": images, "values": values, "installed": installed, "upgraded": upgraded, "rayjob_states": set()}
    yield state
    helm("uninstall", RELEASE, "-n", SYSTEM, "--wait", check=False)


def operator_pod(kube_api) -> dict:
    return wait_pods_ready(kube_api, SYSTEM, OPERATOR_PODS)[0]


def put_metadata(s3, key: str, rows: int, base_url: str, **kwargs) -> str:
    """LAION-like metadata in the bucket (the pods read their source from object storage)."""
    local = Path(s3.root) / f"meta-{key.replace('/', '-')}"
    write_metadata(local, rows, base_url, return_table=False, **kwargs)
    s3.client().upload_file(str(local), BUCKET, key)
    return f"s3://{BUCKET}/{key}"


def part_doc(name: str, source: str, prefix: str, **spec) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LaionPart",
        "metadata": {"name": name, "namespace": PARTS},
        "spec": {
            "partId": name,
            "source": {"urls": [source]},
            "output": {
                "uri": f"s3://{BUCKET}/{prefix}",
                "region": "us-east-1",
                "pathStyle": True,
                "credentialsSecret": SECRET,
            },
            "filter": {"samplesPerShard": spec.pop("samples_per_shard", 10)},
            "download": {**DOWNLOAD, **spec.pop("download", {})},
            **spec,
        },
    }


def apply(kube_api, doc: dict) -> None:
    kube_api.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))


def status_of(kube_api, name: str, plural: str = "laionparts") -> dict:
    return (kube_api.get(GROUP, VERSION, plural, PARTS, name) or {}).get("status") or {}


def wait_phase(kube_api, name: str, phases, plural: str = "laionparts", timeout: float = 600, watch=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = status_of(kube_api, name, plural)
        if watch:
            watch()
        if status.get("phase") in phases:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{plural}/{name} not in {phases} after {timeout} s: {json.dumps(status, indent=1)}\n"
                f"--- operator:\n{pod_logs(kube_api, SYSTEM, OPERATOR_PODS)[-4000:]}\n"
                f"--- pods:\n{kube_api.kubectl('get', 'pods', '-A', '-o', 'wide', check=False).stdout}"
            )
        time.sleep(1)


def store(s3, prefix: str) -> Store:
    return Store(
        Output(
            uri=f"s3://{BUCKET}/{prefix}",
            endpoint=s3.endpoint,
            region="us-east-1",
            path_style=True,
            profile=None,
            credentials_secret=None,
            retry_seconds=30,
        )
    )


def verify_cli(s3, prefix: str) -> subprocess.CompletedProcess:
    """`laion-operator verify` over the output, from outside the cluster, as a user checks it."""
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": s3.ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": s3.SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "laion-operator"),
            "verify",
            f"s3://{BUCKET}/{prefix}",
            "--endpoint",
            s3.endpoint,
            "--region",
            "us-east-1",
            "--path-style",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def rayjob_watcher(kube_api, seen: set):
    """Records every (jobDeploymentStatus, jobStatus) KubeRay writes on the namespace's RayJobs."""

    def watch() -> None:
        for job in kube_api.list("ray.io", "v1", "rayjobs", PARTS):
            status = job.get("status") or {}
            seen.add((status.get("jobDeploymentStatus") or "", status.get("jobStatus") or ""))

    return watch


def the_part_equals_its_output(kube_api, s3, name: str, prefix: str) -> dict:
    """The status says what the output holds, each sample once, and the output verifies."""
    status = status_of(kube_api, name)
    summary = check_exactly_once(store(s3, prefix), status=status)
    assert status["images"]["ok"] == summary["images"]["ok"] > 0, (status, summary)
    verified = verify_cli(s3, prefix)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert any(key.endswith("_stats.csv") for key in s3.keys(BUCKET, prefix + "/")), s3.keys(BUCKET, prefix + "/")
    return summary


# --- install ---------------------------------------------------------------------------------------


def test_helm_upgrades_from_the_previous_chart_version(e2e, helm):
    assert "STATUS: deployed" in e2e["installed"].stdout, e2e["installed"].stdout
    history = json.loads(helm("history", RELEASE, "-n", SYSTEM, "-o", "json").stdout)
    assert [h["revision"] for h in history] == [1, 2], history
    assert history[0]["chart"] == "laion-operator-0.1.0", history
    current = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    assert history[1]["chart"] == f"laion-operator-{current}" and history[1]["status"] == "deployed", history


def test_the_operator_pod_runs_its_image_under_the_charts_security_context(e2e, kube_api):
    kube_api.kubectl("rollout", "status", f"deployment/{FULLNAME}", "-n", SYSTEM, "--timeout=180s", timeout=200)
    pod = operator_pod(kube_api)
    container = pod["spec"]["containers"][0]
    assert container["image"] == e2e["images"]["operator"].ref
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    state = pod["status"]["containerStatuses"][0]
    assert state["ready"] and state["restartCount"] == 0, state
    # The process really runs as the chart's user, and kubectl reaches it through the kubelet.
    name = pod["metadata"]["name"]
    uid = kube_api.kubectl("exec", "-n", SYSTEM, name, "--", "id", "-u").stdout.strip()
    assert uid == "10001", uid
    logs = kube_api.kubectl("logs", "-n", SYSTEM, name).stdout
    assert logs.strip(), "the operator pod logged nothing"


# --- kuberay mode ----------------------------------------------------------------------------------


def test_a_part_runs_as_a_rayjob_that_kuberay_completes_in_pods(e2e, kube_api, bridge_s3, bridge_images):
    source = put_metadata(
        bridge_s3, "meta/kuberay.parquet", 40, bridge_images.base_url, seed=41,
        failure_mix={"ok": 0.8, "http_4xx": 0.2},
    )  # fmt: skip
    apply(kube_api, part_doc("kuberay-part", source, "kuberay"))
    watch = rayjob_watcher(kube_api, e2e["rayjob_states"])
    status = wait_phase(kube_api, "kuberay-part", ("Succeeded", "Failed"), watch=watch)
    assert status["phase"] == "Succeeded", (status, pod_logs(kube_api, SYSTEM, OPERATOR_PODS)[-3000:])
    # KubeRay writes the job's end first (Running/SUCCEEDED), then, once its submitter Job is done,
    # the deployment's (Complete).
    deadline = time.monotonic() + 180
    while ("Complete", "SUCCEEDED") not in e2e["rayjob_states"]:
        assert time.monotonic() < deadline, e2e["rayjob_states"]
        watch()
        time.sleep(1)
    the_part_equals_its_output(kube_api, bridge_s3, "kuberay-part", "kuberay")


def test_a_rayjob_that_kuberay_fails_fails_the_part(e2e, kube_api, bridge_s3):
    apply(kube_api, part_doc("missing-source", f"s3://{BUCKET}/meta/missing.parquet", "missing", maxRetries=0))
    watch = rayjob_watcher(kube_api, e2e["rayjob_states"])
    status = wait_phase(kube_api, "missing-source", ("Succeeded", "Failed"), watch=watch)
    assert status["phase"] == "Failed", status
    assert "missing.parquet" in status.get("message", ""), status


def test_every_rayjob_state_kuberay_reached_maps_to_what_the_part_expects(e2e):
    """tests/support/kuberay_states.py is the table test_lifecycle checks the mapping with; these are
    the states KubeRay itself wrote in this run: each is in the table, and maps as the table says."""
    seen = e2e["rayjob_states"]
    assert ("Complete", "SUCCEEDED") in seen, seen
    assert any(job == "FAILED" or deployment == "Failed" for deployment, job in seen), seen
    for deployment, job in sorted(seen):
        expected = expected_state(deployment, job)
        assert expected is not None, f"KubeRay wrote {(deployment, job)}, which the table lacks"
        state = kuberay_state("job", {"jobDeploymentStatus": deployment, "jobStatus": job}).state
        assert state is expected, (deployment, job, state)


# --- jobs mode -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jobs_mode(e2e, kube_api, helm):
    """A RayCluster in pods, and the release switched to jobs mode against its Service's name."""
    image = e2e["images"]["ray-worker"].ref
    apply(kube_api, {**ray_cluster_doc(RAY_CLUSTER, image), "metadata": {"name": RAY_CLUSTER, "namespace": PARTS}})
    wait_pods_ready(kube_api, PARTS, f"ray.io/cluster={RAY_CLUSTER}", count=2, timeout=300)
    values = {
        **e2e["values"],
        "operator": {
            "config": {
                **e2e["values"]["operator"]["config"],
                "mode": "jobs",
                "rayAddress": f"http://{RAY_CLUSTER}-head-svc.{PARTS}.svc:8265",
                # This test cluster's Ray has no token; the credentials travel in the job's package.
                "allowCredentialsWithoutRayAuth": True,
            }
        },
    }
    helm("upgrade", RELEASE, str(CHART), "-n", SYSTEM, "-f", helm.values_file(values))
    wait_rollout(kube_api, SYSTEM, FULLNAME, OPERATOR_PODS)
    return values


def head_service_url(kube_api) -> str:
    """The Ray dashboard behind the head's Service (KubeRay makes it headless: its pod's address)."""
    svc = kube_api.get("", "v1", "services", PARTS, f"{RAY_CLUSTER}-head-svc")
    if svc["spec"].get("clusterIP") not in (None, "None"):
        return f"http://{svc['spec']['clusterIP']}:8265"
    head = wait_pods_ready(kube_api, PARTS, f"ray.io/cluster={RAY_CLUSTER},ray.io/node-type=head")[0]
    return f"http://{head['status']['podIP']}:8265"


def ray_jobs_of(kube_api, part: str) -> list[dict]:
    """The Ray jobs of a part, from the cluster's own Jobs API (through its Service's address)."""
    from ray.job_submission import JobSubmissionClient

    prefix = submission_prefix(kube_api.get(GROUP, VERSION, "laionparts", PARTS, part)["metadata"]["uid"])
    jobs = JobSubmissionClient(head_service_url(kube_api)).list_jobs()
    return [j for j in jobs if (j.submission_id or "").startswith(prefix)]


def test_jobs_mode_runs_a_part_on_a_raycluster_reached_by_its_service_name(
    jobs_mode, kube_api, bridge_s3, bridge_images
):
    source = put_metadata(bridge_s3, "meta/jobs.parquet", 40, bridge_images.base_url, seed=43)
    apply(kube_api, part_doc("jobs-part", source, "jobs"))
    status = wait_phase(kube_api, "jobs-part", ("Succeeded", "Failed"))
    assert status["phase"] == "Succeeded", status
    the_part_equals_its_output(kube_api, bridge_s3, "jobs-part", "jobs")


def test_a_dataset_of_three_parts_writes_its_index(jobs_mode, kube_api, bridge_s3, bridge_images):
    for part in (1, 2, 3):
        put_metadata(bridge_s3, f"meta/ds/meta_{part}.parquet", 20, bridge_images.base_url, seed=50 + part)
    doc = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LaionDataset",
        "metadata": {"name": "trio", "namespace": PARTS},
        "spec": {
            "source": {"pattern": f"s3://{BUCKET}/meta/ds/meta_{{part}}.parquet", "first": 1, "last": 3},
            "template": {
                "filter": {"samplesPerShard": 10},
                "download": DOWNLOAD,
                "output": {
                    "uri": f"s3://{BUCKET}/trio",
                    "region": "us-east-1",
                    "pathStyle": True,
                    "credentialsSecret": SECRET,
                },
                "maxRetries": 0,
            },
        },
    }
    apply(kube_api, doc)
    status = wait_phase(kube_api, "trio", ("Succeeded", "Failed"), plural="laiondatasets", timeout=900)
    assert status["phase"] == "Succeeded", status
    index = json.loads(bridge_s3.client().get_object(Bucket=BUCKET, Key="trio/dataset_index.json")["Body"].read())
    assert len(index["parts"]) == 3, index
    for part in kube_api.list(GROUP, VERSION, "laionparts", PARTS, label_selector="laion-operator.io/dataset=trio"):
        check_exactly_once(store(bridge_s3, part["status"]["output"].split(f"{BUCKET}/", 1)[1]), status=part["status"])


# --- monitoring ------------------------------------------------------------------------------------


def test_prometheus_scrapes_the_operator_pod_as_the_servicemonitor_says_and_every_panel_has_data(
    jobs_mode, kube_api, helm, bridge_s3, bridge_images
):
    rendered = helm(
        "template", RELEASE, str(CHART), "-n", SYSTEM, "-f", helm.values_file(jobs_mode),
        "--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.interval=2s",
        "--set", "serviceMonitor.scrapeTimeout=2s", "--show-only", "templates/servicemonitor.yaml",
    ).stdout  # fmt: skip
    monitor = yaml.safe_load(rendered)
    with Prometheus([], scrape_configs=service_monitor_scrape(monitor, kube_api)) as prom:
        prom.wait_for_target(timeout=60)
        target = prom.api("targets")["activeTargets"][0]
        assert target["labels"]["job"] == "laion-operator", target
        assert target["labels"]["pod"] == operator_pod(kube_api)["metadata"]["name"], target
        # A part downloading while Prometheus scrapes (the rates and the ETA need one in progress),
        # with failures of several kinds; "timeout" URLs answer after slow_seconds, within the
        # part's 5 s timeout: slow, not failed.
        source = put_metadata(
            bridge_s3, "meta/watched.parquet", 80, bridge_images.base_url, seed=71, slow_seconds=1,
            failure_mix={"timeout": 0.7, "http_4xx": 0.15, "http_5xx": 0.15},
        )  # fmt: skip
        apply(kube_api, part_doc("watched", source, "watched", download={"maxInFlight": 2, "parallelism": 1}))
        prom.wait_until('rate(laion_part_images_total{part="watched"}[30s]) > 0', timeout=300)
        deadline = time.monotonic() + 60
        while empty := [where for where, expr in dashboard_exprs() if not prom.query(grafana_substitute(expr))]:
            assert time.monotonic() < deadline, f"dashboard panels without data: {empty}"
            time.sleep(2)
    assert wait_phase(kube_api, "watched", ("Succeeded", "Failed"))["phase"] == "Succeeded"


# --- faults ----------------------------------------------------------------------------------------


def slow_part(kube_api, bridge_s3, bridge_images, name: str, seed: int) -> None:
    """A part that takes a while: every image answers after a second (the "timeout" URLs, slower
    than slow_seconds only), a few at a time."""
    source = put_metadata(
        bridge_s3, f"meta/{name}.parquet", 60, bridge_images.base_url, seed=seed,
        slow_seconds=1, failure_mix={"timeout": 1.0},
    )  # fmt: skip
    apply(kube_api, part_doc(name, source, name, download={"maxInFlight": 2, "parallelism": 1}))
    wait_phase(kube_api, name, ("Downloading", "Succeeded", "Failed"), timeout=300)


def test_the_operator_pod_deleted_mid_part_is_replaced_and_adopts_the_job(
    jobs_mode, kube_api, bridge_s3, bridge_images
):
    slow_part(kube_api, bridge_s3, bridge_images, "adopted", seed=61)
    old = operator_pod(kube_api)["metadata"]["name"]
    kube_api.kubectl("delete", "pod", "-n", SYSTEM, old, "--wait=false")
    status = wait_phase(kube_api, "adopted", ("Succeeded", "Failed"))
    new = operator_pod(kube_api)["metadata"]["name"]
    assert new != old
    assert status["phase"] == "Succeeded", status
    assert len(ray_jobs_of(kube_api, "adopted")) == 1, ray_jobs_of(kube_api, "adopted")
    the_part_equals_its_output(kube_api, bridge_s3, "adopted", "adopted")


def test_the_ray_head_pod_killed_mid_part_is_recreated_and_the_part_resumes_exactly_once(
    jobs_mode, kube_api, bridge_s3, bridge_images
):
    slow_part(kube_api, bridge_s3, bridge_images, "headless", seed=62)
    head = wait_pods_ready(kube_api, PARTS, f"ray.io/cluster={RAY_CLUSTER},ray.io/node-type=head")[0]
    kube_api.kubectl("delete", "pod", "-n", PARTS, head["metadata"]["name"], "--grace-period=0", "--force")
    status = wait_phase(kube_api, "headless", ("Succeeded", "Failed"), timeout=900)
    assert status["phase"] == "Succeeded", status
    new_head = wait_pods_ready(kube_api, PARTS, f"ray.io/cluster={RAY_CLUSTER},ray.io/node-type=head")[0]
    assert new_head["metadata"]["uid"] != head["metadata"]["uid"]
    the_part_equals_its_output(kube_api, bridge_s3, "headless", "headless")


def test_a_kubelet_restarted_mid_part_leaves_the_pods_and_the_part_running(
    jobs_mode, kube_api, kube_node, bridge_s3, bridge_images
):
    slow_part(kube_api, bridge_s3, bridge_images, "kubelet-restart", seed=63)
    before = {p["metadata"]["uid"]: p for p in kube_api.list("", "v1", "pods", PARTS)}
    kube_node.restart_kubelet()
    kube_node.wait_ready()
    status = wait_phase(kube_api, "kubelet-restart", ("Succeeded", "Failed"))
    assert status["phase"] == "Succeeded", status
    after = {p["metadata"]["uid"]: p for p in kube_api.list("", "v1", "pods", PARTS)}
    ray_pods = [uid for uid, p in before.items() if "ray.io/cluster" in p["metadata"].get("labels", {})]
    for uid in ray_pods:  # the containers ran on: the same pods, not restarted
        assert uid in after
        restarts = [c["restartCount"] for c in after[uid]["status"]["containerStatuses"]]
        assert restarts == [c["restartCount"] for c in before[uid]["status"]["containerStatuses"]], restarts
    the_part_equals_its_output(kube_api, bridge_s3, "kubelet-restart", "kubelet-restart")


# --- uninstall -------------------------------------------------------------------------------------


def test_helm_uninstall_removes_the_operator_and_leaves_the_output(e2e, kube_api, helm, bridge_s3):
    keys = bridge_s3.keys(BUCKET)
    assert any(k.endswith("_summary.json") for k in keys), keys
    helm("uninstall", RELEASE, "-n", SYSTEM, "--wait", "--timeout", "3m")
    assert not kube_api.list("apps", "v1", "deployments", SYSTEM)
    deadline = time.monotonic() + 120
    while kube_api.list("", "v1", "pods", SYSTEM, label_selector=OPERATOR_PODS):
        assert time.monotonic() < deadline, "the operator pod outlived its release"
        time.sleep(1)
    assert bridge_s3.keys(BUCKET) == keys
    assert kube_api.get("apiextensions.k8s.io", "v1", "customresourcedefinitions", None, "laionparts.laion-operator.io")
