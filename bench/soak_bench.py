"""Soak: 200 LaionParts applied at once through one operator, maxConcurrentParts 4, every part a real
Ray job on a loopback Ray cluster (tiny parts: 5 images each from the loopback image server).

Measured: whether all end Succeeded; whether they started oldest first (the most any part's start is
away from its place in creation order, against maxConcurrentParts); the queue metric (its peak, and
whether it only shrank from there to 0); the operator's peak resident memory; and its CPU while every
part has ended and it only waits (pollSeconds 1, ten times the default's polling); how many Ray jobs
ran (parts + retries, issue 20) and the most jobs of one part seen running at once (1). Goals: RSS <
200 MB, idle CPU < 5 % of a core (issue 12). tests/control/test_faults_operator.py runs the same with 16 parts.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from . import common

sys.path.insert(0, str(common.ROOT / "operator"))

PARTS, LIMIT = 200, 4


def run(parts: int = PARTS, limit: int = LIMIT) -> dict:
    from laion_operator.testbed.demo_data import write_metadata
    from laion_operator.testbed.fakeweb import ImageServer
    from tests.support.chart import install
    from tests.support.cluster import Cluster
    from tests.support.load import run_many
    from tests.support.operator_proc import OperatorProcess
    from tests.support.services import RayCluster

    cluster = RayCluster(num_cpus=2).start()
    try:
        with Cluster() as api, ImageServer() as images, tempfile.TemporaryDirectory(prefix="laion-soak-") as tmp:
            tmp = Path(tmp)
            api.install_crd(common.ROOT / "crds" / "laionpart.yaml")
            api.create_namespace("soak")
            source = tmp / "part.parquet"
            write_metadata(source, 5, images.base_url, seed=7, failure_mix={"ok": 0.8, "http_4xx": 0.2})
            op = OperatorProcess(
                tmp,
                {**install(api), **cluster.client_env()},
                {"rayAddress": cluster.dashboard_url, "maxConcurrentParts": limit},
            ).start()
            try:
                result = run_many(api, "soak", cluster, op, source, tmp, parts, timeout=6 * 3600, idle_seconds=60)
            finally:
                op.stop()
    finally:
        cluster.stop()
    peak = result.queue.index(max(result.queue))
    return {
        "parts": parts,
        "limit": limit,
        "seconds": result.seconds,
        "succeeded": sum(p == "Succeeded" for p in result.phases.values()),
        "jobs": len(result.started),
        "order_slip": result.order_slip(),
        "ray_jobs": result.ray_jobs,
        "retries": result.retries,
        "most_jobs_at_once": result.most_at_once,
        "queue_peak": max(result.queue),
        "queue_end": result.queue[-1],
        "queue_monotone": all(b <= a for a, b in zip(result.queue[peak:], result.queue[peak + 1 :])),
        "rss_peak_mb": result.rss_peak / 2**20,
        "idle_cpu_percent": 100 * result.idle_cpu,
    }


def goals(r: dict) -> list[str]:
    return [
        f"soak: {r['parts']} parts at once, maxConcurrentParts {r['limit']}: {r['succeeded']} Succeeded, "
        f"{r['jobs']} jobs — {common.goal(r['succeeded'] == r['parts'])}",
        f"soak: Ray jobs = parts + retries: {r['ray_jobs']} = {r['parts']} + {r['retries']} — "
        f"{common.goal(r['ray_jobs'] == r['parts'] + r['retries'])}",
        f"soak: never two jobs of a part at once: at most {r['most_jobs_at_once']} — "
        f"{common.goal(r['most_jobs_at_once'] <= 1)}",
        f"soak: operator peak RSS < 200 MB: {r['rss_peak_mb']:.0f} MB — {common.goal(r['rss_peak_mb'] < 200)}",
        f"soak: operator CPU while it waits < 5 % of a core: {r['idle_cpu_percent']:.2f} % — "
        f"{common.goal(r['idle_cpu_percent'] < 5)}",
    ]


def report(r: dict) -> str:
    return "\n".join(
        [
            "| parts | maxConcurrentParts | all ended after | Succeeded | jobs (retries) | most of a part at once "
            "| start order slip (max) | queue peak | queue only shrank, ended at | operator peak RSS "
            "| operator idle CPU |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {r['parts']} | {r['limit']} | {r['seconds'] / 60:.1f} min | {r['succeeded']} | {r['ray_jobs']} "
            f"({r['retries']}) | {r['most_jobs_at_once']} | "
            f"{r['order_slip']} | {r['queue_peak']:.0f} | {'yes' if r['queue_monotone'] else 'no'}, "
            f"{r['queue_end']:.0f} | {r['rss_peak_mb']:.0f} MB | {r['idle_cpu_percent']:.2f} % of a core |",
        ]
    )


if __name__ == "__main__":
    parts = int(sys.argv[1]) if len(sys.argv) > 1 else PARTS
    r = run(parts)
    print(report(r))
    print("\n".join(goals(r)))
