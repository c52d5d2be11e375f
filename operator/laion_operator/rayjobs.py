"""Where a part's Ray job runs: the Jobs API of an existing RayCluster, or a KubeRay RayJob per part.

Both take the same part spec and run the same entrypoint (`laion-operator job`), which reads the spec
from LAION_PART_SPEC. Storage credentials travel separately and never in the entrypoint: in jobs mode
as a file in the job's working_dir (see credentials.py), in KubeRay mode as `envFrom` the part's Secret.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass

import yaml

from . import credentials, kube
from .config import OperatorConfig
from .spec import PartSpec

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def submission_id(uid: str, generation: int, attempt: int) -> str:
    """The same object, generation and attempt always name the same job: resubmitting is a no-op."""
    return f"lp-{uid.replace('-', '')[:16]}-g{generation}-a{attempt}"


@dataclass
class JobState:
    state: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, or MISSING (no such job)
    message: str = ""
    exit_code: int | None = None  # the entrypoint's, where the backend knows it

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def _spec_env(spec: PartSpec) -> dict[str, str]:
    return {"LAION_PART_SPEC": json.dumps(spec.to_dict(), sort_keys=True)}


class JobsAPIBackend:
    """Ray Jobs API (the RayCluster's dashboard address)."""

    def __init__(self, config: OperatorConfig):
        self.config = config
        self._client = None

    @property
    def client(self):
        # Made on first use, not at start-up: a Ray cluster that is down or refuses the operator then
        # shows on every part's status, and the operator carries on once it is fixed.
        if self._client is None:
            from ray.exceptions import AuthenticationError
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.config.ray_address)
            except AuthenticationError as err:
                raise RuntimeError(
                    f"the Ray cluster at {self.config.ray_address} refused the operator "
                    f"({str(err).splitlines()[0]}): give the operator the cluster's token, with the chart "
                    "value operator.rayAuthTokenSecret or the environment RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN") from None
        return self._client

    def submit(self, owner: dict, job_id: str, spec: PartSpec, secret: dict[str, str] | None) -> None:
        if self.state(owner, job_id).state != "MISSING":
            return
        runtime_env: dict = {"env_vars": _spec_env(spec)}
        if secret:
            runtime_env["working_dir"] = credentials.working_dir(secret)
        try:
            self.client.submit_job(entrypoint=self.config.job_entrypoint, submission_id=job_id,
                                   runtime_env=runtime_env,
                                   metadata={"laion-operator.io/part": owner["name"],
                                             "laion-operator.io/namespace": owner["namespace"]})
        except RuntimeError as err:
            if "already exists" not in str(err):  # a concurrent submit of the same id won the race
                raise
        finally:
            if "working_dir" in runtime_env:  # uploaded (or not needed): no copy stays on the operator's disk
                shutil.rmtree(runtime_env["working_dir"], ignore_errors=True)

    def state(self, owner: dict, job_id: str) -> JobState:
        try:
            info = self.client.get_job_info(job_id)
        except RuntimeError as err:
            if "404" in str(err) or "does not exist" in str(err):
                return JobState("MISSING")
            raise
        return JobState(str(getattr(info.status, "value", info.status)), info.message or "",
                        getattr(info, "driver_exit_code", None))

    def stop(self, owner: dict, job_id: str) -> None:
        if not self.state(owner, job_id).terminal:
            self.client.stop_job(job_id)


def build_rayjob(template: dict, owner: dict, job_id: str, spec: PartSpec, entrypoint: str) -> dict:
    """A ray.io/v1 RayJob for one attempt of one part, owned by its LaionPart."""
    body = copy.deepcopy(template)
    body["entrypoint"] = entrypoint
    body["runtimeEnvYAML"] = yaml.safe_dump({"env_vars": _spec_env(spec)})
    body.setdefault("shutdownAfterJobFinishes", True)
    secret = spec.output.credentials_secret
    if secret:
        cluster = body.get("rayClusterSpec", {})
        groups = [cluster.get("headGroupSpec", {})] + list(cluster.get("workerGroupSpecs", []))
        for group in groups:
            for container in group.get("template", {}).get("spec", {}).get("containers", []):
                container.setdefault("envFrom", []).append({"secretRef": {"name": secret}})
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": job_id,
            "namespace": owner["namespace"],
            "labels": {"app.kubernetes.io/managed-by": "laion-operator", "laion-operator.io/part": owner["name"]},
            "ownerReferences": [{
                "apiVersion": f"{kube.GROUP}/{kube.VERSION}", "kind": "LaionPart", "name": owner["name"],
                "uid": owner["uid"], "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "spec": body,
    }


# RayJob status.jobDeploymentStatus values that settle the outcome whatever jobStatus says.
_DEPLOYMENT_FAILED = {"Failed", "ValidationFailed"}


class KubeRayBackend:
    """One KubeRay RayJob per part attempt, followed through the RayJob's status."""

    def __init__(self, config: OperatorConfig):
        self.config = config

    def submit(self, owner: dict, job_id: str, spec: PartSpec, secret: dict[str, str] | None) -> None:
        body = build_rayjob(self.config.ray_job_template or {}, owner, job_id, spec, self.config.job_entrypoint)
        kube.create_rayjob(owner["namespace"], body)

    def state(self, owner: dict, job_id: str) -> JobState:
        job = kube.get_rayjob(owner["namespace"], job_id)
        if job is None:
            return JobState("MISSING")
        status = job.get("status") or {}
        message = status.get("message", "")
        if status.get("jobDeploymentStatus") in _DEPLOYMENT_FAILED:
            return JobState("FAILED", message or f"RayJob {status['jobDeploymentStatus']}")
        return JobState(status.get("jobStatus") or "PENDING", message)

    def stop(self, owner: dict, job_id: str) -> None:
        kube.delete_rayjob(owner["namespace"], job_id)


def backend(config: OperatorConfig):
    return KubeRayBackend(config) if config.mode == "kuberay" else JobsAPIBackend(config)
