"""Where a part's Ray job runs: the Jobs API of an existing RayCluster, or a KubeRay RayJob per part.

Both take the same part spec and run the same entrypoint (`laion-operator job`), which reads the spec
from LAION_PART_SPEC. Storage credentials travel separately and never in the entrypoint: in jobs mode
as a file in the job's working_dir (see credentials.py), in KubeRay mode as `envFrom` the part's Secret.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import urllib.error
import urllib.request

import yaml

from .. import credentials
from ..contract import JOB_ID_ENV
from ..spec import PartSpec
from . import kube
from .backend import (
    BackendRefused,
    BackendUnavailable,
    CredentialsRefused,
    Job,
    JobState,
    SubmissionFailed,
    submission_prefix,
)
from .config import OperatorConfig


def _job_env(spec: PartSpec, job_id: str) -> dict[str, str]:
    return {"LAION_PART_SPEC": json.dumps(spec.to_dict(), sort_keys=True), JOB_ID_ENV: job_id}


class JobsAPI:
    """The Ray Jobs REST API of a RayCluster's dashboard, spoken directly: the operator needs four
    calls of it, and Ray itself (hundreds of MB, which `JobSubmissionClient` would import) is not in
    the operator's image. Token authentication as Ray's clients send it: RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN in the environment."""

    def __init__(self, address: str, environ=os.environ, timeout: float = 30):
        self.address = address.rstrip("/")
        if "://" not in self.address:
            self.address = "http://" + self.address
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if environ.get("RAY_AUTH_MODE") == "token" and environ.get("RAY_AUTH_TOKEN"):
            self.headers["Authorization"] = f"Bearer {environ['RAY_AUTH_TOKEN'].strip()}"

    def call(self, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = dict(self.headers)
        if isinstance(body, bytes):
            headers["Content-Type"] = "application/octet-stream"
        request = urllib.request.Request(self.address + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            text = err.read()
            if err.code in (401, 403):
                raise BackendRefused(
                    f"the Ray cluster at {self.address} refused the operator ({err.code} "
                    f"{text.decode(errors='replace').strip()[:200]}): give the operator the cluster's token, with "
                    "the chart value operator.rayAuthTokenSecret or the environment RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN"
                ) from None
            return err.code, text
        except (urllib.error.URLError, OSError) as err:
            raise BackendUnavailable(f"the Ray Jobs API at {self.address} cannot be reached: {err}") from None

    def upload_package(self, content: bytes) -> str:
        """A working_dir package in the cluster's store; returns its URI for the runtime env."""
        uri = f"gcs://_ray_pkg_{hashlib.sha256(content).hexdigest()[:32]}.zip"
        path = "/api/packages/gcs/" + uri.split("://", 1)[1]
        code, _ = self.call("GET", path)
        if code == 404:
            code, text = self.call("PUT", path, content)
            if code != 200:
                raise SubmissionFailed(f"Ray Jobs API: upload of the job's package failed: {code} {text[:300]!r}")
        return uri

    def submit(self, body: dict) -> None:
        code, text = self.call("POST", "/api/jobs/", body)
        if code != 200 and b"already exists" not in text:  # a concurrent submit of the same id won the race
            raise SubmissionFailed(f"Ray Jobs API: submission {body['submission_id']} failed: {code} {text[:500]!r}")

    def info(self, job_id: str) -> dict | None:
        code, text = self.call("GET", f"/api/jobs/{job_id}")
        if code == 404:
            return None
        if code != 200:
            raise SubmissionFailed(f"Ray Jobs API: job {job_id}: {code} {text[:300]!r}")
        return json.loads(text)

    def stop(self, job_id: str) -> None:
        code, text = self.call("POST", f"/api/jobs/{job_id}/stop")
        if code not in (200, 404):
            raise SubmissionFailed(f"Ray Jobs API: stopping job {job_id}: {code} {text[:300]!r}")

    def list(self) -> list[dict]:
        code, text = self.call("GET", "/api/jobs/")
        if code != 200:
            raise SubmissionFailed(f"Ray Jobs API: listing jobs: {code} {text[:300]!r}")
        listed = json.loads(text)
        return listed if isinstance(listed, list) else listed.get("jobs", [])

    def open_to_anyone(self) -> bool:
        """Whether the cluster answers a client without a token: then anyone who reaches the dashboard
        can read every job's runtime_env and download its working_dir package."""
        request = urllib.request.Request(self.address + "/api/version", method="GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout):
                return True
        except urllib.error.HTTPError as err:
            return err.code not in (401, 403)
        except (urllib.error.URLError, OSError) as err:
            raise BackendUnavailable(f"the Ray Jobs API at {self.address} cannot be reached: {err}") from None


def _job(info: dict) -> Job:
    return Job(
        str(info.get("submission_id") or info.get("job_id")),
        JobState.of_ray(info.get("status")),
        info.get("message") or "",
        info.get("driver_exit_code"),
    )


class JobsAPIBackend:
    """Ray Jobs API (the RayCluster's dashboard address)."""

    def __init__(self, config: OperatorConfig):
        self.config = config
        # Nothing is called at start-up: a Ray cluster that is down or refuses the operator shows on
        # every part's status, and the operator carries on once it is fixed.
        self.api = JobsAPI(config.ray_address)

    def submit(self, owner: dict, job_id: str, spec: PartSpec, secret: dict[str, str] | None) -> None:
        if self.state(owner, job_id).state != JobState.MISSING:
            return
        runtime_env: dict = {"env_vars": _job_env(spec, job_id)}
        if secret:
            if not self.config.allow_credentials_without_ray_auth and self.api.open_to_anyone():
                raise CredentialsRefused(
                    f"the Ray cluster at {self.api.address} answers clients without a token, and the job's "
                    "credentials package would be readable by any of them: enable Ray token authentication "
                    "(chart value operator.rayAuthTokenSecret), or accept the risk with the chart value "
                    "operator.config.allowCredentialsWithoutRayAuth"
                )
            # Built in memory and uploaded: no copy of the credentials touches the operator's disk.
            runtime_env["working_dir"] = self.api.upload_package(credentials.package(secret, job=job_id))
        self.api.submit(
            {
                "entrypoint": self.config.job_entrypoint,
                "submission_id": job_id,
                "runtime_env": runtime_env,
                "metadata": {
                    "laion-operator.io/part": owner["name"],
                    "laion-operator.io/namespace": owner["namespace"],
                },
            }
        )

    def state(self, owner: dict, job_id: str) -> Job:
        info = self.api.info(job_id)
        return Job(job_id, JobState.MISSING) if info is None else _job({**info, "submission_id": job_id})

    def jobs(self, owner: dict) -> list[Job]:
        prefix = submission_prefix(owner["uid"])
        return [_job(info) for info in self.api.list() if str(info.get("submission_id") or "").startswith(prefix)]

    def stop(self, owner: dict, job_id: str) -> None:
        if not self.state(owner, job_id).terminal:
            self.api.stop(job_id)


def build_rayjob(
    template: dict, owner: dict, job_id: str, spec: PartSpec, entrypoint: str, latents_group: dict | None = None
) -> dict:
    """A ray.io/v1 RayJob for one attempt of one part, owned by its LaionPart. A part with
    spec.latents also gets `latents_group` (the GPU workers its encoding tasks ask for)."""
    body = copy.deepcopy(template)
    body["entrypoint"] = entrypoint
    body["runtimeEnvYAML"] = yaml.safe_dump({"env_vars": _job_env(spec, job_id)})
    body.setdefault("shutdownAfterJobFinishes", True)
    cluster = body.setdefault("rayClusterSpec", {})
    if (spec.latents or spec.embeddings) and latents_group:  # both model stages ask for its GPUs
        workers = cluster.setdefault("workerGroupSpecs", [])
        if all(g.get("groupName") != latents_group["groupName"] for g in workers):
            workers.append(copy.deepcopy(latents_group))
    # The hub token reaches the Ray containers as the storage credentials do: from its Secret.
    tokens = (spec.latents and spec.latents.hub_token_secret, spec.embeddings and spec.embeddings.hub_token_secret)
    headers = spec.archives and spec.archives.headers_secret  # an archive source's HTTP headers
    secrets = [s for s in (spec.output.credentials_secret, *tokens, headers) if s]
    groups = [cluster.get("headGroupSpec", {})] + list(cluster.get("workerGroupSpecs", []))
    for secret in dict.fromkeys(secrets):
        for group in groups:
            for container in group.get("template", {}).get("spec", {}).get("containers", []):
                container.setdefault("envFrom", []).append({"secretRef": {"name": secret}})
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": job_id,
            "namespace": owner["namespace"],
            "labels": {
                "app.kubernetes.io/managed-by": "laion-operator",
                kube.PART_LABEL: kube.label_value(owner["name"]),
            },
            "ownerReferences": [
                {
                    "apiVersion": f"{kube.GROUP}/{kube.VERSION}",
                    "kind": "LaionPart",
                    "name": owner["name"],
                    "uid": owner["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": body,
    }


def kuberay_state(job_id: str, status: dict) -> Job:
    """A RayJob's status as a Job: its jobDeploymentStatus settles what the Ray job's own jobStatus
    cannot say (a cluster that never came up, a Kueue suspension, KubeRay's own retries)."""
    deployment = status.get("jobDeploymentStatus") or ""
    ray = JobState.of_ray(status.get("jobStatus"))
    message = status.get("message") or ""
    if deployment in ("Failed", "ValidationFailed"):
        reason = status.get("reason")
        return Job(job_id, JobState.FAILED, message or f"RayJob {deployment}" + (f" ({reason})" if reason else ""))
    if deployment in ("Suspending", "Suspended"):
        return Job(job_id, JobState.SUSPENDED, message or f"RayJob {deployment.lower()} (spec.suspend, e.g. by Kueue)")
    if deployment == "Retrying":
        return Job(job_id, JobState.RETRYING, message or "KubeRay retries the RayJob")
    if deployment == "Complete":
        return Job(job_id, ray if ray.terminal else JobState.SUCCEEDED, message)
    # "" (new), Initializing, Waiting (for its submitter), Running: the Ray job's own state tells the rest
    return Job(job_id, ray, message)


class KubeRayBackend:
    """One KubeRay RayJob per part attempt, followed through the RayJob's status."""

    def __init__(self, config: OperatorConfig):
        self.config = config

    def submit(self, owner: dict, job_id: str, spec: PartSpec, secret: dict[str, str] | None) -> None:
        body = build_rayjob(
            self.config.ray_job_template or {},
            owner,
            job_id,
            spec,
            self.config.job_entrypoint,
            self.config.latents_worker_group,
        )
        kube.create_rayjob(owner["namespace"], body)

    def state(self, owner: dict, job_id: str) -> Job:
        job = kube.get_rayjob(owner["namespace"], job_id)
        if job is None:
            return Job(job_id, JobState.MISSING, f"RayJob {owner['namespace']}/{job_id} does not exist")
        # One being deleted counts as what it was until it is gone: its Ray cluster may still run the job.
        return kuberay_state(job_id, job.get("status") or {})

    def jobs(self, owner: dict) -> list[Job]:
        prefix = submission_prefix(owner["uid"])
        return [
            kuberay_state(job["metadata"]["name"], job.get("status") or {})
            for job in kube.list_rayjobs(owner["namespace"], owner["name"])
            if job["metadata"]["name"].startswith(prefix)
        ]

    def stop(self, owner: dict, job_id: str) -> None:
        kube.delete_rayjob(owner["namespace"], job_id)


def backend(config: OperatorConfig):
    return KubeRayBackend(config) if config.mode == "kuberay" else JobsAPIBackend(config)
