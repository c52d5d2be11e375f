"""
Pytest fixtures for the emulated Kubernetes API (see ``tests/support/kubeapi.py``).

Import them in ``tests/conftest.py``::

    from tests.support.kube_fixtures import kube_api, kube_env, kube_namespace  # noqa: F401
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from tests.support.kubeapi import TestAPIServer


@pytest.fixture(scope='session')
def kube_api() -> Iterator[TestAPIServer]:
    """One emulated API server for the whole test session (CRDs installed by tests stay installed)."""
    with TestAPIServer() as api:
        yield api


@pytest.fixture()
def kube_env(kube_api: TestAPIServer) -> Iterator[TestAPIServer]:
    """``KUBECONFIG`` (and the kubernetes client's default config path) point to ``kube_api`` in this test."""
    with kube_api.env():
        yield kube_api


@pytest.fixture()
def kube_namespace(kube_api: TestAPIServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test; deleted afterwards with all its content (finalizers are dropped)."""
    base = re.sub(r'[^a-z0-9-]+', '-', request.node.name.lower()).strip('-')[:40].strip('-') or 'test'
    name = f'{base}-{uuid.uuid4().hex[:6]}'
    kube_api.create_namespace(name, exist_ok=False)
    yield name
    kube_api.delete_namespace(name, force=True)
