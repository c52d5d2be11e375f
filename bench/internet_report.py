"""The internet benchmark's report: per profile the sides' medians and spreads, outcomes by reason,
the URLs whose outcome differs between the project and img2dataset's best side (each difference
explained), memory apart for Ray's daemons; and the goals, met or not, on the medians."""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from urllib.parse import urlsplit

from . import common, download_bench
from .internet_bench import SEEDS_THREADS, TIMEOUT, ZERO, median_run

# Why the two sides report a URL differently: (its kind, the project's outcome, img2dataset's).
WHY = {
    ("drip", "timeout", "decode"): "drip-fed body: img2dataset's timeout is per socket read and a byte comes every "
    "2 s, so it waits until the server gives up and gets a short body (a decode error); the project's whole-request "
    "deadline ends it at 10 s",
    ("drip", "timeout", "timeout"): "",
    ("big", "too_large", "ok"): "96 MiB body: the project refuses it by Content-Length (maxImageBytes, 32 MiB "
    "by default); img2dataset reads it whole into memory and keeps the image (the padding is past its end)",
    ("big", "timeout", "ok"): "96 MiB body at 16 MiB/s: img2dataset reads it whole; the project refuses it "
    "by size or its deadline ends it",
    ("busy", "ok", "rate_limited"): "the busy host's 429: the project waits its Retry-After within the URL's "
    "budget and gets the image; img2dataset, without retries, reports the 429",
    ("busy", "rate_limited", "ok"): "the busy host's 429 past this URL's budget for the project; img2dataset "
    "happened to ask when a token was free",
    ("heavy", "timeout", "ok"): "a LOSS FOR THE PROJECT: a slow-but-steady large image (1-8 MB at 100-500 KB/s) "
    "that takes longer than the 10 s deadline; img2dataset's per-read timeout keeps it, the project's "
    "whole-request deadline drops it",
    ("heavy", "ok", "timeout"): "a large image img2dataset lost to a read that waited 10 s (its threads "
    "busy with decoding)",
    ("silent", "connection", "timeout"): "silent host: after a few of its connections time out the project "
    "marks the host dead for the shard and fails its other URLs at once (connection) instead of waiting 10 s each",
    ("refused", "connection", "connection"): "",
    ("ok", "timeout", "ok"): "latency plus transfer past the 10 s deadline (or the decode queue): a "
    "whole-request deadline drops what a per-read timeout keeps",
    ("ok", "ok", "timeout"): "an image img2dataset timed out on (a read waiting 10 s while its threads shared the CPU)",
    ("ok", "connection", "ok"): "an image on a host the project had marked dead for the shard after "
    "refused or timed-out connections",
}


def explain(kind: str, project: str, other: str) -> str:
    text = WHY.get((kind, project, other))
    if text:
        return text
    if kind == "silent" and project == "connection":
        return WHY[("silent", "connection", "timeout")]
    if kind == "ok" and project == "ok":
        return f"an image img2dataset failed on ({other})"
    if kind == "ok" and other == "ok":
        return f"an image the project failed on ({project})"
    return "not explained by the test bed's design: look at the URLs (bench/work/internet)"


def summary(runs: list[dict]) -> dict:
    med = statistics.median
    # a run whose wall clock stepped has no stage, nor a side that has none apart from its command
    timed = [r for r in runs if r["stage"] is not None and r.get("stage_apart", True)]
    stages = [r["stage"] for r in timed] or [math.nan]
    stage_rates = [r["stage_rate"] for r in timed] or [math.nan]
    return dict(
        rate=med(r["rate"] for r in runs),
        lo=min(r["rate"] for r in runs),
        hi=max(r["rate"] for r in runs),
        stage_rate=med(stage_rates),
        stage_lo=min(stage_rates),
        stage_hi=max(stage_rates),
        stage_runs=len(timed),
        seconds=med(r["seconds"] for r in runs),
        stage=med(stages),
        ok=med(r["ok"] for r in runs),
        attempted=runs[0]["attempted"],
        cpu_per=med(r["run"].cpu / max(r["ok"], 1) for r in runs),
        peak=med(r["run"].peak_rss for r in runs),
        peaks={g: med(r["run"].peaks.get(g, 0) for r in runs) for g in {g for r in runs for g in r["run"].peaks}},
        held=max(r["held"] for r in runs),
        server_cpu=med(r["server_cpu"] for r in runs),
        load=max(float(r["load"]) for r in runs),
        median=median_run(runs),
        count=len(runs),
    )


def analyse(result: dict) -> dict:
    """Summaries per side, img2dataset's best, the ratios the goals read."""
    s = {side: summary(runs) for side, runs in result["runs"].items() if runs}
    sweep = [k for k in s if k.startswith("img2dataset-") and k != "img2dataset-retries1"]
    best = max(sweep, key=lambda k: s[k]["rate"]) if sweep else None
    daft = [k for k in s if k.startswith("daft-")]
    daft_best = max(daft, key=lambda k: s[k]["rate"]) if daft else None
    return dict(s=s, sweep=sweep, best=best, daft_best=daft_best)


def _label(side: str, result: dict, a: dict) -> str:
    cores = os.cpu_count()
    if side == "project":
        from laion_operator.spec import MAX_PER_HOST

        return f"project, defaults (maxPerHost {MAX_PER_HOST}), local Ray"
    if side == ZERO:
        return "project, zero latency (/calm/, the same images)"
    if side == "img2dataset-retries1":
        return f"img2dataset, {cores} × {result['retry_threads']} threads, --retries 1"
    if side.startswith("daft-"):
        mark = " (best)" if side == a.get("daft_best") else ""
        return f"Daft, native runner, max_connections {side.rsplit('-', 1)[1]}{mark}"
    if side.startswith("project-max"):
        knob, value = side.removeprefix("project-").rsplit("-", 1)
        return f"project, {knob} {value}"
    threads = int(side.rsplit("-", 1)[1])
    marks = [m for m, on in (("the seeds'", threads == SEEDS_THREADS), ("best", side == a["best"])) if on]
    return f"img2dataset, {cores} × {threads} threads" + (f" ({', '.join(marks)})" if marks else "")


def _spread(x: dict, stage: bool = False) -> str:
    if stage and not x["stage_runs"]:
        return "-"
    key = "stage_" if stage else ""
    rate, lo, hi = x[key + "rate"], x[key + "lo"], x[key + "hi"]
    text = f"{rate:,.1f} ({lo:,.1f}–{hi:,.1f})" if x["count"] > 1 else f"{rate:,.1f}"
    if stage and x["stage_runs"] < x["count"]:
        text += f" ({x['stage_runs']} of {x['count']} runs; the wall clock stepped in the rest)"
    return text


def side_table(result: dict, a: dict) -> str:
    s, best = a["s"], a["best"]
    ref = s[best] if best else None
    rows = []
    for side, x in s.items():
        apart = x["stage_runs"] > 0
        vs = f"{x['rate'] / ref['rate']:.2f}×" if ref else "-"
        if ref and apart:
            vs += f" / {x['stage_rate'] / ref['stage_rate']:.2f}×"
        rows.append(
            [
                _label(side, result, a),
                f"{x['seconds']:.1f} s",
                f"{x['stage']:.1f} s" if apart else "-",
                f"{x['ok']:,.0f} of {x['attempted']:,}",
                _spread(x),
                _spread(x, stage=True),
                vs,
                f"{x['cpu_per'] * 1000:.1f} ms",
                common.mb(x["peak"]),
                f"{x['held']:.1f} s",
                f"{x['server_cpu']:.1f} s",
                f"{x['load']:.2f}",
            ]
        )
    return common.table(
        [
            "side",
            "whole command",
            "download stage",
            "ok",
            "images/s, whole command (min–max)",
            "images/s, stage (min–max)",
            "vs img2dataset's best (whole / stage)",
            "CPU per image",
            "peak memory",
            "longest hold",
            "server CPU",
            "load (max)",
        ],
        rows,
    )


def reason_table(result: dict, a: dict) -> str:
    expected = Counter(result["expected"].values())
    medians = {side: x["median"]["reasons"] for side, x in a["s"].items() if side != ZERO}
    names = sorted({k for c in medians.values() for k in c} | set(expected), key=lambda k: (k != "ok", k))
    rows = [["expected (a client with deadlines, size caps, Retry-After)", *[f"{expected.get(k, 0):,}" for k in names]]]
    rows += [[side, *[f"{c.get(k, 0):,}" for k in names]] for side, c in medians.items()]
    return common.table(["side (its median run)", *names], rows)


def diff_table(result: dict, a: dict, other: str) -> tuple[str, int]:
    """URLs whose outcome differs between the project's median run and `other`'s, by kind and outcomes."""
    mine = a["s"]["project"]["median"]["outcomes"]
    theirs = a["s"][other]["median"]["outcomes"]
    kinds = result["kinds"]
    diff = Counter(
        (kinds[u], mine.get(u, "missing"), theirs.get(u, "missing"))
        for u in kinds
        if mine.get(u, "missing") != theirs.get(u, "missing")
    )
    rows = [
        [kind, p, q, f"{c:,}", explain(kind, p, q)]
        for (kind, p, q), c in sorted(diff.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    if not rows:
        return "No URL's outcome differs.", 0
    head = ["URL kind", "project", other, "URLs", "why"]
    return common.table(head, rows), sum(diff.values())


def memory_line(result: dict, a: dict) -> tuple[str, dict]:
    cores = os.cpu_count() or 2
    p, b = a["s"]["project"], a["s"][a["best"]]
    fixed = p["peaks"].get("ray daemons", 0) + p["peaks"].get("driver", 0)
    per_task = p["peaks"].get("tasks", 0) / cores
    per_process = b["peaks"].get("processes", 0) / cores
    m = dict(peak=p["peak"], ref=b["peak"], fixed=fixed, per_task=per_task, per_process=per_process)
    return (
        f"Memory (medians of the runs' peaks): the project {common.mb(p['peak'])} in all — Ray's daemons and the "
        f"driver {common.mb(fixed)} (fixed: the same whatever the shards), its {cores} shard tasks "
        f"{common.mb(p['peaks'].get('tasks', 0))}, {common.mb(per_task)} a task (the tasks' peak over the tasks "
        f"running at once: what each further task adds); img2dataset's best side {common.mb(b['peak'])}, its "
        f"{cores} download processes {common.mb(per_process)} each. Each group's peak is the peak of its own sum, "
        "so the groups need not add up to the whole.",
        m,
    )


def profile_section(result: dict) -> tuple[list[str], dict]:
    a = analyse(result)
    prof, cfg = result["profile"], result["cfg"]
    mix = ", ".join(f"{k} {v:,}" for k, v in Counter(result["kinds"].values()).most_common())
    head = (
        f"**{prof.name}** — {prof.about}. {result['n']:,} URLs (the download benchmark's images, "
        f"~{download_bench.IMAGE_SIZE}-px targets) over {cfg.hosts:,} hosts on 127.{cfg.net}.x.y, the busiest with "
        f"{result['top_share']:.1%} of the URLs; {result['shard']:,} URLs a shard; seed {result['seed']}; URL kinds: "
        f"{mix}. Each side {result['repeats']} times in turns."
    )
    lines = [head, "", side_table(result, a), ""]
    if a["best"]:
        mem, m = memory_line(result, a)
        a["memory"] = m
        lines += [mem, "", "Outcomes by reason:", "", reason_table(result, a), ""]
        table, count = diff_table(result, a, a["best"])
        lines += [
            f"URLs whose outcome differs between the project and {a['best']} (median runs; {count:,} of "
            f"{result['n']:,}):",
            "",
            table,
            "",
        ]
        dns = a["s"]["project"]["median"].get("dns")
        if dns:
            lines += [
                "DNS queries answered during the median runs: project "
                f"{dict(dns)}, {a['best']} {dict(a['s'][a['best']]['median'].get('dns', {}))} (the project "
                "caches answers per task; img2dataset asks the system resolver, which has no cache, for every URL)",
                "",
            ]
    return lines, a


def report(results: list[dict], tuning_seed: int) -> str:
    text = [
        f"The loopback internet as a matrix of profiles, reported on seed {results[0]['seed']} (the defaults were "
        f"tuned on seed {tuning_seed}, `--tune`). Resized to {download_bench.IMAGE_SIZE} keep_ratio into "
        f"webdataset, timeout {TIMEOUT} s, no retries unless said; processes = {os.cpu_count()} cores. Every side "
        "runs in turns with the others (A B C … A B C …); numbers are medians, with the spread (min–max) of the "
        "runs. images/s = successful images per second of the whole command (start to exit: Ray's start-up and "
        "the filter stage included for the project) and of the download stage (first shard start to last shard "
        "end); CPU = the command's process tree per successful image (the server not); longest hold = the longest "
        "time from a URL's request reaching the server to its last byte sent or the client hanging up, the worst "
        "of the runs (measured by the server, the same for every side); server CPU = the loopback internet's own "
        "during the side; load = the 1-minute load average as the side ended, the highest of the runs (above "
        f"{os.cpu_count()}, other work shared the cores).",
        "",
    ]
    for result in results:
        lines, result["analysis"] = profile_section(result)
        text += lines
    return "\n".join(text).rstrip()


def paired(result: dict, side: str, ref: str) -> float:
    """The median over rounds of side's rate / ref's rate in the same round: the two ran minutes apart,
    so a machine that slows or speeds up between rounds moves both (a ratio of medians can pair a fast
    round of one with a slow round of the other)."""
    runs = result["runs"]
    return statistics.median(a["rate"] / b["rate"] for a, b in zip(runs[side], runs[ref]))


def bound(result: dict, url: str) -> float:
    """How long the project may hold `url` (download.timeout's and minBodyRate's documented bound per
    attempt): a heavy body's size over minBodyRate beyond the timeout; every other kind's body is small
    or ends within the first window."""
    from laion_operator.spec import SCHEMA
    from tests.support import internet

    min_rate = SCHEMA["properties"]["download"]["properties"]["minBodyRate"]["default"]
    if internet.kind_of(result["cfg"], result["hosts"], url) != "heavy":
        return TIMEOUT
    parts = urlsplit(url)
    size, _ = internet.heavy_plan(result["cfg"], internet.address_of(parts.hostname), parts.path)
    return TIMEOUT + size / min_rate


def goals(results: list[dict]) -> list[str]:
    """The issue's goals, each over every profile: met only if met in all."""
    rows: dict[str, list[str]] = {"best": [], "daft": [], "strag": [], "zero": [], "held": [], "mem": []}
    ok = {k: True for k in rows}
    for result in results:
        a = result.get("analysis") or analyse(result)
        name, s = result["profile"].name, a["s"]
        if not a["best"]:
            continue
        proj, best = s["project"], s[a["best"]]
        ratio = proj["rate"] / best["rate"]
        rows["best"].append(
            f"{name} {ratio:.2f}× (stage {proj['stage_rate'] / best['stage_rate']:.2f}×, "
            f"paired by round {paired(result, 'project', a['best']):.2f}×)"
        )
        ok["best"] &= ratio >= 1.0
        if a.get("daft_best"):
            to_daft = proj["rate"] / s[a["daft_best"]]["rate"]
            rows["daft"].append(f"{name} {to_daft:.2f}× ({a['daft_best']})")
            ok["daft"] &= to_daft >= 1.0
        if result["profile"].stragglers:
            rows["strag"].append(f"{name} {ratio:.2f}×")
            ok["strag"] &= ratio >= 1.5
        zero = proj["rate"] / s[ZERO]["rate"]
        rows["zero"].append(f"{name} {zero:.0%} (paired by round {paired(result, 'project', ZERO):.0%})")
        ok["zero"] &= zero >= 0.85
        over = [
            (url, span, limit)
            for run in result["runs"]["project"]
            for url, span in run["held_worst"]
            if span > (limit := bound(result, url)) + 1
        ]
        rows["held"].append(
            f"{name} {proj['held']:.1f} s" + "".join(f"; {u} {t:.1f} s (bound {b:.1f} s)" for u, t, b in over[:3])
        )
        ok["held"] &= not over
        m = a.get("memory") or memory_line(result, a)[1]
        if m["peak"] <= m["ref"]:
            rows["mem"].append(f"{name} {common.mb(m['peak'])} vs {common.mb(m['ref'])}")
        else:
            apart = m["per_task"] < m["per_process"]
            ok["mem"] &= apart
            rows["mem"].append(
                f"{name} {common.mb(m['peak'])} vs {common.mb(m['ref'])}; Ray's fixed part {common.mb(m['fixed'])}, "
                f"{common.mb(m['per_task'])} a task vs {common.mb(m['per_process'])} an img2dataset process"
                + ("" if apart else " (over)")
            )
    text = {
        "best": "internet: the project ≥ img2dataset's best thread count in every profile (whole command, medians)",
        "daft": "internet: the project ≥ Daft's best max_connections in every profile (whole command, medians)",
        "strag": "internet: ≥ 1.5× img2dataset's best where stragglers or many hosts are in play (whole command)",
        "zero": "internet: ≥ 85 % of the project's own zero-latency rate in every profile (whole command)",
        "held": f"internet: no URL held past its bound + 1 s (timeout {TIMEOUT} s, and a body size / minBodyRate "
        "more for a body that keeps that rate; no retries), the worst held URLs of every run",
        "mem": "internet: peak memory ≤ img2dataset's best side's, or Ray's fixed part apart and a task below an "
        "img2dataset process",
    }
    return [f"{text[k]}: {'; '.join(rows[k])} — {common.goal(ok[k])}" for k in rows if rows[k]]


def tuning(result: dict, reporting_seed: int) -> tuple[str, list[str]]:
    """The sweeps on the tuning seed, a table a knob: medians against the zero-latency rate, and the
    least value within 5 % of the best median."""
    from laion_operator.spec import MAX_IN_FLIGHT, MAX_PER_HOST

    defaults = {"maxPerHost": MAX_PER_HOST, "maxInFlight": MAX_IN_FLIGHT}
    s = {side: summary(runs) for side, runs in result["runs"].items()}
    zero = s[ZERO]["rate"]
    parts = [
        f"Swept on the tuning seed {result['seed']} (reports use seed {reporting_seed}), one knob at a time with "
        f"the other at its default, profile {result['profile'].name}, {result['n']:,} URLs, {result['shard']:,} a "
        f"shard, busiest host {result['top_share']:.1%} of the URLs; every setting a side of the same rounds, "
        f"{result['repeats']} runs each in turns, medians (min–max); zero-latency rate {zero:,.1f} images/s (whole "
        "command). Both tables hold the defaults' point, run as two sides: their difference is the noise."
    ]
    goals = []
    for knob, default in defaults.items():
        swept = sorted((int(k.rsplit("-", 1)[1]), v) for k, v in s.items() if k.startswith(f"project-{knob}-"))
        if not swept:
            continue
        top = max(v["rate"] for _, v in swept)
        pick = min(h for h, v in swept if v["rate"] >= 0.95 * top)
        rows = [
            [
                f"{h}{' (default)' if h == default else ''}",
                _spread(v),
                _spread(v, stage=True),
                f"{v['rate'] / zero:.0%}",
                f"{v['held']:.1f} s",
            ]
            for h, v in swept
        ]
        parts += [
            "",
            common.table([knob, "images/s, whole command", "images/s, stage", "of zero latency", "longest hold"], rows),
            "",
            f"The least {knob} within 5 % of the best median: {pick} (the default is {default}).",
        ]
        goals.append(
            f"tuning (seed {result['seed']}): {knob} {pick} is the least within 5 % of the best median "
            f"(default {default}) — recorded, not a goal"
        )
    return "\n".join(parts), goals
