"""Monitoring: the metrics a real Prometheus scrapes while a part runs, and the dashboard and alerts on them.

One part runs end to end on the session's Ray cluster (conftest's ray_driver) against the fake web
while Prometheus scrapes the operator's metrics server every second. Then: the series equal the
part's summary; every PromQL expression of the Grafana dashboard and of the alert rules parses and
returns data; a restarted operator's metrics continue the same counters; a forgotten part's series
go away.
"""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from laion_operator import spec as specs
from laion_operator.contract import FAILURE_REASONS, PHASES, PROGRESS, Progress
from laion_operator.control.metrics import Metrics
from laion_operator.storage import Store
from laion_operator.testbed.demo_data import write_metadata
from tests.support.prometheus import DASHBOARD, Prometheus, binary, dashboard_exprs, grafana_substitute
from tests.support.specs import partspec

ROOT = Path(__file__).resolve().parents[2]

FILES = ROOT / "charts" / "laion-operator" / "files"
ALERTS = FILES / "alerts.yaml"
ALERT_TESTS = ROOT / "tests" / "data" / "alerts_test.yaml"
NAMESPACE, PART, QUEUED = "laion", "part-0", "part-1"
DATASET = "dataset-0"
SEL = f'namespace="{NAMESPACE}", part="{PART}"'

# Debian's prometheus and promtool are installed by `scripts/setup --test`; without them these tests fail.

# --- the expressions under test ------------------------------------------------------------------


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def without_thresholds(expr: str) -> str:
    """The alert's expression returning its signal whether or not it fires.

    An alert expression returns data only while firing. Turning each comparison with a number
    into a `bool` comparison (`x < 0.5` -> `x < bool 0.5`, which yields 0 or 1 for every series)
    and `absent(x)` into `x` keeps every selector, function and join of the rule, so a misspelt
    metric or label, or a join matching nothing, still comes back empty.
    """
    expr = re.sub(r"(==|!=|<=|>=|<|>)\s*(-?\d+(?:\.\d+)?)\b", r"\1 bool \2", expr)
    return re.sub(r"\babsent\(", "(", expr)


# --- fixtures ------------------------------------------------------------------------------------


def part_spec(metadata: Path, output: Path) -> specs.PartSpec:
    # Small images and short timeouts: the 2 cores are shared.
    download = {
        "imageSize": 64,
        "minImageSize": 64,
        "timeout": 1,
        "maxInFlight": 16,
        "maxPerHost": 16,
        "parallelism": 2,
    }
    return partspec("0", metadata, output, samples_per_shard=60, filter={"seed": 0}, download=download)


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_driver, image_server):
    """The part run end to end, its progress fed to Metrics as the operator does, scraped by Prometheus."""
    from laion_operator.pipeline.driver import run_part

    tmp = tmp_path_factory.mktemp("monitoring")
    metrics = Metrics(handlers=["create", "resume", "delete"])
    server = metrics.serve(0, "127.0.0.1")
    state = {"metrics": metrics, "server": server, "port": server.server_port}
    try:
        with Prometheus([f"127.0.0.1:{server.server_port}"], rule_files=[ALERTS]) as prom:
            prom.wait_for_target()
            mix = {
                "ok": 0.7,
                "http_4xx": 0.08,
                "http_5xx": 0.05,
                "timeout": 0.03,
                "decode": 0.05,
                "opt_out": 0.04,
                "too_small": 0.03,
                "connection": 0.02,
            }
            write_metadata(
                tmp / "meta.parquet", 300, image_server.base_url, failure_mix=mix, slow_seconds=2, return_table=False
            )
            spec = part_spec(tmp / "meta.parquet", tmp / "dataset")
            # What the operator does around a job: a waiting part, a queue, a few errors.
            metrics.observe_part(NAMESPACE, QUEUED, "Queued", None)
            metrics.set_queue_length(1)
            metrics.reconcile_error("create")
            metrics.kube_api_errors.inc()
            metrics.ray_submission_errors.inc()
            metrics.observe_part(NAMESPACE, PART, "Pending", None)
            summary = run_part(spec, on_progress=lambda p: metrics.observe_part(NAMESPACE, PART, p.phase, p))
            # The last snapshot (Succeeded) carries the final counts; wait until Prometheus has it.
            prom.wait_until(f'laion_part_phase{{{SEL}, phase="Succeeded"}} == 1')
            # The part as the only part of a LaionDataset: the operator's dataset view of its status.
            from laion_operator.control.datasets import summarize
            from laion_operator.control.status import cr_status

            final = Progress.from_json(Store(spec.output).read_json(PROGRESS))
            metrics.observe_dataset(
                NAMESPACE,
                DATASET,
                summarize([{"spec": {"partId": spec.part_id}, "status": {"phase": "Succeeded", **cr_status(final)}}]),
            )
            prom.wait_until(
                f'laion_dataset_parts{{namespace="{NAMESPACE}", dataset="{DATASET}", phase="Succeeded"}} == 1'
            )
            state.update(prom=prom, spec=spec, summary=summary)
            yield state
    finally:
        state["server"].shutdown()
        state["server"].server_close()


# --- tests ---------------------------------------------------------------------------------------


def test_alert_rules_check():
    result = subprocess.run([binary("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_rules_fire_when_they_should():
    """tests/data/alerts_test.yaml: Stalled, LowSuccessRate, RateLimited, Failed and OperatorDown fire, and only
    then."""
    result = subprocess.run(
        [binary("promtool"), "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, cwd=ALERT_TESTS.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_names_and_stall_window():
    rules = {r["alert"]: r for r in alert_rules()}
    assert set(rules) == {
        "LaionPartStalled",
        "LaionPartLowSuccessRate",
        "LaionPartRateLimited",
        "LaionPartFailed",
        "LaionOperatorDown",
    }
    # 15 minutes without an image: a 5 m window that stays flat for 10 m.
    assert "[5m]" in rules["LaionPartStalled"]["expr"] and rules["LaionPartStalled"]["for"] == "10m"
    assert 'job="laion-operator"' in rules["LaionOperatorDown"]["expr"]
    assert all(r["labels"]["severity"] in ("warning", "critical") for r in rules.values())


def test_dashboard_uses_a_datasource_variable():
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "part"} <= set(variables)
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text())) - {board["uid"]}
    assert uids == {"${datasource}"}, f"hard-coded datasource uids: {uids}"


def samples(metrics: Metrics, name: str) -> dict:
    return {
        tuple(sorted(s.labels.items())): s.value
        for f in metrics.registry.collect()
        for s in f.samples
        if s.name == name
    }


def test_rerun_never_lowers_a_counter():
    """A re-run's Progress restarts from zero before counting the finished shards again: no dip, no reset."""
    metrics = Metrics()
    first = Progress(part_id="0", phase="Failed", rows_read=300, images_ok=120, failed_by_reason={"timeout": 9})
    metrics.observe_part("ns", "p", "Failed", first)
    metrics.observe_part("ns", "p", "Filtering", Progress(part_id="0", rows_read=50), retries=1)
    assert samples(metrics, "laion_part_images_total") == {(("namespace", "ns"), ("part", "p")): 120}
    assert samples(metrics, "laion_part_metadata_rows_read_total")[(("namespace", "ns"), ("part", "p"))] == 300
    resumed = Progress(
        part_id="0",
        phase="Downloading",
        rows_read=300,
        images_ok=150,
        failed_by_reason={"timeout": 10, "some new reason": 2},
    )
    metrics.observe_part("ns", "p", "Downloading", resumed, retries=1)
    failed = samples(metrics, "laion_part_images_failed_total")
    key = (("namespace", "ns"), ("part", "p"))
    assert samples(metrics, "laion_part_images_total")[key] == 150
    assert failed[key + (("reason", "timeout"),)] == 10 and failed[key + (("reason", "other"),)] == 2
    assert len(failed) == len(FAILURE_REASONS)  # bounded: unknown reasons become "other"
    assert samples(metrics, "laion_part_retries_total")[key] == 1


def test_a_heal_lowers_the_failures_once_at_its_end():
    metrics = Metrics()
    key = (("namespace", "ns"), ("part", "p"))
    done = dict(part_id="0", phase="Succeeded", rows_read=300, shards_total=3, shards_done=3)
    metrics.observe_part(
        "ns", "p", "Succeeded", Progress(**done, images_ok=200, failed_by_reason={"timeout": 10, "http_4xx": 5})
    )
    healing = Progress(part_id="0", phase="Downloading", images_ok=40, failed_by_reason={"timeout": 1})
    metrics.observe_part("ns", "p", "Downloading", healing)  # a rewritten shard climbs back: no dip yet
    failed = samples(metrics, "laion_part_images_failed_total")
    assert failed[key + (("reason", "timeout"),)] == 10 and failed[key + (("reason", "http_4xx"),)] == 5
    metrics.observe_part(
        "ns", "p", "Succeeded", Progress(**done, images_ok=206, failed_by_reason={"timeout": 4, "http_4xx": 5})
    )
    failed = samples(metrics, "laion_part_images_failed_total")
    assert failed[key + (("reason", "timeout"),)] == 4 and failed[key + (("reason", "http_4xx"),)] == 5
    assert samples(metrics, "laion_part_images_total")[key] == 206


def test_part_without_progress_has_phase_only():
    metrics = Metrics()
    metrics.observe_part("ns", "new", "Queued", None)
    assert samples(metrics, "laion_part_images_total") == {}
    assert sum(samples(metrics, "laion_part_phase").values()) == 1
    metrics.forget_part("ns", "new")
    assert samples(metrics, "laion_part_phase") == {}


def test_series_equal_the_summary(run):
    prom, summary = run["prom"], run["summary"]

    def value(metric: str, extra: str = "") -> float:
        return prom.value(f"{metric}{{{SEL}{extra}}}")

    images = summary["images"]
    assert images["ok"] > 0 and sum(images["failedByReason"].values()) > 0  # the run exercised both
    assert value("laion_part_images_total") == images["ok"]
    for reason in FAILURE_REASONS:
        assert value("laion_part_images_failed_total", f', reason="{reason}"') == images["failedByReason"].get(
            reason, 0
        ), reason
    assert value("laion_part_bytes_written_total") == summary["bytesWritten"] > 0
    assert value("laion_part_metadata_rows_read_total") == summary["metadata"]["rowsRead"] == 300
    assert value("laion_part_metadata_rows_kept_total") == summary["metadata"]["rowsKept"]
    for state in ("total", "done", "failed"):
        assert value("laion_part_shards", f', state="{state}"') == summary["shards"][state], state
    for phase in PHASES:
        assert value("laion_part_phase", f', phase="{phase}"') == (phase == "Succeeded"), phase
    assert value("laion_part_retries_total") == 0
    assert value("laion_part_duration_seconds") == pytest.approx(summary["durations"]["totalSeconds"], abs=0.01)
    # The queued part has its phase but no counters until its job reports progress.
    assert prom.value(f'laion_part_phase{{namespace="{NAMESPACE}", part="{QUEUED}", phase="Queued"}}') == 1
    assert prom.query(f'laion_part_images_total{{part="{QUEUED}"}}') == []
    # Throughput is rate() of the counters: it saw the images go by.
    assert prom.value(f"max_over_time(rate(laion_part_images_total{{{SEL}}}[10s])[5m:1s])") > 0
    assert prom.value('laion_operator_reconcile_errors_total{handler="create"}') == 1
    assert prom.value("laion_operator_queue_length") == 1


@pytest.mark.parametrize("where, expr", dashboard_exprs(), ids=[w for w, _ in dashboard_exprs()])
def test_dashboard_query_returns_data(run, where, expr):
    assert run["prom"].query(grafana_substitute(expr)), f"{where}: no data for\n{expr}"


@pytest.mark.parametrize("rule", alert_rules(), ids=[r["alert"] for r in alert_rules()])
def test_alert_query_returns_data(run, rule):
    prom = run["prom"]
    prom.query(rule["expr"])  # parses and evaluates (raises PromQLError otherwise)
    signal = without_thresholds(rule["expr"])
    assert prom.query(signal), f"{rule['alert']}: no data for\n{signal}"


def test_alert_rules_evaluate_in_prometheus(run):
    prom = run["prom"]
    rules = prom.rules()
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # A finished part is neither stalled nor failed; the operator is up. (Rules are evaluated every
    # second, possibly not yet since the part's last phase was scraped.)
    deadline = time.monotonic() + 10
    while any(r["state"] != "inactive" for r in rules) and time.monotonic() < deadline:
        time.sleep(0.5)
        rules = prom.rules()
    assert all(r["state"] == "inactive" for r in rules), [(r["name"], r["state"]) for r in rules]


def test_restart_keeps_counters_and_forget_removes_series(run):
    """A new operator process that only read progress.json serves the same values; Prometheus sees no reset."""
    from laion_operator.contract import PROGRESS

    prom, old = run["prom"], run["metrics"]
    persisted = Progress.from_json(Store(run["spec"].output).read_json(PROGRESS))
    fresh = Metrics()
    fresh.observe_part(NAMESPACE, PART, persisted.phase, persisted)
    assert part_samples(fresh) == part_samples(old, part=PART)

    run["server"].shutdown()
    run["server"].server_close()
    run["metrics"], run["server"] = fresh, fresh.serve(run["port"], "127.0.0.1")
    restarted = time.time()
    prom.wait_until(f"timestamp(laion_part_images_total{{{SEL}}}) > {restarted + 1}")  # scraped the new server
    assert prom.value(f"laion_part_images_total{{{SEL}}}") == run["summary"]["images"]["ok"]
    assert prom.value(f"sum(resets(laion_part_images_total{{{SEL}}}[5m]))") == 0
    assert prom.value(f"sum(resets(laion_part_images_failed_total{{{SEL}}}[5m]))") == 0

    fresh.forget_part(NAMESPACE, PART)
    prom.wait_until(f"laion_part_phase{{{SEL}}}", lambda result: result == [], timeout=10)
    assert prom.query(f'{{__name__=~"laion_part_.*", {SEL}}}') == []


def part_samples(metrics: Metrics, part: str | None = None) -> dict:
    """laion_part_* samples of a registry, except the in-memory-only last-progress time."""
    out = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if not s.name.startswith("laion_part_") or s.name.startswith("laion_part_last_progress"):
                continue
            if part is None or s.labels.get("part") == part:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
