"""Loopback services the tests share: a Ray cluster with its Jobs API, and an S3-protocol server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


# Ray replaces a loopback --node-ip-address by the machine's routable address unless it believes it
# runs a single-machine cluster; this switch is how it is told so, keeping every port on loopback.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class RayCluster:
    """`ray start --head` on loopback, with the dashboard's Jobs API; one per test session."""

    def __init__(self, num_cpus: int = 2):
        self.num_cpus = num_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.env = {**os.environ, **LOOPBACK_RAY}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token(self) -> str | None:
        path = Path.home() / ".ray" / "auth_token"
        return path.read_text().strip() if path.exists() else None

    def client_env(self) -> dict[str, str]:
        """What a Jobs API client (the operator) needs to talk to this cluster."""
        env = {"RAY_ADDRESS": self.address, **LOOPBACK_RAY}
        if self.token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env

    def start(self) -> "RayCluster":
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
               "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(self.dashboard_port), "--include-dashboard", "true",
               "--num-cpus", str(self.num_cpus), "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=180)
        wait_for_port(self.dashboard_port, timeout=120)
        return self

    def stop(self) -> None:
        subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class S3Server:
    """moto's S3 server on loopback, reached through the same client code as real S3 or MinIO."""

    ACCESS_KEY = "test-access-key"
    SECRET_KEY = "test-secret-key-not-real"

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Server":
        self.server.start()
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        self.server.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))
