"""The operator's configuration: a YAML file (the chart's ConfigMap), overridable by environment.

Every key can be set by `LAION_OPERATOR_<KEY>` in upper snake case, e.g. LAION_OPERATOR_RAY_ADDRESS.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from ..names import camel, snake

MODES = ("jobs", "kuberay")


class ConfigError(ValueError):
    """The operator's configuration is unusable; the message names the key."""


@dataclasses.dataclass
class OperatorConfig:
    mode: str = "jobs"  # "jobs": the Jobs API of an existing RayCluster; "kuberay": one RayJob per part
    ray_address: str = "http://127.0.0.1:8265"  # the RayCluster's dashboard (Jobs API) in jobs mode
    max_concurrent_parts: int = 4  # parts running at once; the rest wait in phase Queued
    poll_seconds: float = 10.0  # how often a running part's job and progress are read
    retry_backoff_seconds: float = 30.0  # first retry delay of a failed job, doubled per retry
    retry_backoff_max_seconds: float = 600.0  # ... up to this
    # Jobs mode sends storage credentials in the job's working_dir package, which any client of the Ray
    # dashboard can download unless the cluster requires a token; true sends them anyway.
    allow_credentials_without_ray_auth: bool = False
    metrics_port: int = 8080  # /metrics; 0 disables the endpoint
    peering_name: str | None = None  # kopf peering object shared by the replicas; None: standalone
    ray_job_template: dict | None = None  # RayJob spec the kuberay mode fills in per part
    latents_worker_group: dict | None = None  # KubeRay worker group added for parts with spec.latents
    job_entrypoint: str = "laion-operator job"  # the command a Ray job runs (from the worker image)

    @classmethod
    def load(cls, path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        data: dict = {}
        if path:
            try:
                data = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as err:
                raise ConfigError(f"{path}: cannot read the operator configuration: {err}") from None
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in data.items():
            name = snake(key)
            if name not in fields:
                raise ConfigError(f"{path}: unknown key {key!r}; known keys: " + ", ".join(camel(n) for n in fields))
            values[name] = value
        for name in fields:
            env = f"LAION_OPERATOR_{name.upper()}"
            if env in environ:
                values[name] = yaml.safe_load(environ[env])
        config = cls(**values)
        config.check(path)
        return config

    def check(self, source=None) -> None:
        where = f"{source}: " if source else ""
        if self.mode not in MODES:
            raise ConfigError(f"{where}mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if not isinstance(self.max_concurrent_parts, int) or self.max_concurrent_parts < 1:
            raise ConfigError(f"{where}maxConcurrentParts: must be a whole number of at least 1")
        if self.mode == "kuberay" and not isinstance(self.ray_job_template, dict):
            raise ConfigError(f"{where}rayJobTemplate: kuberay mode needs a RayJob spec template")
        if self.mode == "kuberay" and (self.ray_job_template or {}).get("backoffLimit"):
            raise ConfigError(
                f"{where}rayJobTemplate.backoffLimit: the operator retries a part's job itself "
                "(spec.maxRetries, resuming from finished shards); remove backoffLimit"
            )
        if self.latents_worker_group is not None and not (
            isinstance(self.latents_worker_group, dict) and self.latents_worker_group.get("groupName")
        ):
            raise ConfigError(f"{where}latentsWorkerGroup: must be a KubeRay worker group with a groupName")
