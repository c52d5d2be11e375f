"""The Helm chart rendered with Helm v4's own engine (helm-python-sdk), as `helm install` would."""

from __future__ import annotations

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
        docs.extend(({**doc, "__template__": path} for doc in yaml.safe_load_all(text) if doc))
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
