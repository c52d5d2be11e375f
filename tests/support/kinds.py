"""The operator's kinds as the control-plane tests apply, read and wait for them (kubectl and the
test API server, tests/support/cluster.py), and the Ray jobs the operator runs for a part."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import yaml

from laion_operator.testbed.demo_data import write_metadata
from tests.support.cluster import kuberay_crd
from tests.support.specs import OPERATOR_DOWNLOAD, loopback

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "laion-operator.io", "v1alpha1", "laionparts"
DATASETS = "laiondatasets"
RAYJOB_CRD = kuberay_crd("rayjobs")  # the pinned KubeRay release's, as its operator runs with
CRDS = (ROOT / "crds" / "laionpart.yaml", ROOT / "crds" / "laiondataset.yaml", RAYJOB_CRD)


def apply(api, namespace: str, *docs: dict) -> subprocess.CompletedProcess:
    """`kubectl apply`, its refusal left to the test (a bad spec is refused at apply)."""
    return api.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs), check=False)


def apply_ok(api, namespace: str, *docs: dict) -> None:
    result = apply(api, namespace, *docs)
    assert result.returncode == 0, result.stderr


def part(api, namespace: str, name: str) -> dict:
    return api.get(GROUP, VERSION, PLURAL, namespace, name)


def status_of(api, namespace: str, name: str) -> dict:
    return (part(api, namespace, name) or {}).get("status") or {}


def wait_until(api, plural: str, namespace: str, name: str, predicate, timeout: float, interval: float = 0.1) -> dict:
    """The object (a part, a dataset) once `predicate` holds of its status."""
    return api.wait_for(
        GROUP,
        VERSION,
        plural,
        namespace,
        name,
        lambda o: o is not None and predicate(o.get("status") or {}),
        timeout=timeout,
        interval=interval,
    )


def wait_phase(api, namespace: str, name: str, phases, timeout: float = 240) -> dict:
    """The part once its phase is one of `phases` (one phase or several)."""
    phases = {phases} if isinstance(phases, str) else set(phases)
    return wait_until(api, PLURAL, namespace, name, lambda status: status.get("phase") in phases, timeout)


def wait_phase_status(api, namespace: str, name: str, phases, timeout: float = 600) -> dict:
    """The part's status once its phase is one of `phases`: generous, the machine may be busy."""
    return wait_phase(api, namespace, name, phases, timeout=timeout)["status"]


def jobs_of(ray_cluster, namespace: str, name: str) -> list[dict]:
    """The part's jobs, from the Jobs API's list (as the operator labels them)."""
    listed = ray_cluster.jobs_api("/api/jobs/")
    jobs = listed if isinstance(listed, list) else listed.get("jobs", [])
    return [
        j
        for j in jobs
        if (j.get("metadata") or {}).get("laion-operator.io/part") == name
        and j["metadata"].get("laion-operator.io/namespace") == namespace
    ]


class JobWatch:
    """Polls the Jobs API list in the background: the most jobs of one part that ran at the same moment."""

    def __init__(self, ray_cluster, namespace: str, name: str):
        self.args = (ray_cluster, namespace, name)
        self.most_at_once = 0
        self.running: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            try:
                jobs = jobs_of(*self.args)
            except OSError:
                continue
            running = [j["submission_id"] for j in jobs if j["status"] in ("PENDING", "RUNNING")]
            if len(running) > self.most_at_once:
                self.most_at_once, self.running = len(running), running
            time.sleep(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.most_at_once


def five_small_parts(folder: Path, image_server) -> Path:
    """Five small parts' metadata, meta_1.parquet to meta_5.parquet, in `folder`."""
    for n in range(1, 6):
        write_metadata(
            folder / f"meta_{n}.parquet",
            20,
            image_server.base_url,
            seed=40 + n,
            failure_mix={"ok": 0.8, "http_4xx": 0.2},
        )
    return folder


# What the dataset tests' parts and their dataset template add to the operator tests' download: one
# place, so that a part applied alone downloads as the dataset's parts do.
DATASET_DOWNLOAD = {"parallelism": 1, "outputFormat": "webdataset"}


def download(**extra) -> dict:
    return loopback({**OPERATOR_DOWNLOAD, **DATASET_DOWNLOAD, **extra})


def dataset_doc(name: str, sources: Path, out: Path, **spec) -> dict:
    """A dataset of the five parts of `five_small_parts` in `sources`."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LaionDataset",
        "metadata": {"name": name},
        "spec": {
            "source": {"pattern": str(sources / "meta_{part}.parquet"), "first": 1, "last": 5},
            "template": {
                "filter": {"samplesPerShard": 10},
                "download": download(),
                "output": {"uri": str(out)},
                "maxRetries": 0,
            },
            **spec,
        },
    }


def parts_of(api, namespace: str, name: str) -> list[dict]:
    return api.list(GROUP, VERSION, PLURAL, namespace, label_selector=f"laion-operator.io/dataset={name}")


def wait_dataset(api, namespace: str, name: str, predicate, timeout: float = 900) -> dict:
    return wait_until(api, DATASETS, namespace, name, predicate, timeout, interval=0.3)


def wait_for_finished_shard(out: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not list(out.glob("*_stats.json")):
        assert time.monotonic() < deadline, "no shard finished"
        time.sleep(0.2)
