"""Download on the internet on loopback: the project against img2dataset where hosts are slow, far and failing.

The URLs point at `tests.support.internet` — many hosts on distinct 127.x.y.z addresses, a
heavy-tailed latency to the first byte (median 0.3 s, p99 3 s), 2 MiB/s per connection, and the seeds'
~80 % success: fast 404/403/5xx, refused connections, silent hosts, drip-fed bodies, a few oversized
bodies, one busy host answering 429 with Retry-After. Its images are the download benchmark's
(`download_bench.image_paths`). The server runs in a process of its own; its CPU is measured so that a
reader can see it was not the bottleneck.

It runs a matrix of profiles (`internet_profiles`: calm, stragglers, heavy-tail, many-hosts,
dns-tls, shards-10000), each on the reporting seed, every side `repeats` times in turns (A B C A B
C …), medians and spreads reported. Sides, each resizing to 512 keep_ratio into webdataset (JPEG 95,
sha256, timeout 10 s, no retries, the same shards):
- img2dataset's CLI at the thread counts of the sweep (processes = cores; the seeds' 64 among them),
  its best by median taken per profile; and img2dataset with `--retries 1` at the thread count that
  was best in the first round;
- the project at its defaults (`laion-operator run` on a local Ray; `download.allowedNetworks:
  [127.0.0.0/8]` as the test bed is loopback);
- the project on the same images with no latency, no bandwidth limit and no failures (`/calm/`):
  the CPU-bound ceiling the latency should be hidden under;
- Daft (`bench.daft_side`: `download()`, `decode_image`, a keep_ratio resize, JPEG 95, parquet) at the
  `max_connections` of its sweep, its best by median taken per profile. It has no download stage of its
  own to time apart (one streaming query), so it is compared on the whole command.

`tune` sweeps download.maxPerHost on the tuning seed, which is not the reporting seed: the defaults
are chosen on one and reported on the other.

    python -m bench.internet_bench [URLS]   # a try-out: calm, one run a side, nothing recorded
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from . import common, daft_side, download_bench, internet_profiles

SEEDS_THREADS = 64
SWEEP = (64, 512)
TIMEOUT = 10
SEED = 29  # the reporting seed
TUNE_SEED = 11  # the tuning seed: download.maxPerHost's default was chosen on it
TUNE_PER_HOST = (4, 8, 16, 32)
TUNE_IN_FLIGHT = (64, 128, 256)
TUNE_PROFILE = "stragglers-1pct-40s"
NET = 78  # 127.78/16 unless a profile says otherwise: the test suite's loopback internet is 127.77
ZERO = "project-zero-latency"


def img2dataset_cmd(meta: Path, out: Path, shard: int, threads: int, retries: int = 0) -> list[str]:
    cmd = download_bench.img2dataset_cmd(meta, out, shard)
    cmd[cmd.index("--thread_count") + 1] = str(threads)
    cmd[cmd.index("--number_sample_per_shard") + 1] = str(shard)
    cmd[cmd.index("--processes_count") + 1] = str(os.cpu_count() or 2)
    cmd[cmd.index("--timeout") + 1] = str(TIMEOUT)
    cmd[cmd.index("--retries") + 1] = str(retries)
    return cmd


def daft_cmd(meta: Path, out: Path, shard: int, connections: int) -> list[str]:
    return [
        common.PYTHON,
        daft_side.__file__,  # a script of its own: the command runs in the profile's work folder
        str(meta),
        str(out),
        str(shard),
        "--connections",
        str(connections),
        "--size",
        str(download_bench.IMAGE_SIZE),
        "--timeout",
        str(TIMEOUT),
    ]


def project_cmd(meta: Path, out: Path, shard: int, overrides: dict | None = None) -> list[str]:
    import yaml

    download = {
        "imageSize": download_bench.IMAGE_SIZE,
        "resizeMode": "keep_ratio",
        "outputFormat": "webdataset",
        "encodeQuality": 95,
        "computeHash": "sha256",
        "timeout": TIMEOUT,
        "retries": 0,
        "allowedNetworks": ["127.0.0.0/8"],  # the test bed is loopback, refused by default
    }
    download.update(overrides or {})  # the tuning sweep's download settings
    spec = {
        "partId": "internet",
        "source": {"urls": [str(meta)]},
        "output": {"uri": str(out)},
        "filter": {"samplesPerShard": shard, "shuffle": False},
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
    if "name or service not known" in m or "name resolution" in m or "nodename nor servname" in m:
        return "dns"
    if "certificate" in m or "ssl" in m:
        return "tls"
    if "refused" in m or "reset by peer" in m or "remote end closed" in m:
        return "connection"
    if "incompleteread" in m or "incomplete read" in m or "decod" in m or "image" in m:
        return "decode"
    return "other"


def outcomes(out: Path, project: bool) -> dict[str, str]:
    """URL -> its outcome (ok or a failure reason), from the shards' metadata files."""
    import pyarrow.parquet as pq

    found: dict[str, str] = {}
    for path in out.glob("*.parquet"):
        table = pq.read_table(path)
        cols = set(table.column_names)
        urls = table.column("url").to_pylist()
        status = table.column("status").to_pylist()
        if project and "failure_reason" in cols:
            why = table.column("failure_reason").to_pylist()
        else:
            why = [img2dataset_reason(m or "") for m in table.column("error_message").to_pylist()]
        for url, st, reason in zip(urls, status, why):
            found[url] = "ok" if st == "success" else (reason or "other")
    return found


def groups_of(tool: str):
    """How a side's processes are grouped for memory: the project's Ray daemons apart from its tasks,
    img2dataset's main process apart from its download processes."""

    def project(pid: int, root: int, cmdline: str) -> str:
        if "ray::" in cmdline or "default_worker.py" in cmdline:
            return "tasks"
        return "driver" if pid == root else "ray daemons"

    def img2dataset(pid: int, root: int, cmdline: str) -> str:
        return "main" if pid == root else "processes"

    return project if tool == "project" else img2dataset


class Server:
    """The internet in a process of its own: started once a profile, asked for its stats after each side."""

    def __init__(self, cfg, specs: list[str], work: Path, prefix: list[str], tls_files=None):
        from tests.support.internet import process_cpu_seconds

        warm = work / "warm.txt"
        warm.write_text("\n".join(f"http://x/img/{s}" for s in specs))
        self._cpu = process_cpu_seconds
        extra = ["--cert", str(tls_files[1]), "--key", str(tls_files[2])] if tls_files else []
        self.proc = subprocess.Popen(
            [
                *prefix,
                common.PYTHON,
                "-m",
                "tests.support.internet",
                *cfg.to_args(),
                "--urls",
                str(warm),
                "--image-dir",
                str(common.WORK / "internet" / "images"),
                *extra,
            ],
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


def median_run(runs: list[dict], key: str = "rate") -> dict:
    """The run whose `key` is the median (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def run_profile(
    profile,
    n: int | None,
    repeats: int,
    seed: int,
    sweep: tuple[int, ...],
    tuning: dict[str, dict] | None = None,
) -> dict:
    """Every side of one profile, `repeats` rounds in turns; the raw runs and what the report needs.
    `tuning` (side name -> download settings): the tuning sweep, the project at those settings and no
    img2dataset."""
    from tests.support import internet

    from .netns import Namespace

    n = n or profile.urls
    cores = os.cpu_count() or 2
    shard = min(profile.shard, max(1, -(-n // cores)))  # small try-outs still give every process a shard
    work = common.WORK / "internet" / profile.name
    work.mkdir(parents=True, exist_ok=True)
    cfg = internet.Config(seed=seed, **{"net": NET, **profile.config})
    hosts = internet.Hosts.of(cfg)
    specs = [p.rsplit("/", 1)[1] for p in download_bench.image_paths(n)]
    env = {"RAY_agent_register_timeout_ms": "300000"}  # a Ray node on a busy machine may register late
    tls_files, ns, prefix = None, None, []
    if cfg.tls:
        from tests.support.tls import make_ca

        tls_files = make_ca(work / "ca", internet.DOMAIN)
        env["SSL_CERT_FILE"] = str(tls_files[0])  # both sides trust the run's CA through OpenSSL's default paths
    if profile.netns:
        ns = Namespace("laion-bench", internet.dns_address(cfg)).__enter__()
        prefix = ns.prefix()
    print(
        f"[internet] {profile.name}: {n:,} URLs, {shard:,} a shard, seed {seed}; rendering images",
        file=sys.stderr,
        flush=True,
    )
    try:
        server = Server(cfg, specs, work, prefix, tls_files)
        try:
            url_list = internet.urls(cfg, n, specs, server.port, mix=profile.mix)
            kinds = {u: internet.kind_of(cfg, hosts, u) for u in url_list}
            expected = {u: internet.expected_reason(cfg, hosts, u, TIMEOUT) for u in url_list}
            top_share = Counter(urlsplit(u).hostname for u in url_list).most_common(1)[0][1] / n
            meta, calm_meta = work / "internet.parquet", work / "calm.parquet"
            internet.write_metadata(meta, url_list)
            # The ceiling: the same images (the busy host's and the heavy ones too) from a host that answers at once.
            ok_urls = [
                internet.calm(u.replace(f"//{hosts.busy}:", f"//{hosts.ordinary[0]}:").replace("/heavy/", "/img/"))
                for u in url_list
                if kinds[u] in ("ok", "busy", "heavy")
            ]
            internet.write_metadata(calm_meta, ok_urls)
            sides: dict[str, tuple] = {}  # name -> (tool, setting, metadata, retries)
            if tuning:
                for name, settings in tuning.items():
                    sides[name] = ("project", settings, meta, 0)
            else:
                sides["project"] = ("project", None, meta, 0)
            sides[ZERO] = ("project", None, calm_meta, 0)
            if not tuning:
                for t in sweep:
                    sides[f"img2dataset-{t}"] = ("img2dataset", t, meta, 0)
                sides["img2dataset-retries1"] = ("img2dataset", None, meta, 1)  # threads: the first round's best
                for c in daft_side.SWEEP:
                    sides[f"daft-{c}"] = ("daft", c, meta, 0)
            runs: dict[str, list[dict]] = {s: [] for s in sides}
            retry_threads = None
            for attempt in range(repeats):
                for side, (tool, setting, source, retries) in sides.items():
                    if side == "img2dataset-retries1":
                        if retry_threads is None:
                            retry_threads = max(sweep, key=lambda t: runs[f"img2dataset-{t}"][0]["rate"])
                        setting = retry_threads
                    out = work / side
                    shutil.rmtree(out, ignore_errors=True)
                    count = n if source == meta else len(ok_urls)
                    if tool == "img2dataset":
                        cmd = img2dataset_cmd(source, out, shard, setting, retries)
                    elif tool == "daft":
                        cmd = daft_cmd(source, out, shard, setting)
                    else:
                        cmd = project_cmd(source, out, shard, setting)
                    server.stats()  # a new count
                    cpu_before = server.cpu()
                    wall = time.time()
                    r = common.run([*prefix, *cmd], cwd=work, env=common.env(**env), groups=groups_of(tool))
                    served = server.stats()
                    server_cpu = server.cpu() - cpu_before
                    outcome = outcomes(out, tool == "project")
                    if tool == "daft":  # one streaming query: the whole command is its only span
                        stage, attempted, ok = r.seconds, len(outcome), sum(v == "ok" for v in outcome.values())
                    else:
                        stage, attempted, ok = download_bench.stage(out)
                    # The shards' stats are stamped with the wall clock; a stage that does not fit inside
                    # the command means that clock stepped (a VM paused or resynced) and its span is void.
                    stepped = tool != "daft" and not (
                        wall - 1 <= download_bench.stage_start(out) and stage <= r.seconds + 1
                    )
                    if stepped:
                        print(f"[internet] {side}: the wall clock stepped; its stage is left out", file=sys.stderr)
                    record = dict(
                        run=r,
                        seconds=r.seconds,
                        stage=None if stepped else stage,
                        attempted=attempted,
                        ok=ok,
                        rate=ok / r.seconds,
                        stage_rate=None if stepped else ok / stage,
                        held=served["held_max_seconds"],
                        held_worst=served["held_worst"][:3],
                        dns=served.get("dns", {}),
                        server_cpu=server_cpu,
                        reasons=Counter(outcome.values()),
                        outcomes=outcome,
                        count=count,
                        threads=setting if tool == "img2dataset" else None,
                        stage_apart=tool != "daft",
                        load=common.load().split()[0],
                    )
                    runs[side].append(record)
                    print(
                        f"[internet] {profile.name} {side:<22} run {attempt + 1}/{repeats}: "
                        f"command {r.seconds:6.1f} s, "
                        f"stage {stage:6.1f} s{' (void)' if stepped else ''}, {ok:,} of {attempted:,} ok "
                        f"({record['rate']:,.1f}/s whole, "
                        f"{ok / stage:,.1f}/s stage), CPU {r.cpu:6.1f} s, peak {common.mb(r.peak_rss)}, "
                        f"longest hold {record['held']:.1f} s, server CPU {server_cpu:.1f} s, load {common.load()}",
                        file=sys.stderr,
                        flush=True,
                    )
                    shutil.rmtree(out, ignore_errors=True)
        finally:
            server.close()
    finally:
        if ns is not None:
            ns.close()
    return dict(
        profile=profile,
        n=n,
        shard=shard,
        seed=seed,
        cfg=cfg,
        hosts=hosts,
        kinds=kinds,
        expected=expected,
        top_share=top_share,
        sides=sides,
        runs=runs,
        repeats=repeats,
        retry_threads=retry_threads,
    )


def bench(
    profiles: str | None = None,
    n: int | None = None,
    repeats: int = 3,
    seed: int = SEED,
    sweep: tuple[int, ...] = SWEEP,
) -> tuple[str, list[str]]:
    from . import internet_report

    results = [run_profile(p, n, repeats, seed, sweep) for p in internet_profiles.select(profiles)]
    return internet_report.report(results, tuning_seed=TUNE_SEED), internet_report.goals(results)


def tune(
    profiles: str | None = None,
    n: int | None = None,
    repeats: int = 3,
    seed: int = TUNE_SEED,
    per_host: tuple[int, ...] = TUNE_PER_HOST,
    in_flight: tuple[int, ...] = TUNE_IN_FLIGHT,
) -> tuple[str, list[str]]:
    """maxPerHost and maxInFlight swept, one at a time (the other at its default), on the tuning seed
    and the first profile named, else TUNE_PROFILE; every setting a side of the same interleaved rounds."""
    from . import internet_report

    profile = internet_profiles.select(profiles or TUNE_PROFILE)[0]
    sides = {
        **{f"project-maxPerHost-{v}": {"maxPerHost": v} for v in per_host},
        **{f"project-maxInFlight-{v}": {"maxInFlight": v} for v in in_flight},
    }
    result = run_profile(profile, n, repeats, seed, (), tuning=sides)
    return internet_report.tuning(result, reporting_seed=SEED)


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 400
    text, goals = bench("calm", n, repeats=1, sweep=(128,))
    print(text)
    print("\n".join(goals))


if __name__ == "__main__":
    os.environ.update(common.QUIET_ENV)
    main(sys.argv[1:])
