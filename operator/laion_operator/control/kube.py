"""The few Kubernetes API calls the operator makes besides kopf's own: status, Secrets, RayJobs."""

from __future__ import annotations

import base64
import functools
import hashlib
import json

import kubernetes
import urllib3
from kubernetes.client.rest import ApiException

GROUP, VERSION, PLURAL = "laion-operator.io", "v1alpha1", "laionparts"
DATASET_PLURAL = "laiondatasets"
DATASET_LABEL = f"{GROUP}/dataset"  # on every part a LaionDataset made: the dataset's name
RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayjobs"
PART_LABEL = f"{GROUP}/part"  # on every RayJob: its LaionPart's name
# (connect, read) seconds of every call: one hung connection must not hold a part, or the queue, for good.
REQUEST_TIMEOUT = (10, 30)


def label_value(name: str) -> str:
    """`name` as a label value (at most 63 characters): long names keep a readable head and a hash."""
    if len(name) <= 63:
        return name
    return f"{name[:52].rstrip('-.')}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


class KubeError(RuntimeError):
    """A Kubernetes API call failed; the message says which object and why."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@functools.lru_cache(maxsize=1)
def _client() -> kubernetes.client.ApiClient:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.ApiClient()


def api_message(err: ApiException) -> str:
    """The API server's own words (a 403 names the user, verb and resource the role lacks)."""
    try:
        return json.loads(err.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        return ""


def _call(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
    except ApiException as err:
        said = api_message(err)  # the API server's own words: which field, or which verb the role lacks
        raise KubeError(f"{what}: {err.status} {err.reason}" + (f": {said}" if said else ""), err.status) from None
    except (urllib3.exceptions.HTTPError, OSError) as err:  # a timeout, a refused or cut connection
        raise KubeError(f"{what}: {type(err).__name__}: {err}") from None


def _unless(status: int, what: str, fn, *args, **kwargs):
    """`_call`, but None where the API server answers `status` (404: gone already; 409: made already)."""
    try:
        return _call(what, fn, *args, **kwargs)
    except KubeError as err:
        if err.status == status:
            return None
        raise


def patch_status(namespace: str, name: str, status: dict, plural: str = PLURAL) -> dict:
    api = kubernetes.client.CustomObjectsApi(_client())
    return _call(
        f"patch status of {plural} {namespace}/{name}",
        api.patch_namespaced_custom_object_status,
        GROUP,
        VERSION,
        namespace,
        plural,
        name,
        {"status": status},
    )


def read_secret(namespace: str, name: str) -> dict[str, str]:
    api = kubernetes.client.CoreV1Api(_client())
    secret = _call(f"read Secret {namespace}/{name}", api.read_namespaced_secret, name, namespace)
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def create_rayjob(namespace: str, body: dict) -> dict | None:
    api = kubernetes.client.CustomObjectsApi(_client())
    made = _unless(
        409,
        f"create RayJob {namespace}/{body['metadata']['name']}",
        api.create_namespaced_custom_object,
        RAY_GROUP,
        RAY_VERSION,
        namespace,
        RAY_PLURAL,
        body,
    )
    # None: already created by an earlier attempt of this operator: adopt it (None again: deleted since)
    return made if made is not None else get_rayjob(namespace, body["metadata"]["name"])


def get_rayjob(namespace: str, name: str) -> dict | None:
    api = kubernetes.client.CustomObjectsApi(_client())
    return _unless(
        404,
        f"read RayJob {namespace}/{name}",
        api.get_namespaced_custom_object,
        RAY_GROUP,
        RAY_VERSION,
        namespace,
        RAY_PLURAL,
        name,
    )


def delete_rayjob(namespace: str, name: str) -> None:
    api = kubernetes.client.CustomObjectsApi(_client())
    _unless(
        404,
        f"delete RayJob {namespace}/{name}",
        api.delete_namespaced_custom_object,
        RAY_GROUP,
        RAY_VERSION,
        namespace,
        RAY_PLURAL,
        name,
    )


def list_rayjobs(namespace: str, part: str) -> list[dict]:
    """The RayJobs of one LaionPart (by the label build_rayjob sets)."""
    api = kubernetes.client.CustomObjectsApi(_client())
    found = _call(
        f"list RayJobs of LaionPart {namespace}/{part}",
        api.list_namespaced_custom_object,
        RAY_GROUP,
        RAY_VERSION,
        namespace,
        RAY_PLURAL,
        label_selector=f"{PART_LABEL}={label_value(part)}",
    )
    return found.get("items", [])


def list_parts(namespaces: list[str]) -> list[dict]:
    """Every LaionPart in `namespaces` (all namespaces if empty), as the API server has them now."""
    api = kubernetes.client.CustomObjectsApi(_client())
    if not namespaces:
        found = _call("list LaionParts", api.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        return found.get("items", [])
    items: list[dict] = []
    for namespace in namespaces:
        found = _call(
            f"list LaionParts in {namespace}", api.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL
        )
        items += found.get("items", [])
    return items


# --- a LaionDataset's parts ----------------------------------------------------------------------


def list_dataset_parts(namespace: str, dataset: str) -> list[dict]:
    api = kubernetes.client.CustomObjectsApi(_client())
    found = _call(
        f"list LaionParts of LaionDataset {namespace}/{dataset}",
        api.list_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        label_selector=f"{DATASET_LABEL}={label_value(dataset)}",
    )
    return found.get("items", [])


def create_part(namespace: str, body: dict) -> dict | None:
    """Create a LaionPart; None if one of that name exists already (made by an earlier reconcile)."""
    api = kubernetes.client.CustomObjectsApi(_client())
    return _unless(
        409,
        f"create LaionPart {namespace}/{body['metadata']['name']}",
        api.create_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        body,
    )


def delete_part(namespace: str, name: str) -> None:
    api = kubernetes.client.CustomObjectsApi(_client())
    _unless(
        404,
        f"delete LaionPart {namespace}/{name}",
        api.delete_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
    )


def replace_part_spec(namespace: str, name: str, spec: dict) -> dict:
    """Set a part's whole spec (a JSON patch: fields the template dropped go too)."""
    api = kubernetes.client.CustomObjectsApi(_client())
    return _call(
        f"update spec of LaionPart {namespace}/{name}",
        api.patch_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        [{"op": "replace", "path": "/spec", "value": spec}],
        _content_type="application/json-patch+json",
    )  # the client would send a merge patch
