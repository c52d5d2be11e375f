"""The cluster-wide host budget against the per-task scheme (issue 31 item 4): the many-hosts profile
of the loopback internet (`internet_profiles`), split into 8 shards run as 8 shard tasks at once on
one Ray cluster of 8 CPUs (the test bed's `RayCluster`, started once; both sides join it with
`--ray-address`), `download.hostBudget` cluster against task, every side `repeats` times in turns.

What is reported: whole command and download stage (medians, min-max), images kept, and the most
requests the server answered for one host at once (the politeness each scheme comes to: with 8
tasks, up to 8 × maxPerHost per task, against maxPerHost across the cluster), beside the most
connections open to one host (a task keeps idle keep-alive connections past its leases). The goal: the cluster
budget's whole command within 10 % of the per-task scheme's, where no host holds many URLs.

    python -m bench --only host-budget [--internet-urls N] [--repeats R]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys

from . import common, download_bench, internet_bench, internet_profiles

TASKS = 8
SIDES = {"cluster": {"hostBudget": "cluster"}, "task": {"hostBudget": "task"}}
GOAL = 0.9  # the cluster budget's rate, at least this share of the per-task scheme's


def bench(n: int | None = None, repeats: int = 3, seed: int = internet_bench.SEED) -> tuple[str, list[str]]:
    from tests.support import internet
    from tests.support.services import RayCluster

    profile = internet_profiles.PROFILES["many-hosts"]
    n = n or profile.urls
    shard = -(-n // TASKS)
    work = common.WORK / "internet" / "host-budget"
    work.mkdir(parents=True, exist_ok=True)
    cfg = internet.Config(seed=seed, **{"net": internet_bench.NET, **profile.config})
    specs = [p.rsplit("/", 1)[1] for p in download_bench.image_paths(n)]
    print(
        f"[host-budget] many-hosts: {n:,} URLs in {TASKS} shards of {shard}, seed {seed}", file=sys.stderr, flush=True
    )
    cluster = RayCluster(num_cpus=TASKS).start()
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    try:
        server = internet_bench.Server(cfg, specs, work, [])
        try:
            meta = work / "internet.parquet"
            internet.write_metadata(meta, internet.urls(cfg, n, specs, server.port, mix=profile.mix))
            env = common.env(
                RAY_agent_register_timeout_ms="300000",
                **{k: v for k, v in cluster.client_env().items() if k != "RAY_ADDRESS"},
            )
            for attempt in range(repeats):
                for side, settings in SIDES.items():
                    out = work / side
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = [
                        *internet_bench.project_cmd(meta, out, shard, {**settings, "parallelism": TASKS}),
                        "--ray-address",
                        cluster.address,
                    ]
                    server.stats()  # a new count
                    r = common.run(cmd, cwd=work, env=env, groups=internet_bench.groups_of("project"))
                    served = server.stats()
                    stage, attempted, ok = download_bench.stage(out)
                    record = dict(
                        seconds=r.seconds,
                        stage=stage,
                        ok=ok,
                        attempted=attempted,
                        rate=ok / r.seconds,
                        peak=served.get("host_requests_peak", 0),
                        connections=served.get("host_connections_peak", 0),
                        rate_limited=served.get("responses", {}).get("429", 0),
                        load=common.load().split()[0],
                    )
                    runs[side].append(record)
                    print(
                        f"[host-budget] {side:<8} run {attempt + 1}/{repeats}: command {r.seconds:6.1f} s, "
                        f"stage {stage:6.1f} s, {ok:,} of {attempted:,} ok, most requests at once to one host "
                        f"{record['peak']} (connections {record['connections']}), 429s sent {record['rate_limited']}, "
                        f"load {common.load()}",
                        file=sys.stderr,
                        flush=True,
                    )
                    shutil.rmtree(out, ignore_errors=True)
        finally:
            server.close()
    finally:
        cluster.stop()
    return report(runs, n, shard, seed)


def _spread(values: list[float], unit: str = " s") -> str:
    return f"{statistics.median(values):.1f}{unit} ({min(values):.1f}-{max(values):.1f})"


def report(runs: dict[str, list[dict]], n: int, shard: int, seed: int) -> tuple[str, list[str]]:
    lines = [
        f"many-hosts, {n:,} URLs in {TASKS} shards of {shard} (seed {seed}), {TASKS} shard tasks at once on one "
        f"Ray cluster of {TASKS} CPUs on {os.cpu_count()} cores; maxPerHost 16 (cluster: across the tasks; "
        "task: per task), the sides in turns.",
        "",
        "| side | whole command | download stage | images ok | most requests at once to one host "
        "(open connections) | 429s sent |",
        "|---|---|---|---|---|---|",
    ]
    for side, rs in runs.items():
        lines.append(
            f"| {side} | {_spread([r['seconds'] for r in rs])} | {_spread([r['stage'] for r in rs])} | "
            f"{statistics.median([r['ok'] for r in rs]):.0f} | {max(r['peak'] for r in rs)} "
            f"({max(r['connections'] for r in rs)}) | "
            f"{statistics.median([r['rate_limited'] for r in rs]):.0f} |"
        )
    cluster = statistics.median(r["rate"] for r in runs["cluster"])
    task = statistics.median(r["rate"] for r in runs["task"])
    paired = statistics.median(c["rate"] / t["rate"] for c, t in zip(runs["cluster"], runs["task"]))
    ratio = cluster / task
    lines += [
        "",
        f"Cluster budget over the per-task scheme, whole command, medians: {ratio:.2f}× "
        f"(paired by round: {paired:.2f}×; rounds "
        + ", ".join(f"{c['rate'] / t['rate']:.2f}" for c, t in zip(runs["cluster"], runs["task"]))
        + ").",
    ]
    goal = (
        f"host budget (many-hosts, {TASKS} tasks): the cluster budget at {ratio:.2f}× the per-task scheme's rate, "
        f"whole command, medians (paired {paired:.2f}×), goal ≥ {GOAL:.2f}×: {'met' if ratio >= GOAL else 'not met'}; "
        f"most requests at once to one host {max(r['peak'] for r in runs['cluster'])} (cluster) against "
        f"{max(r['peak'] for r in runs['task'])} (per task)"
    )
    return "\n".join(lines), [goal]


if __name__ == "__main__":
    os.environ.update(common.QUIET_ENV)
    text, goals = bench(int(sys.argv[1]) if len(sys.argv) > 1 else 400, repeats=1)
    print(text)
    print("\n".join(goals))
