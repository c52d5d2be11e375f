"""LaionDataset end to end, and the part's suspend, priority and deadline: kubectl against the test
API server, the operator in its own process, parts run as real Ray jobs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion_operator.testbed.demo_data import write_metadata
from tests.support import outputs
from tests.support.kinds import (
    DATASET_DOWNLOAD,
    DATASETS,
    GROUP,
    PLURAL,
    VERSION,
    apply,
    dataset_doc,
    jobs_of,
    part,
    parts_of,
    wait_dataset,
    wait_for_finished_shard,
)
from tests.support.kinds import wait_phase as _wait_phase
from tests.support.operator_proc import operator_starter
from tests.support.specs import laionpart

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def operator(api, tmp_path):
    """Start the operator on a Ray cluster (or on none: then only suspended parts make sense)."""
    with operator_starter(tmp_path, api) as start:
        yield start


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory, image_server):
    """Every image answers after a second: a part still downloading when the test acts."""
    path = tmp_path_factory.mktemp("slow-meta") / "slow.parquet"
    write_metadata(path, 60, image_server.base_url, seed=23, slow_seconds=1, failure_mix={"timeout": 1.0})
    return path


def part_doc(name: str, source: Path, out: Path, **spec) -> dict:
    """A part that fails at once rather than retry (maxRetries 0), downloading as the dataset's parts do."""
    options = {**DATASET_DOWNLOAD, **spec.pop("download", {})}
    return laionpart(name, source, out, download=options, **{"maxRetries": 0, **spec})


def wait_phase(api, namespace: str, name: str, phases, timeout: float = 600) -> dict:
    """Generous: the machine running the tests may be busy; no test asserts a speed."""
    return _wait_phase(api, namespace, name, phases, timeout=timeout)


def dataset(api, namespace: str, name: str) -> dict | None:
    return api.get(GROUP, VERSION, DATASETS, namespace, name)


def job_status(ray_cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(ray_cluster.dashboard_url).get_job_status(job_id).value)


def wait_job_ended(ray_cluster, job_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while (state := job_status(ray_cluster, job_id)) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    return state


def test_dataset_of_five_parts(api, operator, ray_cluster, kube_namespace, sources, tmp_path):
    op = operator({"maxConcurrentParts": 2}, ray=ray_cluster)
    out = tmp_path / "dataset"
    result = apply(api, kube_namespace, dataset_doc("aes", sources, out))
    assert result.returncode == 0, result.stderr

    status = wait_dataset(api, kube_namespace, "aes", lambda s: s.get("phase") in ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded", status
    owner = dataset(api, kube_namespace, "aes")
    parts = sorted(parts_of(api, kube_namespace, "aes"), key=lambda p: p["spec"]["partId"])
    assert [p["metadata"]["name"] for p in parts] == [f"aes-{n}" for n in range(1, 6)]
    summaries = []
    for n, p in enumerate(parts, start=1):
        assert p["spec"]["partId"] == str(n)
        assert p["spec"]["source"] == {"urls": [str(sources / f"meta_{n}.parquet")]}
        assert p["spec"]["output"]["uri"] == str(out / f"part_{n}")  # the seeds' data_dir layout
        [ref] = p["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "LaionDataset",
            "aes",
            owner["metadata"]["uid"],
            True,
        )
        assert p["status"]["phase"] == "Succeeded"
        summaries.append(json.loads((out / f"part_{n}" / f"part_{n}_summary.json").read_text()))

    # The dataset's status adds up its parts'.
    ok = sum(s["images"]["ok"] for s in summaries)
    failed = sum(s["images"]["attempted"] - s["images"]["ok"] for s in summaries)
    assert status["partsTotal"] == 5 and status["partsSucceeded"] == 5 and status["partsProgress"] == "5/5"
    assert status["partsByPhase"] == {"Succeeded": 5}
    assert status["images"]["ok"] == ok > 0 and status["images"]["failed"] == failed > 0
    reasons: dict[str, int] = {}
    for s in summaries:
        for reason, n in s["images"]["failedByReason"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    assert status["images"]["failedByReason"] == reasons
    assert status["bytesWritten"] == sum(s["bytesWritten"] for s in summaries)
    assert status["successRate"] == round(100.0 * ok / (ok + failed), 2)

    table = api.kubectl("get", "lds", "-n", kube_namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "PHASE", "PARTS", "IMAGES", "SUCCESS", "%"]
    assert row.split()[:5] == ["aes", "Succeeded", "5/5", str(ok), str(status["successRate"])]

    # The index lists every part's annotation files, and they are there.
    index = json.loads((out / "dataset_index.json").read_text())
    assert status["index"] == str(out / "dataset_index.json")
    assert [e["partId"] for e in index["parts"]] == ["1", "2", "3", "4", "5"]
    for entry in index["parts"]:
        assert entry["ready"] and entry["phase"] == "Succeeded"
        assert (out / entry["annotations"]).is_file() and (out / entry["summary"]).is_file()
        assert entry["annotations"] == f"part_{entry['partId']}/part_{entry['partId']}_stats.csv"

    # Events on the dataset's transitions, as kubectl describe shows them.
    described = api.kubectl("describe", "lds", "aes", "-n", kube_namespace).stdout
    for reason in ("PartsCreated", "PartSucceeded", "Running", "Succeeded"):
        assert reason in described, described

    metrics = op.metrics()
    assert f'laion_dataset_parts{{dataset="aes",namespace="{kube_namespace}",phase="Succeeded"}} 5.0' in metrics
    assert f'laion_dataset_images{{dataset="aes",namespace="{kube_namespace}"}} {float(ok)}' in metrics

    # A template change reaches the parts as their own spec change would: a filter change into the
    # same output cannot resume, so every part refuses it (FilterChanged) and its output is untouched.
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != "dataset_index.json")
    changed = dataset_doc("aes", sources, out)
    changed["spec"]["template"]["filter"]["minWidth"] = 100
    assert apply(api, kube_namespace, changed).returncode == 0
    status = wait_dataset(
        api,
        kube_namespace,
        "aes",
        lambda s: s.get("phase") == "Failed" and s.get("partsByPhase") == {"Failed": 5},
        timeout=600,
    )["status"]
    for p in parts_of(api, kube_namespace, "aes"):
        assert p["spec"]["filter"]["minWidth"] == 100 and p["metadata"]["generation"] == 2
        assert {c["type"]: c.get("reason") for c in p["status"]["conditions"]}["Failed"] == "FilterChanged"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != "dataset_index.json") == before
    assert "PartFailed" in api.kubectl("describe", "lds", "aes", "-n", kube_namespace).stdout

    # Deleting the dataset deletes its parts (ownerReferences) and leaves their output.
    api.kubectl("delete", "lds", "aes", "-n", kube_namespace, "--timeout=300s")
    deadline = time.monotonic() + 300
    while parts_of(api, kube_namespace, "aes"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert all((out / f"part_{n}" / f"part_{n}_stats.csv").is_file() for n in range(1, 6))
    assert 'dataset="aes"' not in op.metrics()


def test_a_settled_part_wakes_on_a_change_without_polling(api, operator, kube_namespace, sources, tmp_path):
    """A settled part sleeps until its object changes: with polling ten minutes apart, a spec change
    still reaches it at once (so many finished parts cost an idle operator nothing)."""
    op = operator(env={"LAION_OPERATOR_POLL_SECONDS": "600"})
    doc = part_doc("sleeper", sources / "meta_1.parquet", tmp_path / "out", suspend=True)
    assert apply(api, kube_namespace, doc).returncode == 0
    api.wait_for(
        GROUP,
        VERSION,
        PLURAL,
        kube_namespace,
        "sleeper",
        lambda o: (o.get("status") or {}).get("phase") == "Suspended",
        timeout=60,
    )
    doc["spec"]["priority"] = 5  # still suspended: a new generation the part must take in
    assert apply(api, kube_namespace, doc).returncode == 0
    changed = time.monotonic()
    status = api.wait_for(
        GROUP,
        VERSION,
        PLURAL,
        kube_namespace,
        "sleeper",
        lambda o: (o.get("status") or {}).get("observedGeneration") == 2,
        timeout=60,
    )["status"]
    assert time.monotonic() - changed < 15  # not the 600 s poll
    assert status["phase"] == "Suspended"
    assert "Handler 'wake'" not in op.logs()  # one line per watch event would drown the log


def test_suspended_dataset_fans_out_follows_its_template_and_goes_with_its_parts(
    api, operator, kube_namespace, sources, tmp_path
):
    """No Ray at all: a suspended dataset's parts never submit a job."""
    op = operator()
    doc = dataset_doc("held", sources, tmp_path / "held", suspend=True)
    doc["spec"]["source"]["digits"] = 2
    assert apply(api, kube_namespace, doc).returncode == 0
    status = wait_dataset(
        api,
        kube_namespace,
        "held",
        lambda s: s.get("phase") == "Suspended" and s.get("partsByPhase") == {"Suspended": 5},
        timeout=300,
    )["status"]
    assert status["partsProgress"] == "0/5" and status["partPhases"] == {f"0{n}": "Suspended" for n in range(1, 6)}
    parts = sorted(parts_of(api, kube_namespace, "held"), key=lambda p: p["metadata"]["name"])
    assert [p["metadata"]["name"] for p in parts] == [f"held-0{n}" for n in range(1, 6)]
    assert all(p["spec"]["suspend"] and "submissionId" not in p["status"] for p in parts)
    assert parts[0]["spec"]["source"]["urls"] == [str(sources / "meta_01.parquet")]  # zero-padded
    assert parts[0]["spec"]["output"]["uri"] == str(tmp_path / "held" / "part_01")
    index = json.loads((tmp_path / "held" / "dataset_index.json").read_text())
    assert [(e["partId"], e["ready"]) for e in index["parts"]] == [(f"0{n}", False) for n in range(1, 6)]
    table = api.kubectl("get", "lds", "held", "-n", kube_namespace).stdout.splitlines()
    assert table[1].split()[:4] == ["held", "Suspended", "0/5", "0"]

    # A template change reaches every part's spec.
    doc["spec"]["template"]["download"]["imageSize"] = 32
    doc["spec"]["template"]["priority"] = 7
    assert apply(api, kube_namespace, doc).returncode == 0
    deadline = time.monotonic() + 300
    while {
        (p["spec"]["download"]["imageSize"], p["spec"]["priority"], p["status"].get("observedGeneration"))
        for p in parts_of(api, kube_namespace, "held")
    } != {(32, 7, 2)}:
        assert time.monotonic() < deadline, [
            (p["spec"]["download"]["imageSize"], p["spec"]["priority"], p["metadata"].get("generation"), p["status"])
            for p in parts_of(api, kube_namespace, "held")
        ]
        time.sleep(0.3)
    assert all(p["status"]["phase"] == "Suspended" for p in parts_of(api, kube_namespace, "held"))

    events = {
        e["reason"]
        for e in api.list(
            "",
            "v1",
            "events",
            kube_namespace,
            field_selector="involvedObject.kind=LaionDataset,involvedObject.name=held",
        )
    }
    assert {"PartsCreated", "PartsUpdated", "Suspended"} <= events
    described = api.kubectl("describe", "lds", "held", "-n", kube_namespace).stdout
    assert "PartsCreated" in described and "PartsUpdated" in described
    # Each part counts as Suspended again once the dataset saw it decide on the new template.
    wait_dataset(
        api,
        kube_namespace,
        "held",
        lambda s: s.get("observedGeneration") == 2 and s.get("partsByPhase") == {"Suspended": 5},
        timeout=60,
    )
    assert f'laion_dataset_parts{{dataset="held",namespace="{kube_namespace}",phase="Suspended"}} 5.0' in op.metrics()

    # A dataset a rule refuses never reaches the operator.
    bad = dataset_doc("bad", sources, tmp_path / "bad")
    bad["spec"]["template"]["download"] = {"encodeFormat": "png", "encodeQuality": 50}
    result = apply(api, kube_namespace, bad)
    assert result.returncode != 0 and "encodeQuality must be at most 9" in result.stderr

    api.kubectl("delete", "lds", "held", "-n", kube_namespace, "--timeout=300s")
    deadline = time.monotonic() + 300
    while parts_of(api, kube_namespace, "held"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert (tmp_path / "held" / "dataset_index.json").is_file()  # the output stays


def test_suspend_and_resume_mid_download_exactly_once(
    api, operator, ray_cluster, kube_namespace, slow_source, tmp_path
):
    operator(ray=ray_cluster)
    out = tmp_path / "out"
    doc = part_doc("pausing", slow_source, out, download={"maxInFlight": 2})
    assert apply(api, kube_namespace, doc).returncode == 0
    wait_phase(api, kube_namespace, "pausing", "Downloading")
    wait_for_finished_shard(out)
    first_job = part(api, kube_namespace, "pausing")["status"]["submissionId"]

    api.kubectl("patch", "lp", "pausing", "-n", kube_namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}')
    status = wait_phase(api, kube_namespace, "pausing", ("Suspended", "Succeeded", "Failed"))["status"]
    assert status["phase"] == "Suspended", status
    assert job_status(ray_cluster, first_job) == "STOPPED"  # Suspended means the job has ended
    finished = {p.name: p.stat().st_mtime for p in out.glob("*_stats.json")}
    total = json.loads((out / "_laion" / "filter.json").read_text())["shards"]
    assert 0 < len(finished) < total, "suspended mid-way"
    time.sleep(3)  # nothing runs while suspended
    assert part(api, kube_namespace, "pausing")["status"]["phase"] == "Suspended"
    assert len(jobs_of(ray_cluster, kube_namespace, "pausing")) == 1

    api.kubectl("patch", "lp", "pausing", "-n", kube_namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    status = wait_phase(api, kube_namespace, "pausing", ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Succeeded", status
    assert status["observedGeneration"] == 3 and "-g3-" in status["submissionId"]
    for name, mtime in finished.items():  # resumed: the shards finished before the suspend stayed
        assert (out / name).stat().st_mtime == mtime
    kept = [
        u
        for s in range(total)
        for u in pq.read_table(out / "_laion" / "shards" / f"{s:05d}.parquet").column("url").to_pylist()
    ]
    written = outputs.metadata(out)
    assert sorted(r["url"] for r in written) == sorted(kept)  # each sample exactly once
    keys = [s.key for s in outputs.images(out, "webdataset")]
    assert len(keys) == len(set(keys)) == sum(r["status"] == "success" for r in written) > 0
    reasons = [e for e in api.list("", "v1", "events", kube_namespace, field_selector="involvedObject.name=pausing")]
    assert "Suspended" in {e["reason"] for e in reasons}


def test_priority_orders_the_queue(api, operator, ray_cluster, kube_namespace, sources, slow_source, tmp_path):
    operator({"maxConcurrentParts": 1}, ray=ray_cluster)
    assert apply(api, kube_namespace, part_doc("blocker", slow_source, tmp_path / "blocker")).returncode == 0
    wait_phase(api, kube_namespace, "blocker", ("Pending", "Filtering", "Downloading"))
    # Older but lower: it waits behind the newer, higher one.
    assert apply(api, kube_namespace, part_doc("low", sources / "meta_1.parquet", tmp_path / "low")).returncode == 0
    wait_phase(api, kube_namespace, "low", "Queued")
    time.sleep(1.1)  # creationTimestamp has a resolution of a second
    assert (
        apply(
            api, kube_namespace, part_doc("high", sources / "meta_2.parquet", tmp_path / "high", priority=10)
        ).returncode
        == 0
    )
    wait_phase(api, kube_namespace, "high", "Queued")

    # Suspending the running part frees its slot: the higher priority takes it.
    api.kubectl("patch", "lp", "blocker", "-n", kube_namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}')
    wait_phase(api, kube_namespace, "blocker", "Suspended")
    high = wait_phase(api, kube_namespace, "high", ("Pending", "Filtering", "Downloading", "Annotating", "Succeeded"))
    assert part(api, kube_namespace, "low")["status"]["phase"] == "Queued"
    assert wait_phase(api, kube_namespace, "high", ("Succeeded", "Failed"))["status"]["phase"] == "Succeeded"
    low = wait_phase(api, kube_namespace, "low", ("Succeeded", "Failed"))["status"]
    assert low["phase"] == "Succeeded"
    assert low["activeSince"] > high["status"]["activeSince"]


def test_deadline_fails_a_running_part_and_keeps_its_shards(
    api, operator, ray_cluster, kube_namespace, slow_source, tmp_path
):
    operator(ray=ray_cluster)
    out = tmp_path / "out"
    doc = part_doc("late", slow_source, out, activeDeadlineSeconds=3600, download={"maxInFlight": 2})
    assert apply(api, kube_namespace, doc).returncode == 0
    wait_phase(api, kube_namespace, "late", "Downloading")
    wait_for_finished_shard(out)
    # A tighter deadline applies to the running job, as a Job's or Kueue's does: no restart, it overruns it.
    api.kubectl(
        "patch", "lp", "late", "-n", kube_namespace, "--type=merge", "-p", '{"spec": {"activeDeadlineSeconds": 2}}'
    )
    status = wait_phase(api, kube_namespace, "late", ("Succeeded", "Failed"))["status"]
    assert status["phase"] == "Failed", status
    assert status["observedGeneration"] == 2
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Failed"]["reason"] == "DeadlineExceeded"
    assert "spec.activeDeadlineSeconds (2s)" in status["message"]
    assert wait_job_ended(ray_cluster, status["submissionId"]) == "STOPPED"
    shards = {p.name: p.stat().st_mtime for p in out.glob("*_stats.json")}
    assert shards  # what was done stays
    time.sleep(3)  # and the part stays failed: no retry, no new job
    assert part(api, kube_namespace, "late")["status"]["phase"] == "Failed"
    assert len(jobs_of(ray_cluster, kube_namespace, "late")) == 1  # generation 1's, never restarted
    assert {p.name: p.stat().st_mtime for p in out.glob("*_stats.json")} == shards
    events = api.list("", "v1", "events", kube_namespace, field_selector="involvedObject.name=late")
    assert "DeadlineExceeded" in {e["reason"] for e in events}
