"""Session-wide loopback services: one Ray cluster, one image server, one S3-protocol server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Read by Ray when it is imported: keeps every Ray address on loopback (see services.LOOPBACK_RAY).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as the test cluster (services.NO_AUTH)

from tests.support.kube_fixtures import kube_api, kube_env, kube_namespace, kube_node  # noqa: E402,F401 - fixtures, found by name; one real API server per session
from tests.support.services import RayCluster, S3Server, stop_running_jobs  # noqa: E402 - after the environment Ray reads on import

_SHARED: list[RayCluster] = []


@pytest.fixture(scope="session")
def ray_cluster():
    """A real `ray start --head` cluster with its Jobs API, shared by every test of the session."""
    cluster = RayCluster(num_cpus=2).start()
    _SHARED.append(cluster)
    yield cluster
    _SHARED.remove(cluster)
    left = cluster.stop()
    assert not left, f"Ray processes outlived the session's cluster: {left}"


@pytest.fixture(autouse=True)
def no_job_outlives_its_test():
    """A job a test leaves running (a deleted or suspended part's, a killed operator's) would take the
    two CPUs from the tests after it."""
    yield
    for cluster in _SHARED:
        left = stop_running_jobs(cluster)
        if left:
            print(f"\nstopped jobs the test left running: {', '.join(left)}", file=sys.stderr)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """An S3-protocol server on loopback; its credentials are in the environment, as on a workstation."""
    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ACCESS_KEY_ID=server.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=server.SECRET_KEY, AWS_DEFAULT_REGION="us-east-1"
    )
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="session")
def ray_driver(ray_cluster, s3):
    """This test process as a Ray driver on the session's cluster (as the CLI with --ray-address)."""
    import ray

    from laion_operator.pipeline.runtime import ensure_ray

    os.environ.update({k: v for k, v in ray_cluster.client_env().items() if k != "RAY_ADDRESS"})
    ensure_ray(ray_cluster.address)
    yield ray_cluster
    ray.shutdown()


@pytest.fixture(scope="session")
def image_server():
    from tests.support.failing_web import ImageServer

    with ImageServer() as server:
        yield server


# The fixtures that start the heavy parts of the test bed (Ray takes 20-80 s, the Kubernetes control
# plane some seconds more, a node minutes): a test that uses any of them is marked `testbed`, and
# `make test-fast` (`pytest -m "not testbed"`) runs the others alone in a few minutes.
TESTBED_FIXTURES = {"ray_cluster", "ray_driver", "kube_api", "kube_env", "kube_namespace", "kube_node"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TESTBED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.testbed)
    # The node's tests last, in their files' order.
    items.sort(key=lambda item: "kube_node" in getattr(item, "fixturenames", ()))
