"""The operator as a cluster runs it: `laion-operator operator --config FILE`, in its own process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.support.services import free_port

VENV_BIN = Path(sys.executable).parent


class OperatorProcess:
    def __init__(
        self,
        workdir: Path,
        kube_env: dict[str, str],
        config: dict,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = ("--standalone",),
    ):
        self.workdir = workdir
        self.metrics_port = free_port()
        self.config_path = workdir / "operator.yaml"
        self.config_path.write_text(yaml.safe_dump({**config, "metricsPort": self.metrics_port}))
        # Storage credentials reach the operator only through Secrets, as in a cluster.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        # Environment overrides the file (config.py): tests poll and retry faster than production.
        fast = {
            "LAION_OPERATOR_POLL_SECONDS": "1",
            "LAION_OPERATOR_RETRY_BACKOFF_SECONDS": "1",
            # The test bed's Ray cluster has no token authentication (services.NO_AUTH).
            "LAION_OPERATOR_ALLOW_CREDENTIALS_WITHOUT_RAY_AUTH": "true",
        }
        self.env = {**inherited, **fast, **kube_env, **(env or {})}
        self.args = args
        self.log_path = workdir / "operator.log"
        self.proc: subprocess.Popen | None = None

    def launch(self) -> OperatorProcess:
        """Start the process without waiting for it to serve (it may be meant to die early)."""
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "laion-operator"), "operator", "--config", str(self.config_path), *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def start(self) -> OperatorProcess:
        self.launch()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # /metrics answers once the startup handler ran
            assert self.proc.poll() is None, f"operator exited:\n{self.logs()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"operator did not start:\n{self.logs()}")

    def kill(self) -> None:
        """An operator crash: no shutdown handlers, no cleanup."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@contextlib.contextmanager
def operator_starter(workdir: Path, api, ray_cluster=None):
    """`start(config, ray=…, wait=True, **kw)` runs an operator against the test API server and a Ray
    cluster (`ray`, else `ray_cluster`, else none: then nothing answers at rayAddress); every operator
    started is stopped at the end."""
    started: list[OperatorProcess] = []

    def start(config: dict | None = None, ray=None, wait: bool = True, **kw) -> OperatorProcess:
        ray = ray or ray_cluster
        ray_env = ray.client_env() if ray else {}
        address = ray.dashboard_url if ray else "http://127.0.0.1:9"  # nothing listens there
        op = OperatorProcess(workdir, {**api.operator_env, **ray_env}, {"rayAddress": address, **(config or {})}, **kw)
        started.append(op)
        return op.start() if wait else op

    try:
        yield start
    finally:
        for op in started:
            op.stop()
