"""Many LaionParts at once through one operator: what the load test and the soak benchmark measure.

`run_many` applies `n` tiny parts in one `kubectl apply`, samples the operator while they run (its
queue metric, its resident memory) and, once every part has ended, its CPU while it only waits.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import yaml

from tests.support.specs import laionpart

GROUP, VERSION, PLURAL = "laion-operator.io", "v1alpha1", "laionparts"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def queue_length(metrics: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith("laion_operator_queue_length "):
            return float(line.split()[1])
    return None


@dataclass
class LoadRun:
    names: list[str]
    phases: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, dict] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)  # parts in the order their jobs started
    ray_jobs: int = 0  # the Ray jobs of the namespace's parts, all attempts
    retries: int = 0  # the parts' status.retries, added up
    most_at_once: int = 0  # the most jobs of one part seen running at the same moment
    queue: list[float] = field(default_factory=list)  # the queue metric, sampled while the parts ran
    rss_peak: int = 0
    idle_cpu: float = 0.0  # fraction of one core while every part had ended
    seconds: float = 0.0

    def order_slip(self) -> int:
        """How far, at most, a part's start is from its place in creation order (oldest first)."""
        return max(abs(self.started.index(name) - i) for i, name in enumerate(self.names))


def jobs_in(ray_cluster, namespace: str) -> list[dict]:
    """The Ray jobs of the namespace's parts (as the operator labels them)."""
    listed = ray_cluster.jobs_api("/api/jobs/")
    jobs = listed if isinstance(listed, list) else listed.get("jobs", [])
    return [j for j in jobs if (j.get("metadata") or {}).get("laion-operator.io/namespace") == namespace]


def most_jobs_of_a_part(ray_cluster, namespace: str) -> int:
    """The most jobs any one part has running (or pending) right now."""
    try:
        jobs = jobs_in(ray_cluster, namespace)
    except OSError:  # a dashboard too busy to answer: the next sample counts
        return 0
    running: dict[str, int] = {}
    for job in jobs:
        if job.get("status") in ("PENDING", "RUNNING"):
            part = job["metadata"].get("laion-operator.io/part")
            running[part] = running.get(part, 0) + 1
    return max(running.values(), default=0)


def part_doc(name: str, source, output) -> dict:
    # Tiny images in large shards: hundreds of parts at once are about the operator, not the download.
    return laionpart(name, source, output, samples_per_shard=100, download={"imageSize": 32})


def run_many(
    api, namespace: str, ray_cluster, operator, source, workdir, n: int, timeout: float = 3600, idle_seconds: float = 15
) -> LoadRun:
    names = [f"p{i:04d}" for i in range(n)]  # created in one second: names break the tie, as the operator does
    run = LoadRun(names)
    docs = [part_doc(name, source, workdir / name) for name in names]
    start = time.monotonic()
    result = api.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs), check=False, timeout=600
    )  # one kubectl for all: minutes on a machine shared with other test runs
    assert result.returncode == 0, result.stderr
    deadline = start + timeout
    while True:
        run.rss_peak = max(run.rss_peak, rss_bytes(operator.proc.pid))
        try:
            length = queue_length(operator.metrics())
        except OSError:  # a scrape that timed out (200 parts on 2 cores): the next one counts
            length = None
        if length is not None:
            run.queue.append(length)
        run.most_at_once = max(run.most_at_once, most_jobs_of_a_part(ray_cluster, namespace))
        items = api.list(GROUP, VERSION, PLURAL, namespace)
        run.phases = {o["metadata"]["name"]: (o.get("status") or {}).get("phase") for o in items}
        if all(run.phases.get(name) in ("Succeeded", "Failed") for name in names):
            break
        assert time.monotonic() < deadline, f"parts still running after {timeout} s: {run.phases}"
        time.sleep(0.5)
    run.seconds = time.monotonic() - start
    run.statuses = {o["metadata"]["name"]: o.get("status") or {} for o in items}
    run.queue.append(queue_length(operator.metrics()) or 0.0)
    mine = jobs_in(ray_cluster, namespace)
    run.ray_jobs = len(mine)
    run.retries = sum(int(s.get("retries") or 0) for s in run.statuses.values())
    run.started = [j["metadata"]["laion-operator.io/part"] for j in sorted(mine, key=lambda j: j["start_time"])]
    before, t0 = cpu_seconds(operator.proc.pid), time.monotonic()
    time.sleep(idle_seconds)
    run.idle_cpu = (cpu_seconds(operator.proc.pid) - before) / (time.monotonic() - t0)
    run.rss_peak = max(run.rss_peak, rss_bytes(operator.proc.pid))
    return run
