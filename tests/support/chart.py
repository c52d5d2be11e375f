"""The Helm chart rendered with Helm v4's own engine (helm-python-sdk), as `helm install` would."""

from __future__ import annotations

import contextlib
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "laion-operator"
RELEASE, NAMESPACE = "laion", "laion-system"
FULLNAME = "laion-laion-operator"


def render(values: dict | None = None) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend({**doc, "__template__": path} for doc in yaml.safe_load_all(text) if doc)
    return docs


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_config(docs: list[dict]) -> dict:
    """The operator's configuration file as the chart's ConfigMap holds it."""
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == f"{FULLNAME}-config")
    return yaml.safe_load(cm["data"]["config.yaml"])


# What `helm install` creates that the operator's own access rests on; the Deployment, Service and
# monitoring objects are left out: the operator runs as a process, and no kubelet would start its pod.
INSTALLED_KINDS = (
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "ClusterKopfPeering",
    "KopfPeering",
)


def install(cluster, values: dict | None = None, edit=None) -> dict[str, str]:
    """Install the chart's CRDs and RBAC for `values` on the real API server and return the operator's
    environment: a KUBECONFIG holding a token of the chart's ServiceAccount, never an admin's.
    `edit(docs)` may change the rendered manifests first (a test that takes a verb away)."""
    cluster.create_namespace(NAMESPACE)
    for crd in sorted((CHART / "crds").glob("*.yaml")):
        cluster.install_crd(crd)
    docs = [d for d in manifests(render(values)) if d["kind"] in INSTALLED_KINDS]
    if edit:
        edit(docs)
    for namespace in (values or {}).get("watchNamespaces") or []:
        cluster.create_namespace(namespace)
    cluster.apply(docs, namespace=NAMESPACE)
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    token = cluster.token(account, NAMESPACE)
    path = cluster.workdir / f"operator-{len(list(cluster.workdir.glob('operator-*.kubeconfig')))}.kubeconfig"
    path.write_text(yaml.safe_dump(cluster.kubeconfig(account, token)))
    return {"KUBECONFIG": str(path)}


@contextlib.contextmanager
def installed(cluster, values: dict | None = None, edit=None):
    """The chart installed with `values` (or edited) for one test; its default install again after,
    so that no test inherits another's rights."""
    try:
        yield install(cluster, values, edit)
    finally:
        cluster.operator_env = install(cluster)
