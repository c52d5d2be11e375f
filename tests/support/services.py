"""Loopback services the tests share: a Ray cluster with its Jobs API, and a real S3-compatible server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tests.support.loopback import free_port, wait_for_port  # the other support modules import them from here
from tests.support.procs import alive, process_tree, signal_all

VENV_BIN = Path(sys.executable).parent


def job_driver_pids(marker: str) -> list[int]:
    """The pids of part job drivers (`laion-operator job`) whose environment mentions `marker` (say
    the part's output path): other Ray clusters on the machine run jobs of their own."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            if b"laion-operator job" in cmdline and marker.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


# Ray replaces a loopback --node-ip-address by the machine's routable address unless it believes it
# runs a single-machine cluster; this switch is how it is told so, keeping every port on loopback.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# A machine shared by many test sessions starts a dashboard in minutes, not Ray's 60 s.
PATIENT_RAY = {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300"}
# The session's cluster listens on loopback only and runs without token authentication, so that not
# every client of the suite must carry a token; tests of token authentication start their own.
NO_AUTH = {"RAY_AUTH_MODE": "disabled"}


# `ray start`, but waiting up to 3 minutes (not Ray's fixed 30 s) for the new raylet to register with
# the GCS: on a machine shared by many Ray clusters, the GCS answers late and the start fails otherwise.
# A node joining a cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1) keeps the head's loopback address:
# Ray would swap 127.0.0.1 for this machine's outward address, where the loopback-only head is not.
PATIENT_RAY_START = """
import sys, time
import ray._private.services as services
from ray.scripts.scripts import main

_get_node = services.get_node

def get_node(*args, **kwargs):
    deadline = time.monotonic() + 180
    while True:
        try:
            return _get_node(*args, **kwargs)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)

services.get_node = get_node
services.resolve_ip_for_localhost = lambda host: host
sys.exit(main())
"""


def ray_start(*args: str) -> list[str]:
    """The command line of a patient `ray start` (see PATIENT_RAY_START)."""
    return [sys.executable, "-c", PATIENT_RAY_START, "start", *args]


class RayCluster:
    """`ray start --head` on loopback, with the dashboard's Jobs API; one per test session."""

    def __init__(self, num_cpus: int = 2, auth_token: str | None = None):
        self.num_cpus = num_cpus
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token} if auth_token else NO_AUTH
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        # Jobs run `laion-operator job` from this virtualenv, as a worker image has it on PATH.
        # No storage credentials: jobs must get theirs the way they would in a cluster.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_AUTH"))}
        self.env = {
            **inherited,
            **LOOPBACK_RAY,
            **PATIENT_RAY,
            **self.auth,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What a Ray client (the CLI, the operator) needs to talk to this cluster."""
        return {"RAY_ADDRESS": self.address, **LOOPBACK_RAY, **self.auth}

    def _command(self) -> list[str]:
        cmd = ray_start(
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--include-dashboard",
            "true",
            "--num-cpus",
            str(self.num_cpus),
            "--temp-dir",
            self.temp_dir,
            "--disable-usage-stats",
        )
        # Ray's fixed default ports would collide with any other Ray on the machine.
        for flag in (
            "--ray-client-server-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
            "--node-manager-port",
            "--object-manager-port",
        ):
            cmd += [flag, str(free_port())]
        return cmd

    def start(self) -> RayCluster:
        for attempt in range(3):
            try:
                subprocess.run(self._command(), env=self.env, check=True, capture_output=True, timeout=420)
                break
            except subprocess.TimeoutExpired:
                self.stop()
                raise
            except subprocess.CalledProcessError as err:
                # A loaded machine can miss Ray's start-up deadlines: start afresh, in a new folder on new ports.
                self.stop()  # what this try started, whatever happens next
                if attempt == 2:
                    raise RuntimeError(f"ray start failed: {err.stderr.decode(errors='replace')[-2000:]}") from None
                self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
                self.gcs_port, self.dashboard_port = free_port(), free_port()
        wait_for_port(self.dashboard_port, timeout=120)
        self._wait_for_jobs_api()
        return self

    def jobs_api(self, path: str, body: dict | None = None, token: str | None = None) -> dict:
        """One call of the Jobs REST API, as a Ray client makes it (with the cluster's token, if any)."""
        headers = {"Content-Type": "application/json"}
        token = token or self.auth.get("RAY_AUTH_TOKEN")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(
            self.dashboard_url + path, headers=headers, data=json.dumps(body).encode() if body is not None else None
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        return json.loads(text) if text.lstrip().startswith(("{", "[")) else {"text": text}

    def _wait_for_jobs_api(self, timeout: float = 120) -> None:
        """The dashboard answers before its job agent does; a first job proves submissions work."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                job = self.jobs_api("/api/jobs/", {"entrypoint": "true"})["submission_id"]
                break
            except (OSError, KeyError):  # HTTPError included: 5xx until the job agent is up
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        while self.jobs_api(f"/api/jobs/{job}")["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
            time.sleep(0.5)

    def _pids(self) -> list[int]:
        # Every process of this cluster names its temp dir on its command line or runs under one that
        # does (the agents retitle themselves); `ray stop` would also kill any other Ray on the machine.
        return [p for p in process_tree(self.temp_dir) if p != os.getpid()]

    def stop(self) -> list[int]:
        """Every process of the cluster ended; returns those still alive after SIGKILL (none, or a leak)."""
        pids = set(self._pids())  # listed first: an agent whose raylet has died is found by nothing
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            pids |= set(self._pids())
            signal_all(alive(pids), sig)
            deadline = time.monotonic() + wait
            while alive(pids) and time.monotonic() < deadline:
                time.sleep(0.2)
        left = sorted(alive(pids | set(self._pids())))
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


class S3Server:
    """A real S3-compatible server on loopback: versitygw's gateway over a local folder, built from
    source by scripts/build-testbed and reached through the same client code as S3 or MinIO.
    `down()` stops the process and `up()` starts it again on the same port and data, as a storage
    endpoint that crashes and comes back."""

    ACCESS_KEY = "test-access-key"
    SECRET_KEY = "test-secret-key-not-real"

    def __init__(self, host: str = "127.0.0.1"):
        from tests.support.cluster import testbed_binaries

        self.binary = testbed_binaries()["VERSITYGW"]
        self.host = host
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="s3-"))
        (self.root / "data").mkdir()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> S3Server:
        return self.up()

    def up(self) -> S3Server:
        env = {**os.environ, "ROOT_ACCESS_KEY": self.ACCESS_KEY, "ROOT_SECRET_KEY": self.SECRET_KEY}
        log = open(self.root / "versitygw.log", "ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                f"{self.host}:{self.port}",
                "--region",
                "us-east-1",
                "posix",
                str(self.root / "data"),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_port(self.port, timeout=30, host=self.host)
        except TimeoutError:
            raise RuntimeError(f"versitygw did not start:\n{self.logs()}") from None
        return self

    def down(self) -> None:
        """A crash: the process is killed, connections in flight end."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def outage(self, seconds: float) -> threading.Thread:
        """Down now, up again after `seconds`, in the background."""
        self.down()
        thread = threading.Thread(target=lambda: (time.sleep(seconds), self.up()), daemon=True)
        thread.start()
        return thread

    def logs(self) -> str:
        path = self.root / "versitygw.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        self.down()
        shutil.rmtree(self.root, ignore_errors=True)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def stop_running_jobs(cluster, timeout: float = 30) -> list[str]:
    """Stop the cluster's jobs that have not ended, and wait until they have; returns their ids."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    running = [j.submission_id for j in client.list_jobs() if j.type == "SUBMISSION" and not j.status.is_terminal()]
    for job in running:
        client.stop_job(job)
    deadline = time.monotonic() + timeout
    while running and time.monotonic() < deadline:
        if all(client.get_job_status(job).is_terminal() for job in running):
            break
        time.sleep(0.5)
    return running
