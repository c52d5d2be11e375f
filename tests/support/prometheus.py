"""A real Prometheus (Debian's `prometheus` binary) on loopback, for tests that scrape the operator.

    with Prometheus(["127.0.0.1:9100"], rule_files=[alerts]) as prom:
        prom.wait_for_target()
        prom.query('laion_part_images_total')      # -> [{"metric": {...}, "value": [ts, "12"]}, ...]

It scrapes its targets every second under the job name `laion-operator` with `honor_labels`, as the
chart's ServiceMonitor does (the parts' `namespace` label must win over the target's).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from tests.support.loopback import free_port

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "laion-operator" / "files" / "dashboard.json"

# Grafana's variables, as the test evaluates them: every namespace and part, fixed intervals.
GRAFANA_VARIABLES = {
    "$namespace": ".*",
    "$part": ".*",
    "$dataset": ".*",
    "$__rate_interval": "30s",
    "$__interval": "5s",
    "$__range": "5m",
}


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    found = []

    def walk(panels):
        for panel in panels:
            for t in panel.get("targets", []):
                found.append((f"{panel['id']}:{panel['title']}/{t['refId']}", t["expr"]))
            walk(panel.get("panels", []))

    walk(board["panels"])
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            # label_values(<selector>, <label>) is Grafana's, not PromQL: the selector must have data.
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"], re.S)
            found.append((f"variable {var['name']}", m.group(1)))
    return found


def grafana_substitute(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def service_monitor_scrape(monitor: dict, cluster) -> list[dict]:
    """The scrape configs the Prometheus Operator generates from a ServiceMonitor, for a Prometheus
    outside the cluster that reaches pods directly. Debian's Prometheus is built without Kubernetes
    discovery, so the discovery step is done here, as its kubernetes_sd `endpoints` role does: the
    EndpointSlices of the Services the monitor selects, the port it names, each ready endpoint a
    target labelled with its namespace, service, pod and port, as the Prometheus Operator labels them;
    the monitor's path, interval, honorLabels and relabelings apply as they would there."""
    spec = monitor["spec"]
    selector = ",".join(f"{k}={v}" for k, v in spec["selector"]["matchLabels"].items())
    configs = []
    for i, endpoint in enumerate(spec["endpoints"]):
        targets = []
        for namespace in spec["namespaceSelector"]["matchNames"]:
            for service in cluster.list("", "v1", "services", namespace, label_selector=selector):
                name = service["metadata"]["name"]
                slices = cluster.list(
                    "discovery.k8s.io",
                    "v1",
                    "endpointslices",
                    namespace,
                    label_selector=f"kubernetes.io/service-name={name}",
                )
                for piece in slices:
                    ports = [p["port"] for p in piece.get("ports") or [] if p.get("name") == endpoint["port"]]
                    for ep in piece.get("endpoints") or []:
                        if not (ep.get("conditions") or {}).get("ready"):
                            continue
                        labels = {
                            "namespace": namespace,
                            "service": name,
                            "pod": (ep.get("targetRef") or {}).get("name", ""),
                            "endpoint": endpoint["port"],
                        }
                        targets += [
                            {"targets": [f"{ip}:{port}"], "labels": labels} for ip in ep["addresses"] for port in ports
                        ]
        relabel = [
            {
                "action": r.get("action", "replace"),
                "target_label": r["targetLabel"],
                **({"replacement": r["replacement"]} if "replacement" in r else {}),
                **({"source_labels": r["sourceLabels"]} if "sourceLabels" in r else {}),
            }
            for r in endpoint.get("relabelings", [])
        ]
        configs.append(
            {
                "job_name": f"serviceMonitor/{monitor['metadata']['namespace']}/{monitor['metadata']['name']}/{i}",
                "honor_labels": bool(endpoint.get("honorLabels")),
                "metrics_path": endpoint.get("path", "/metrics"),
                "scrape_interval": endpoint.get("interval", "30s"),
                "scrape_timeout": endpoint.get("scrapeTimeout", "10s"),
                "static_configs": targets,
                "relabel_configs": relabel,
            }
        )
    return configs


class PromQLError(RuntimeError):
    """Prometheus refused a query (parse error, bad range, ...)."""


def binary(name: str = "prometheus") -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/local/bin/{name}") if Path(p).exists()), None
    )


class Prometheus:
    def __init__(
        self,
        targets: list[str],
        job: str = "laion-operator",
        interval: str = "1s",
        rule_files: list[str | Path] = (),
        startup_timeout: float = 60,
        scrape_configs: list[dict] | None = None,
    ):
        """`scrape_configs`: Prometheus's own, instead of the static `targets` under `job`."""
        self.targets, self.job, self.interval = list(targets), job, interval
        self.scrape_configs = scrape_configs
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self.startup_timeout = startup_timeout
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Prometheus:
        exe = binary()
        if exe is None:
            raise FileNotFoundError("prometheus not found; run scripts/setup --test (installs Debian's prometheus)")
        self._tmp = tempfile.TemporaryDirectory(prefix="laion-prometheus-")
        tmp = Path(self._tmp.name)
        config = {
            "global": {
                "scrape_interval": self.interval,
                "evaluation_interval": self.interval,
                "scrape_timeout": self.interval,
            },
            "rule_files": self.rule_files,
            "scrape_configs": self.scrape_configs
            or [{"job_name": self.job, "honor_labels": True, "static_configs": [{"targets": self.targets}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = tmp / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    exe,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {self.startup_timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- HTTP API --------------------------------------------------------------------------------

    def api(self, path: str, **params) -> dict | list:
        url = f"{self.url}/api/v1/{path}"
        data = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None}).encode()
        try:
            # POST: long PromQL does not fit comfortably in a URL.
            with urllib.request.urlopen(url, data=data if params else None, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as err:
            body = json.load(err)
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')} ({params.get('query', path)})")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant vector (or scalar, as a one-element list) of `expr`."""
        data = self.api("query", query=expr, time=at)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def value(self, expr: str) -> float | None:
        """The single value of `expr`, None when it returns nothing."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{expr} returned {len(result)} series, expected one: {result}")
        return float(result[0]["value"][1])

    def rules(self) -> list[dict]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def wait_for_target(self, timeout: float = 30) -> None:
        """Until every target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = self.api("targets")["activeTargets"]
            if active and all(t["health"] == "up" for t in active):
                return
            time.sleep(0.5)
        raise TimeoutError(f"targets not up after {timeout} s: {self.api('targets')['activeTargets']}")

    def wait_until(self, expr: str, predicate=lambda result: bool(result), timeout: float = 30) -> list[dict]:
        """Poll `expr` until predicate(result) holds; returns that result."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):
                return result
            time.sleep(0.5)
        raise TimeoutError(f"{expr} never satisfied the condition in {timeout} s; last result: {result}")
