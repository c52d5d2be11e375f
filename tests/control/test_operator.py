"""The operator end to end: kubectl against the test API server, parts run as real Ray jobs."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml

from laion_operator.spec import load
from laion_operator.testbed.demo_data import write_metadata
from tests.support.kinds import GROUP, PLURAL, VERSION, apply, jobs_of, part, wait_phase
from tests.support.prometheus import Prometheus
from tests.support.services import job_driver_pids
from tests.support.specs import laionpart

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def metadata(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("meta") / "part.parquet"
    write_metadata(path, 60, image_server.base_url, seed=21, failure_mix={"ok": 0.8, "http_4xx": 0.1, "decode": 0.1})
    return path


@pytest.fixture(scope="module")
def slow_metadata(tmp_path_factory, image_server):
    """Every image answers after a second: a part that is still running when the test acts."""
    path = tmp_path_factory.mktemp("slow") / "part.parquet"
    write_metadata(path, 60, image_server.base_url, seed=22, slow_seconds=1, failure_mix={"timeout": 1.0})
    return path


def manifest(name: str, source: Path, output: Path, example: str = "03-trial-1-percent.yaml", **overrides) -> dict:
    """An example part pointed at the test's metadata and output: source, output, filter and download
    are the test's, the rest of the spec stays the example's (its partId names the summary file)."""
    kept = yaml.safe_load((ROOT / "examples" / example).read_text())["spec"]
    kept = {k: v for k, v in kept.items() if k not in ("source", "output", "filter", "download")}
    download = {"outputFormat": "webdataset", **overrides.pop("download", {})}
    return laionpart(name, source, output, download=download, **{**kept, **overrides})


def wait_events(api, namespace: str, name: str, reasons: list[str], timeout: float = 30) -> str:
    """`kubectl describe lp` once its Events section lists every reason, in that order."""
    deadline = time.monotonic() + timeout
    while True:
        described = api.kubectl("describe", "lp", name, "-n", namespace).stdout
        events = described.split("Events:", 1)[-1]
        found = [line.split()[1] for line in events.splitlines()[2:] if len(line.split()) > 1]
        if [r for r in found if r in reasons] == reasons or time.monotonic() > deadline:
            assert [r for r in found if r in reasons] == reasons, described
            return described
        time.sleep(0.5)


def test_examples_are_valid_parts():
    paths = sorted((ROOT / "examples").glob("*.yaml"))
    names = {load(path).part_id for path in paths}
    assert len(paths) >= 4 and len(names) == len(paths)  # each parses, and each names a part of its own


def test_part_from_apply_to_succeeded(api, operators, ray_cluster, kube_namespace, metadata, tmp_path):
    op = operators()
    prom = Prometheus([f"127.0.0.1:{op.metrics_port}"]).start()
    out = tmp_path / "out"
    result = apply(api, kube_namespace, manifest("trial", metadata, out))
    assert result.returncode == 0, result.stderr
    seen = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # status moves while the part runs, not only at the end
        status = (part(api, kube_namespace, "trial") or {}).get("status") or {}
        seen.add(status.get("phase"))
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(0.3)
    assert status["phase"] == "Succeeded", status
    assert seen & {"Pending", "Filtering", "Downloading"}

    summary = json.loads((out / "part_trial-0_summary.json").read_text())
    assert status["images"]["ok"] == summary["images"]["ok"] > 0
    assert status["images"]["failedByReason"] == summary["images"]["failedByReason"]
    assert status["rowsRead"] == summary["metadata"]["rowsRead"]
    assert status["rowsKept"] == summary["metadata"]["rowsKept"]
    assert status["shards"] == summary["shards"]
    assert status["bytesWritten"] == summary["bytesWritten"]
    assert status["successRate"] == summary["successRate"]
    assert status["output"] == str(out)
    assert status["observedGeneration"] == 1
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Complete"]["status"] == "True" and conditions["Submitted"]["status"] == "True"
    assert conditions["Verified"]["status"] == "True" and summary["verified"]["ok"]
    assert [j["submission_id"] for j in jobs_of(ray_cluster, kube_namespace, "trial")] == [status["submissionId"]]

    table = api.kubectl("get", "lp", "-n", kube_namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "PHASE", "SHARDS", "IMAGES", "SUCCESS", "%"]
    total = summary["shards"]["total"]
    assert row.split()[:5] == [
        "trial",
        "Succeeded",
        f"{total}/{total}",
        str(summary["images"]["ok"]),
        str(summary["successRate"]),
    ]

    # Prometheus scraped the operator while the part ran; its series end equal to the summary.
    try:
        sel = f'namespace="{kube_namespace}", part="trial"'
        prom.wait_until(f'laion_part_phase{{{sel}, phase="Succeeded"}} == 1')
        assert prom.value(f"laion_part_images_total{{{sel}}}") == summary["images"]["ok"]
        for reason, n in summary["images"]["failedByReason"].items():
            assert prom.value(f'laion_part_images_failed_total{{{sel}, reason="{reason}"}}') == n
        assert prom.value(f"laion_part_bytes_written_total{{{sel}}}") == summary["bytesWritten"]
        assert prom.value(f"laion_part_metadata_rows_kept_total{{{sel}}}") == summary["metadata"]["rowsKept"]
        assert prom.value(f'laion_part_shards{{{sel}, state="done"}}') == total
        assert prom.value('up{job="laion-operator"}') == 1
    finally:
        prom.stop()
    # The part's story is on the object, for `kubectl describe`.
    described = wait_events(api, kube_namespace, "trial", ["Submitted", "Succeeded"])
    assert f"job {status['submissionId']} submitted" in described
    # The operator followed the part to the end without loading the pipeline (Ray, Arrow, pandas).
    maps = Path(f"/proc/{op.proc.pid}/maps").read_text()
    assert not re.search(r"_raylet|libarrow|pandas|img2dataset|cv2", maps)
    api.kubectl("delete", "lp", "trial", "-n", kube_namespace)
    assert 'part="trial"' not in op.metrics()  # a deleted part's series go away


def test_bad_spec_is_refused_at_apply(api, kube_namespace, metadata, tmp_path):
    doc = manifest("bad", metadata, tmp_path / "out", filter={"minWidth": -5}, download={"resizeMode": "stretch"})
    result = apply(api, kube_namespace, doc)
    assert result.returncode != 0
    assert "spec.filter.minWidth" in result.stderr and "greater than or equal to 0" in result.stderr
    assert "spec.download.resizeMode" in result.stderr and "keep_ratio" in result.stderr
    assert part(api, kube_namespace, "bad") is None


def test_operator_restart_mid_part_adopts_the_job(api, operators, ray_cluster, kube_namespace, slow_metadata, tmp_path):
    first = operators()
    out = tmp_path / "out"
    apply(api, kube_namespace, manifest("restart", slow_metadata, out, download={"maxInFlight": 2}))
    wait_phase(api, kube_namespace, "restart", "Downloading")
    first.kill()
    job_id = part(api, kube_namespace, "restart")["status"]["submissionId"]
    operators()
    status = wait_phase(api, kube_namespace, "restart", ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded", status
    assert status["submissionId"] == job_id
    assert [j["submission_id"] for j in jobs_of(ray_cluster, kube_namespace, "restart")] == [job_id]


def test_delete_mid_part_stops_the_job_and_keeps_output(
    api, operators, ray_cluster, kube_namespace, slow_metadata, tmp_path
):
    operators()
    out = tmp_path / "out"
    apply(api, kube_namespace, manifest("doomed", slow_metadata, out, download={"maxInFlight": 1}))
    wait_phase(api, kube_namespace, "doomed", "Downloading")
    job_id = part(api, kube_namespace, "doomed")["status"]["submissionId"]
    api.kubectl("delete", "lp", "doomed", "-n", kube_namespace, "--timeout=120s")
    assert part(api, kube_namespace, "doomed") is None
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job_id).value) not in ("STOPPED", "FAILED"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert (out / "_laion" / "filter.json").exists()  # what was done stays


def test_concurrency_limit_queues_parts(api, operators, kube_namespace, metadata, slow_metadata, tmp_path):
    operators({"maxConcurrentParts": 1})
    apply(api, kube_namespace, manifest("first", slow_metadata, tmp_path / "a", download={"maxInFlight": 4}))
    wait_phase(api, kube_namespace, "first", ("Pending", "Filtering", "Downloading"))
    apply(api, kube_namespace, manifest("second", metadata, tmp_path / "b"))
    queued = wait_phase(api, kube_namespace, "second", "Queued", timeout=30)
    assert "maxConcurrentParts 1" in queued["status"]["message"]
    assert "maxConcurrentParts 1" in wait_events(api, kube_namespace, "second", ["Queued"])
    assert part(api, kube_namespace, "first")["status"]["phase"] != "Succeeded"
    wait_phase(api, kube_namespace, "first", "Succeeded")
    assert wait_phase(api, kube_namespace, "second", ("Succeeded", "Failed"))["status"]["phase"] == "Succeeded"


def test_failed_job_is_retried_and_resumes(api, operators, ray_cluster, kube_namespace, slow_metadata, tmp_path):
    op = operators()
    out = tmp_path / "out"
    apply(
        api,
        kube_namespace,
        manifest("crashy", slow_metadata, out, maxRetries=2, download={"maxInFlight": 4, "parallelism": 1}),
    )
    wait_phase(api, kube_namespace, "crashy", "Downloading")
    deadline = time.monotonic() + 120
    while not list(out.glob("*_stats.json")):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    finished = {p.name: p.stat().st_mtime for p in out.glob("*_stats.json")}
    # The job's driver dies as on a node failure.
    pids = job_driver_pids(str(out))
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    status = wait_phase(api, kube_namespace, "crashy", ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded", status
    assert status["retries"] == 1 and status["submissionId"].endswith("-a1")
    wait_events(api, kube_namespace, "crashy", ["Submitted", "Retrying", "Submitted", "Succeeded"])
    assert len(jobs_of(ray_cluster, kube_namespace, "crashy")) == 2
    for name, mtime in finished.items():  # the retry resumed: finished shards were not redone
        assert (out / name).stat().st_mtime == mtime
    assert "retry 1 of 2" in op.logs()


def test_spec_change_restarts_with_resume_and_refuses_a_filter_change(
    api, operators, ray_cluster, kube_namespace, slow_metadata, tmp_path
):
    operators()
    out = tmp_path / "out"
    doc = manifest("changer", slow_metadata, out, download={"maxInFlight": 4, "parallelism": 1})
    apply(api, kube_namespace, doc)
    wait_phase(api, kube_namespace, "changer", "Downloading")
    deadline = time.monotonic() + 120
    while not list(out.glob("*_stats.json")):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first_job = part(api, kube_namespace, "changer")["status"]["submissionId"]
    finished = {p.name: p.stat().st_mtime for p in out.glob("*_stats.json")}

    doc["spec"]["download"]["maxInFlight"] = 8  # a download option: the job restarts and resumes
    assert apply(api, kube_namespace, doc).returncode == 0
    status = wait_phase(api, kube_namespace, "changer", ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded", status
    assert status["observedGeneration"] == 2 and "-g2-" in status["submissionId"]
    from ray.job_submission import JobSubmissionClient

    assert str(JobSubmissionClient(ray_cluster.dashboard_url).get_job_status(first_job).value) == "STOPPED"
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime == mtime

    doc["spec"]["filter"]["minWidth"] = 100  # a filter change into the same output cannot resume
    before = sorted(p.name for p in out.iterdir())
    assert apply(api, kube_namespace, doc).returncode == 0
    status = api.wait_for(
        GROUP,
        VERSION,
        PLURAL,
        kube_namespace,
        "changer",
        lambda o: o["status"].get("observedGeneration") == 3 and o["status"].get("phase") == "Failed",
        timeout=60,
    )["status"]
    reasons = {c["type"]: c.get("reason") for c in status["conditions"]}
    assert reasons["Failed"] == "FilterChanged" and "spec.output.uri" in status["message"]
    assert sorted(p.name for p in out.iterdir()) == before
