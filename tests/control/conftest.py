"""Fixtures the operator's tests share: the test API server with the kinds the operator serves, the
operator in its own process, and the metadata of small parts."""

from __future__ import annotations

import pytest

from tests.support.kinds import CRDS, five_small_parts
from tests.support.operator_proc import operator_starter


@pytest.fixture(scope="module")
def api(kube_api):
    """The session's API server with the operator's CRDs and KubeRay's RayJob (the operator serves both
    of its kinds, and KubeRay mode creates RayJobs)."""
    for crd in CRDS:
        kube_api.install_crd(crd)
    return kube_api


@pytest.fixture
def operators(api, ray_cluster, tmp_path):
    """Start operators with a given configuration (`wait=False`: without waiting for them to serve);
    all are stopped after the test."""
    with operator_starter(tmp_path, api, ray_cluster) as start:
        yield start


@pytest.fixture(scope="module")
def sources(tmp_path_factory, image_server):
    """Five small parts, meta_1.parquet to meta_5.parquet."""
    return five_small_parts(tmp_path_factory.mktemp("dataset-meta"), image_server)


@pytest.fixture
def default_chart_after(api):
    """For tests that install the chart with values of their own: its default install again after."""
    yield
    from tests.support.chart import install

    api.operator_env = install(api)
