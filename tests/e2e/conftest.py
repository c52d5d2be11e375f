"""The deployment as users run it, for the end-to-end tests: the real Helm CLI, the chart's release
with the images built from this tree, and the servers pods use (images, S3) on the node's bridge."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.cluster import CRD_RESOURCE, Cluster, testbed_binaries
from tests.support.failing_web import ImageServer
from tests.support.network import NODE_IP
from tests.support.services import S3Server

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "laion-operator"
# The chart as its previous release shipped it (`helm package` of version 0.1.0): what an upgrade
# starts from.
PREVIOUS_CHART = ROOT / "tests" / "data" / "charts" / "laion-operator-0.1.0.tgz"
SECRET = "laion-s3"


class Helm:
    """The real helm CLI (built from helm.sh/helm/v4 by scripts/build-testbed) as the admin."""

    def __init__(self, cluster: Cluster):
        self.binary = testbed_binaries()["HELM"]
        self.cluster = cluster
        self.home = Path(tempfile.mkdtemp(prefix="helm-"))

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "HOME": str(self.home),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
            "KUBECONFIG": str(self.cluster.kubeconfig_path),
        }
        result = subprocess.run(
            [self.binary, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    def values_file(self, values: dict) -> str:
        path = self.home / f"values-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(values))
        return str(path)


@pytest.fixture(scope="session")
def helm(kube_api) -> Helm:
    return Helm(kube_api)


@pytest.fixture(scope="session")
def bridge_s3() -> Iterator[S3Server]:
    """versitygw on the bridge's address, where pods reach it; its credentials in this process's
    environment, for reading the output back as a user's workstation would."""
    server = S3Server(host=NODE_IP).start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", server.ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", server.SECRET_KEY)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield server
    server.stop()


@pytest.fixture(scope="session")
def bridge_images() -> Iterator[ImageServer]:
    """The loopback internet's image server on the bridge's address."""
    with ImageServer(host=NODE_IP) as server:
        yield server


def remove_crds(cluster: Cluster, crds: Path) -> None:
    """The cluster as a user's is before the first `helm install`: without the project's CRDs, which the
    suite's earlier tests installed (newer than the previous chart's: Helm's server-side apply of its
    crds/ would conflict with their manager). Their objects go first, finalizers of operators long
    stopped removed, so that the CRDs' deletion is not held."""
    docs = [doc for path in sorted(crds.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    for doc in docs:
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc["spec"]
        group, plural, version = spec["group"], spec["names"]["plural"], spec["versions"][0]["name"]
        if cluster.get(*CRD_RESOURCE, None, doc["metadata"]["name"]) is None:
            continue
        for obj in cluster.list(group, version, plural):
            meta = obj["metadata"]
            if meta.get("finalizers"):
                cluster.patch(
                    group, version, plural, meta.get("namespace"), meta["name"], {"metadata": {"finalizers": None}}
                )
        cluster.delete(*CRD_RESOURCE, None, doc["metadata"]["name"])
        cluster.wait_for_deletion(*CRD_RESOURCE, None, doc["metadata"]["name"], timeout=120)


def small_ray_template() -> dict:
    """The chart's default RayJob template with requests this 2-core node can hold (a user with a
    small cluster edits the same fields): one worker, the head and the submitter small."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    template = values["operator"]["config"]["rayJobTemplate"]
    submitter = template["submitterPodTemplate"]["spec"]["containers"][0]
    submitter["resources"] = {"requests": {"cpu": "50m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    head = template["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resources"] = {"requests": {"cpu": "100m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "3Gi"}}
    group = template["rayClusterSpec"]["workerGroupSpecs"][0]
    group.update(replicas=1, minReplicas=1, maxReplicas=1)
    worker = group["template"]["spec"]["containers"][0]
    worker["resources"] = {"requests": {"cpu": "200m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "3Gi"}}
    template["ttlSecondsAfterFinished"] = 5
    return template


def ray_cluster_doc(name: str, image: str) -> dict:
    """A RayCluster of the ray-worker image for jobs mode, as a user would apply it."""
    template = small_ray_template()["rayClusterSpec"]
    for pod in [template["headGroupSpec"]["template"], *(g["template"] for g in template["workerGroupSpecs"])]:
        for container in pod["spec"]["containers"]:
            container["image"] = image
    template["headGroupSpec"]["rayStartParams"] = {"num-cpus": "0", "dashboard-host": "0.0.0.0"}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name}, "spec": template}


def wait_pods_ready(cluster: Cluster, namespace: str, selector: str, count: int = 1, timeout: float = 300) -> list:
    deadline = time.monotonic() + timeout
    while True:
        pods = [
            p
            for p in cluster.list("", "v1", "pods", namespace, label_selector=selector)
            if not p["metadata"].get("deletionTimestamp")
        ]
        ready = [
            p
            for p in pods
            if any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))
        ]
        if len(ready) >= count:
            return ready
        if time.monotonic() > deadline:
            described = cluster.kubectl("describe", "pods", "-n", namespace, "-l", selector, check=False).stdout
            raise AssertionError(f"{selector} in {namespace}: {len(ready)} of {count} pods Ready:\n{described[-6000:]}")
        time.sleep(1)


def pod_logs(cluster: Cluster, namespace: str, selector: str) -> str:
    with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
        return cluster.kubectl("logs", "-n", namespace, "-l", selector, "--tail=200", "--all-containers").stdout
    return ""


# A container stuck in one of these never starts by waiting: a broken image or a value the pod cannot
# run with. Said at once, with the pod's own account, rather than after Helm's timeout.
STUCK = {
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "ErrImageNeverPull",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
}


def wait_rollout(cluster: Cluster, namespace: str, deployment: str, selector: str, timeout: float = 300) -> dict:
    """`kubectl rollout status`, failing at once when a pod of the rollout is stuck (STUCK)."""
    deadline = time.monotonic() + timeout
    while True:
        dep = cluster.get("apps", "v1", "deployments", namespace, deployment) or {}
        spec, status = dep.get("spec") or {}, dep.get("status") or {}
        want = spec.get("replicas", 1)
        if (
            status.get("observedGeneration") == dep.get("metadata", {}).get("generation")
            and status.get("updatedReplicas", 0) == want
            and status.get("availableReplicas", 0) == want
            and status.get("replicas", 0) == want
        ):
            return dep
        for pod in cluster.list("", "v1", "pods", namespace, label_selector=selector):
            for state in (pod.get("status") or {}).get("containerStatuses") or []:
                reason = ((state.get("state") or {}).get("waiting") or {}).get("reason")
                if reason in STUCK:
                    described = cluster.kubectl(
                        "describe", "pod", "-n", namespace, pod["metadata"]["name"], check=False
                    )
                    logs = cluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"], "--previous", check=False)
                    raise AssertionError(
                        f"pod {pod['metadata']['name']} of {deployment} is stuck: {reason}\n"
                        f"{described.stdout[-3000:]}\n--- its last logs:\n{logs.stdout[-2000:]}{logs.stderr[-500:]}"
                    )
        if time.monotonic() > deadline:
            raise AssertionError(f"deployment {deployment} not rolled out in {timeout} s: {status}")
        time.sleep(1)
