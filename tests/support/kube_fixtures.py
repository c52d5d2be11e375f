"""Pytest fixtures for the real Kubernetes control plane (see ``tests/support/cluster.py``).

Import them in ``tests/conftest.py``::

    from tests.support.kube_fixtures import (  # noqa: F401 - fixtures, found by name
        kube_api, kube_env, kube_namespace, kube_node,
    )
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from tests.support.chart import install
from tests.support.cluster import Cluster


@pytest.fixture(scope="session")
def kube_api() -> Iterator[Cluster]:
    """One real API server (etcd, kube-apiserver, kube-controller-manager) for the whole session, the
    chart installed: `kube_api.operator_env` is the operator's environment (the ServiceAccount's token)."""
    with Cluster() as cluster:
        cluster.operator_env = install(cluster)
        yield cluster


@pytest.fixture()
def kube_env(kube_api: Cluster) -> Iterator[Cluster]:
    """KUBECONFIG (and the kubernetes client's default config path) point at `kube_api` as admin."""
    with kube_api.env():
        yield kube_api


@pytest.fixture()
def kube_namespace(kube_api: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test; deleted afterwards (the namespace controller removes its content)."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-") or "test"
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    kube_api.create_namespace(name, exist_ok=False)
    yield name
    kube_api.delete_namespace(name)


@pytest.fixture(scope="session")
def kube_node(kube_api: Cluster) -> Iterator:
    """A real node for the control plane (containerd, kubelet, scheduler, kube-proxy, CoreDNS) running
    the images built from this tree, and KubeRay's operator driving real pods. Started by the first
    test that needs pods; the tests that use it run last (tests/conftest.py), so that until then no pod of the
    other tests' is ever scheduled."""
    from tests.support.node import Node, build_images

    images = build_images()
    with Node(kube_api, images) as node:
        kube_api.start_kuberay()
        yield node
    assert not node.leftovers, f"the node left the machine changed: {node.leftovers}"
