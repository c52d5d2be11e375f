"""Download on the internet on loopback: the project against img2dataset where hosts are slow, far and failing.

The URLs point at `laion_operator.testbed.internet` — many hosts on distinct 127.x.y.z addresses, a
heavy-tailed latency to the first byte (median 0.3 s, p99 3 s), 2 MiB/s per connection, and the seeds'
~80 % success: fast 404/403/5xx, refused connections, silent hosts, drip-fed bodies, a few oversized
bodies, one busy host answering 429 with Retry-After. Its images are the download benchmark's
(`download_bench.image_paths`). The server runs in a process of its own; its CPU is measured so that a
reader can see it was not the bottleneck.

Sides, in one run on one machine, each resizing to 512 keep_ratio into webdataset (JPEG 95, sha256,
timeout 10 s, no retries, the same shards):
- img2dataset's CLI at the seeds' settings: processes = cores, 64 threads;
- img2dataset at other thread counts (the sweep; its best is the second baseline);
- the project at its defaults (`laion-operator run` on a local Ray; `download.allowedNetworks:
  [127.0.0.0/8]` when the spec knows the option, as the test bed is loopback);
- the project on the same images with no latency, no bandwidth limit and no failures (`/calm/`):
  the CPU-bound ceiling the latency should be hidden under.

    python -m bench.internet_bench [URLS]   # a try-out, nothing recorded
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from . import common, download_bench

SEEDS_THREADS = 64
SWEEP = (32, 128, 256, 512)
PER_HOST_SWEEP = (6, 8, 12)  # maxPerHost below the default: how its default was chosen
TIMEOUT = 10
SEED = 11


def shard_size(n: int) -> int:
    # Few shards: every shard of img2dataset waits for its slowest URL, and the sides should see the
    # same shards; four shards keep two processes busy with two rounds.
    return max(1, -(-n // 4))


def img2dataset_cmd(meta: Path, out: Path, n: int, threads: int) -> list[str]:
    cmd = download_bench.img2dataset_cmd(meta, out, n)
    cmd[cmd.index("--thread_count") + 1] = str(threads)
    cmd[cmd.index("--number_sample_per_shard") + 1] = str(shard_size(n))
    cmd[cmd.index("--processes_count") + 1] = str(os.cpu_count() or 2)
    cmd[cmd.index("--timeout") + 1] = str(TIMEOUT)
    return cmd


def project_cmd(meta: Path, out: Path, n: int, per_host: int | None = None) -> list[str]:
    import yaml

    from laion_operator import spec as specs

    download = {
        "imageSize": download_bench.IMAGE_SIZE,
        "resizeMode": "keep_ratio",
        "outputFormat": "webdataset",
        "encodeQuality": 95,
        "computeHash": "sha256",
        "timeout": TIMEOUT,
        "retries": 0,
    }
    if "allowedNetworks" in specs.SCHEMA["properties"]["download"]["properties"]:
        download["allowedNetworks"] = ["127.0.0.0/8"]  # the test bed is loopback, refused by default
    if per_host is not None:
        download["maxPerHost"] = per_host
    spec = {
        "partId": "internet",
        "source": {"urls": [str(meta)]},
        "output": {"uri": str(out)},
        "filter": {"samplesPerShard": shard_size(n), "shuffle": False},
        "download": download,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return [str(Path(common.PYTHON).parent / "laion-operator"), "run", str(path)]


def img2dataset_reason(message: str) -> str:
    """img2dataset's error message as one of the project's failure reasons."""
    m = message.lower()
    if m == "success":
        return "ok"
    code = re.search(r"http error (\d{3})", m)
    if code:
        return "rate_limited" if code.group(1) == "429" else f"http_{code.group(1)[0]}xx"
    if "timed out" in m:
        return "timeout"
    if "refused" in m or "reset by peer" in m or "remote end closed" in m:
        return "connection"
    if "incompleteread" in m or "incomplete read" in m or "decod" in m or "image" in m:
        return "decode"
    return "other"


def reasons(out: Path, project: bool) -> Counter:
    counts: Counter = Counter()
    for p in out.glob("*_stats.json"):
        stats = json.loads(p.read_text())
        if project:
            counts["ok"] += stats["successes"]
            counts.update(stats.get("failed_by_reason", {}))
        else:
            for message, n in stats["status_dict"].items():
                counts[img2dataset_reason(message)] += n
    return counts


class Server:
    """The internet in a process of its own: started once, asked for its stats after each side."""

    def __init__(self, cfg, specs: list[str], work: Path):
        from laion_operator.testbed.internet import process_cpu_seconds

        warm = work / "warm.txt"
        warm.write_text("\n".join(f"http://x/img/{s}" for s in specs))
        self._cpu = process_cpu_seconds
        self.proc = subprocess.Popen(
            [common.PYTHON, "-m", "laion_operator.testbed.internet", *cfg.to_args(), "--urls", str(warm)],
            cwd=common.ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=common.env(),
        )
        line = self.proc.stdout.readline().split()
        if line[:1] != ["ready"]:
            raise SystemExit("[internet] the loopback internet did not start")
        self.port = int(line[1])

    def cpu(self) -> float:
        return self._cpu(self.proc.pid)

    def stats(self) -> dict:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def bench(
    n: int,
    sweep: tuple[int, ...] = SWEEP,
    per_host_sweep: tuple[int, ...] = PER_HOST_SWEEP,
) -> tuple[str, list[str]]:
    from laion_operator.testbed import internet

    work = common.WORK / "internet"
    work.mkdir(parents=True, exist_ok=True)
    cfg = internet.Config(seed=SEED)
    specs = [p.rsplit("/", 1)[1] for p in download_bench.image_paths(n)]
    print(f"[internet] rendering {n:,} images into the loopback internet's cache", file=sys.stderr, flush=True)
    server = Server(cfg, specs, work)
    hosts = internet.Hosts.of(cfg)
    try:
        url_list = internet.urls(cfg, n, specs, server.port)
        kinds = Counter(internet.kind_of(cfg, hosts, u) for u in url_list)
        top_share = Counter(urlsplit(u).hostname for u in url_list).most_common(1)[0][1] / n
        expected = Counter()
        for k, c in kinds.items():
            expected[internet.EXPECTED_REASON[k]] += c
        meta, calm_meta = work / "internet.parquet", work / "calm.parquet"
        internet.write_metadata(meta, url_list)
        ok_urls = [internet.calm(u) for u in url_list if internet.kind_of(cfg, hosts, u) in ("ok", "busy")]
        # The ceiling: the same images (the busy host's too) from hosts that answer at once.
        ok_urls = [u.replace(f"//{hosts.busy}:", f"//{hosts.ordinary[0]}:") for u in ok_urls]
        internet.write_metadata(calm_meta, ok_urls)
        sides = {f"img2dataset-{SEEDS_THREADS}": ("img2dataset", SEEDS_THREADS, meta)}
        for t in sweep:
            if t != SEEDS_THREADS:
                sides[f"img2dataset-{t}"] = ("img2dataset", t, meta)
        sides["project"] = ("project", None, meta)
        sides["project-calm"] = ("project", None, calm_meta)
        for h in per_host_sweep:
            sides[f"project-per-host-{h}"] = ("project", h, meta)
        results = {}
        for side, (tool, setting, source) in sides.items():  # setting: img2dataset's threads, or maxPerHost
            out = work / side
            shutil.rmtree(out, ignore_errors=True)
            count = n if source == meta else len(ok_urls)
            cmd = (
                img2dataset_cmd(source, out, count, setting)
                if tool == "img2dataset"
                else project_cmd(source, out, count, setting)
            )
            server.stats()  # a new count
            cpu_before = server.cpu()
            # A Ray node on a busy machine: its agents may take longer than Ray's default to register.
            r = common.run(cmd, cwd=work, env=common.env(RAY_agent_register_timeout_ms="300000"))
            served = server.stats()
            server_cpu = server.cpu() - cpu_before
            seconds, attempted, ok = download_bench.stage(out)
            results[side] = dict(
                run=r,
                stage=seconds,
                attempted=attempted,
                ok=ok,
                served=served,
                server_cpu=server_cpu,
                reasons=reasons(out, tool == "project"),
                count=count,
                load=common.load().split()[0],
            )
            print(
                f"[internet] {side:<16} command {r.seconds:6.1f} s, stage {seconds:6.1f} s, {ok:,} of {attempted:,} "
                f"ok ({ok / seconds:,.0f} ok images/s), CPU {r.cpu:6.1f} s, peak {common.mb(r.peak_rss)}, "
                f"longest hold {served['held_max_seconds']:.1f} s, server CPU {server_cpu:.1f} s, "
                f"load {common.load()}",
                file=sys.stderr,
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
    finally:
        server.close()
    return report(n, cfg, kinds, expected, results, sides, top_share)


def report(
    n: int,
    cfg,
    kinds: Counter,
    expected: Counter,
    results: dict,
    sides: dict,
    top_share: float,
) -> tuple[str, list[str]]:
    from laion_operator.spec import MAX_PER_HOST

    rate = {s: r["ok"] / r["stage"] for s, r in results.items()}
    seeds = f"img2dataset-{SEEDS_THREADS}"
    i2d = [s for s in results if s.startswith("img2dataset")]
    best = max(i2d, key=lambda s: rate[s])
    reason_names = sorted(
        {k for r in results.values() for k in r["reasons"]} | set(expected), key=lambda k: (k != "ok", k)
    )
    rows = []
    for side, r in results.items():
        run = r["run"]
        rows.append(
            [
                side_label(side, sides[side][1], seeds, best, i2d, MAX_PER_HOST),
                f"{run.seconds:.1f} s",
                f"{r['stage']:.1f} s",
                f"{r['ok']:,} of {r['attempted']:,}",
                f"{rate[side]:,.1f}",
                f"{rate[side] / rate[seeds]:.2f}×",
                f"{run.cpu / max(r['ok'], 1) * 1000:.1f} ms",
                common.mb(run.peak_rss),
                f"{r['served']['held_max_seconds']:.1f} s",
                f"{r['server_cpu']:.1f} s ({r['server_cpu'] / run.seconds * 100:.0f} % of a core)",
                r["load"],
            ]
        )
    reason_rows = [
        [
            "expected (a client with deadlines, size caps, Retry-After)",
            *[f"{expected.get(k, 0):,}" for k in reason_names],
        ]
    ]
    for side, r in results.items():
        if side != "project-calm":
            reason_rows.append([side, *[f"{r['reasons'].get(k, 0):,}" for k in reason_names]])
    mix = ", ".join(f"{k} {v:,}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    text = [
        f"Download on the internet on loopback: {n:,} URLs (the download benchmark's images) over {cfg.hosts} hosts on "
        f"distinct 127.{77}.x.y addresses, the busiest with {top_share:.0%} of the URLs (+{cfg.refused_hosts} "
        f"refusing, {cfg.silent_hosts} silent, 1 busy: 429 past {cfg.busy_rate:g} requests/s); latency to the first "
        f"byte lognormal, median {cfg.latency_median:g} s, "
        f"p99 {cfg.latency_p99:g} s; {cfg.bandwidth / 2**20:g} MiB/s per connection; drip-fed bodies one byte every "
        f"{cfg.drip_interval:g} s for {cfg.drip_seconds:g} s; oversized bodies {cfg.big_bytes / 2**20:g} MiB. "
        f"URL kinds: {mix}. Resized to {download_bench.IMAGE_SIZE} keep_ratio into webdataset, timeout {TIMEOUT} s, no "
        f"retries, {shard_size(n):,} URLs a shard. One run per side. images/s = successful images per second of the "
        "download stage (first shard start to last shard end); CPU = the command's process tree per successful "
        "image (the server not); longest hold = the longest time from a URL's request reaching the server to its "
        "last byte sent or the client hanging up (measured by the server, the same for every side; refused "
        "connections are not seen); server CPU = the loopback internet's own, during the side; load after = the "
        "machine's 1-minute load average as the side ended (above 2, other work shared the 2 cores).",
        "",
        common.table(
            [
                "side",
                "whole command",
                "download stage",
                "ok",
                "images/s",
                "vs seeds' img2dataset",
                "CPU per image",
                "peak memory",
                "longest hold",
                "server CPU",
                "load after",
            ],
            rows,
        ),
        "",
        *per_host_line(results, sides, rate, MAX_PER_HOST),
        "Outcomes per failure reason (img2dataset's error messages mapped to the project's reasons):",
        "",
        common.table(["side", *reason_names], reason_rows),
    ]
    project = rate["project"]
    held = results["project"]["served"]["held_max_seconds"]
    peak, ref_peak = results["project"]["run"].peak_rss, results[seeds]["run"].peak_rss
    goals = [
        f"internet: ≥ 2× img2dataset at the seeds' settings ({os.cpu_count()} × {SEEDS_THREADS} threads): "
        f"{project / rate[seeds]:.2f}× — {common.goal(project >= 2 * rate[seeds])}",
        f"internet: ≥ 1.3× img2dataset at its best thread count ({sides[best][1]} threads): "
        f"{project / rate[best]:.2f}× — {common.goal(project >= 1.3 * rate[best])}",
        f"internet: ≥ 85 % of the project's own zero-latency rate on the same images: "
        f"{project / rate['project-calm'] * 100:.0f} % — {common.goal(project >= 0.85 * rate['project-calm'])}",
        f"internet: no URL held past its deadline + 1 s ({TIMEOUT + 1} s, no retries): longest {held:.1f} s — "
        f"{common.goal(held <= TIMEOUT + 1)}",
        f"internet: peak memory no more than img2dataset's (seeds' settings): {common.mb(peak)} vs "
        f"{common.mb(ref_peak)} — {common.goal(peak <= ref_peak)}",
    ]
    return "\n".join(text), goals


def side_label(side: str, setting, seeds: str, best: str, i2d: list[str], default_per_host: int) -> str:
    if side in i2d:
        mark = " (the seeds' settings)" if side == seeds else " (best of the sweep)" if side == best else ""
        return f"img2dataset CLI, {os.cpu_count()} processes × {setting} threads{mark}"
    if side == "project":
        return f"project, defaults (maxPerHost {default_per_host}), local Ray"
    if side == "project-calm":
        return "project, zero latency (/calm/, the same images)"
    return f"project, maxPerHost {setting}"


def per_host_line(results: dict, sides: dict, rate: dict, default: int) -> list[str]:
    """The maxPerHost sweep, as shares of the zero-latency rate: the reason for its default."""
    swept = sorted(
        [(sides[s][1], rate[s]) for s in results if s.startswith("project-per-host-")] + [(default, rate["project"])]
    )
    if len(swept) < 2:
        return []
    shares = ", ".join(
        f"{h}{' (default)' if h == default else ''} → {r / rate['project-calm'] * 100:.0f} %" for h, r in swept
    )
    return [
        f"maxPerHost against the zero-latency rate: {shares}. The busiest host's URLs go at most "
        "maxPerHost at a time, each for its latency, so below some maxPerHost that host's queue, not the CPU, "
        "is what a shard waits for.",
        "",
    ]


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 400
    text, goals = bench(n, sweep=(128,), per_host_sweep=(6,))
    print(text)
    print("\n".join(goals))


if __name__ == "__main__":
    os.environ.update(common.QUIET_ENV)
    main(sys.argv[1:])
