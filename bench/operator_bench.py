"""Operator overhead: `kubectl apply` → job submitted, and status lag, with 1 and with 64 parts.

Measured on the test bed's real API server (tests/support/cluster.py) with the operator in KubeRay mode, where
"submitted" is the RayJob's creation, so no Ray job's start-up hides the operator's own cost. The
baseline, measured in the same run, is the API round trip itself: `kubectl apply` of the same number
of objects and the time until they can be read back. Status lag is the time from a RayJob's status
turning SUCCEEDED to its LaionPart's phase saying so; the operator looks every pollSeconds (here 1 s),
so half a poll is the floor. The operator's resident memory is read from /proc, idle and once a
batch of parts has succeeded.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import yaml

from . import common

GROUP, VERSION, PLURAL = "laion-operator.io", "v1alpha1", "laionparts"
TEMPLATE = {
    "rayClusterSpec": {
        "headGroupSpec": {
            "rayStartParams": {},
            "template": {"spec": {"containers": [{"name": "ray-head", "image": "laion-operator/ray-worker:0.1.0"}]}},
        },
        "workerGroupSpecs": [
            {
                "groupName": "workers",
                "replicas": 1,
                "rayStartParams": {},
                "template": {
                    "spec": {"containers": [{"name": "ray-worker", "image": "laion-operator/ray-worker:0.1.0"}]}
                },
            }
        ],
    }
}


def parts_yaml(n: int, kind: str = "LaionPart") -> str:
    docs = []
    for i in range(n):
        if kind == "LaionPart":
            docs.append(
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "LaionPart",
                    "metadata": {"name": f"p{i}"},
                    "spec": {
                        "partId": str(i),
                        "source": {"urls": [f"/data/2B-en-4.5_{i}.parquet"]},
                        "output": {"uri": f"/tmp/laion-bench-out/{i}"},
                    },
                }
            )
        else:
            docs.append(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"p{i}"}, "data": {"partId": str(i)}}
            )
    return yaml.safe_dump_all(docs)


def _wait_all(check, names: list[str], timeout: float = 300) -> dict[str, float]:
    """When each name first passed `check`, polled every 20 ms."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(names):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(names) - len(seen)} of {len(names)} never got there")
        for name in names:
            if name not in seen and check(name):
                seen[name] = time.monotonic()
        time.sleep(0.02)
    return seen


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def measure(api, n: int, pid: int) -> dict:
    names = [f"p{i}" for i in range(n)]
    api.create_namespace(f"baseline-{n}")
    t0 = time.monotonic()
    api.kubectl("apply", "-n", f"baseline-{n}", "-f", "-", input=parts_yaml(n, "ConfigMap"))
    baseline = _wait_all(lambda m: api.get("", "v1", "configmaps", f"baseline-{n}", m) is not None, names)
    baseline_s = max(baseline.values()) - t0

    ns = f"bench-{n}"
    api.create_namespace(ns)
    t0 = time.monotonic()
    api.kubectl("apply", "-n", ns, "-f", "-", input=parts_yaml(n))

    def job_of(name):
        status = (api.get(GROUP, VERSION, PLURAL, ns, name) or {}).get("status") or {}
        return status.get("submissionId")

    submitted = _wait_all(lambda m: bool(job_of(m)) and api.get("ray.io", "v1", "rayjobs", ns, job_of(m)), names)
    to_submit = [t - t0 for t in submitted.values()]

    flipped = {}
    for name in names:
        api.patch_status(
            "ray.io", "v1", "rayjobs", ns, job_of(name), {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
        )
        flipped[name] = time.monotonic()
    done = _wait_all(
        lambda m: ((api.get(GROUP, VERSION, PLURAL, ns, m) or {}).get("status") or {}).get("phase") == "Succeeded",
        names,
    )
    lag = [done[m] - flipped[m] for m in names]
    return {
        "parts": n,
        "baseline_s": baseline_s,
        "submit_median_s": statistics.median(to_submit),
        "submit_all_s": max(to_submit),
        "lag_median_s": statistics.median(lag),
        "lag_max_s": max(lag),
        "rss_mb": rss_mb(pid),
    }


def run() -> list[dict]:
    from tests.support.chart import install
    from tests.support.cluster import Cluster, kuberay_crd
    from tests.support.operator_proc import OperatorProcess

    rows = []
    with Cluster() as api, tempfile.TemporaryDirectory(prefix="laion-opbench-") as tmp:
        api.install_crd(common.ROOT / "crds" / "laionpart.yaml")
        api.install_crd(kuberay_crd("rayjobs"))
        # No KubeRay runs here: the bench writes the RayJobs' status itself, to time the operator alone.
        op = OperatorProcess(
            Path(tmp),
            install(api, {"operator": {"config": {"mode": "kuberay"}}}),
            {"mode": "kuberay", "rayJobTemplate": TEMPLATE, "maxConcurrentParts": 64},
        ).start()
        try:
            time.sleep(3)  # past start-up: the idle operator
            rows.append({"parts": 0, "rss_mb": rss_mb(op.proc.pid)})
            for n in (1, 64):
                rows.append(measure(api, n, op.proc.pid))
        finally:
            op.stop()
    return rows


def report(rows: list[dict]) -> list[str]:
    lines = [
        "| parts | API round trip (baseline) | apply → submitted, median | all submitted | ratio to baseline "
        "| status lag, median | status lag, max | operator RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "baseline_s" not in r:
            lines.append(f"| {r['parts']} (idle) | | | | | | | {r['rss_mb']:.0f} MB |")
            continue
        lines.append(
            f"| {r['parts']} | {r['baseline_s']:.2f} s | {r['submit_median_s']:.2f} s | "
            f"{r['submit_all_s']:.2f} s | {r['submit_all_s'] / r['baseline_s']:.1f}× | "
            f"{r['lag_median_s']:.2f} s | {r['lag_max_s']:.2f} s | {r['rss_mb']:.0f} MB |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(report(run())))
