"""Metadata filter: the project's filter stage against pyspark (local mode), DuckDB and Polars.

Every engine reads the same generated LAION2B-en aesthetics 4.5+ parquet (same columns and types),
keeps the rows of the seeds' filter (WIDTH >= 512, HEIGHT >= 512, punsafe <= 0.98,
AESTHETIC_SCORE >= 4.5) and writes them, every column, as uncompressed parquet (the project's
shards are uncompressed scratch files; every engine is told to write the same). Each run is a fresh
process; its time is the job alone (after imports, and after SparkSession start-up, which is
reported apart), its memory the peak resident size of its process tree (the JVM included).
The outputs are checked to hold the same rows (count and checksums) before any number is printed.

    python -m bench.filter_bench worker ENGINE SRC OUT   # one run, prints a JSON line
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from . import common

FILTER = {"minWidth": 512, "minHeight": 512, "maxPunsafe": 0.98, "minAesthetic": 4.5}
SQL_WHERE = "WIDTH >= 512 AND HEIGHT >= 512 AND punsafe <= 0.98 AND AESTHETIC_SCORE >= 4.5"
# The columns the project saves besides url and caption, so that it writes whole rows like the others.
ADDITIONAL = ["WIDTH", "HEIGHT", "similarity", "hash", "punsafe", "pwatermark", "AESTHETIC_SCORE"]
ENGINES = {
    "project": "project filter stage (dedupeUrls: false, shuffle: false)",
    "project-default": "project filter stage, defaults (dedupe + shuffle)",
    "polars": "Polars (scan_parquet → filter → sink_parquet)",
    "duckdb": "DuckDB (COPY … TO parquet)",
    "pyspark": "pyspark, local[*] (the seeds' method)",
}
EXTERNAL = ["polars", "duckdb", "pyspark"]


# --- one run, in its own process ------------------------------------------------------------------


def _project(src: str, out: str, defaults: bool) -> dict:
    from laion_operator.pipeline.filter import run_filter
    from laion_operator.spec import PartSpec
    from laion_operator.storage import Store

    flt = dict(FILTER) if defaults else {**FILTER, "dedupeUrls": False, "shuffle": False}
    spec = PartSpec.from_dict(
        {
            "partId": "bench",
            "source": {"urls": [src]},
            "output": {"uri": out},
            "filter": flt,
            "download": {"saveAdditionalColumns": ADDITIONAL},
        }
    )
    start = time.perf_counter()
    result = run_filter(spec, Store(spec.output))
    return {
        "seconds": time.perf_counter() - start,
        "rows_read": result.rows_read,
        "rows_kept": result.rows_kept,
        "dropped_by": result.dropped_by,
    }


def _polars(src: str, out: str) -> dict:
    import polars as pl

    start = time.perf_counter()
    (
        pl.scan_parquet(src)
        .filter(
            (pl.col("WIDTH") >= 512)
            & (pl.col("HEIGHT") >= 512)
            & (pl.col("punsafe") <= 0.98)
            & (pl.col("AESTHETIC_SCORE") >= 4.5)
        )
        .sink_parquet(f"{out}/kept.parquet", compression="uncompressed")
    )
    return {"seconds": time.perf_counter() - start}


def _duckdb(src: str, out: str) -> dict:
    import duckdb

    con = duckdb.connect()
    start = time.perf_counter()
    con.execute(
        f"COPY (SELECT * FROM read_parquet('{src}') WHERE {SQL_WHERE}) "
        f"TO '{out}/kept.parquet' (FORMAT parquet, COMPRESSION uncompressed)"
    )
    return {"seconds": time.perf_counter() - start}


def _pyspark(src: str, out: str) -> dict:
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    start = time.perf_counter()
    spark = (
        SparkSession.builder.master("local[*]")
        .appName("laion-bench")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    started = time.perf_counter()
    df = spark.read.parquet(src)
    (
        df.filter(
            (F.col("WIDTH") >= 512)
            & (F.col("HEIGHT") >= 512)
            & (F.col("punsafe") <= 0.98)
            & (F.col("AESTHETIC_SCORE") >= 4.5)
        )
        .write.mode("overwrite")
        .option("compression", "none")
        .parquet(out)
    )
    done = time.perf_counter()
    spark.stop()
    return {"seconds": done - started, "startup": started - start}


def worker(engine: str, src: str, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    Path(out).mkdir(parents=True)
    if engine.startswith("project"):
        return _project(src, out, defaults=engine == "project-default")
    return {"polars": _polars, "duckdb": _duckdb, "pyspark": _pyspark}[engine](src, out)


# --- the driver ---------------------------------------------------------------------------------


def generate(rows: int) -> Path:
    """The metadata file, generated once per size and kept under bench/work/."""
    from laion_operator.testbed.demo_data import write_metadata

    common.WORK.mkdir(parents=True, exist_ok=True)
    path = common.WORK / f"2B-en-4.5_{rows}.parquet"
    if not path.exists():
        print(f"[filter] generating {rows:,} LAION2B-en aesthetics rows -> {path}", file=sys.stderr, flush=True)
        tmp = path.with_suffix(".tmp")
        write_metadata(tmp, rows, "http://127.0.0.1:9", variant="aesthetics", return_table=False)
        tmp.rename(path)
    return path


def output_checksum(engine: str, out: str) -> tuple[int, int, int]:
    """(rows, sum of the hash column, sum of URL lengths) of what a run wrote."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    folder = f"{out}/_laion/shards" if engine.startswith("project") else out
    url = "url" if engine.startswith("project") else "URL"
    rows = hashes = lengths = 0
    for batch in ds.dataset(folder, format="parquet").to_batches(columns=[url, "hash"]):
        rows += batch.num_rows
        hashes += int(
            np.asarray(batch.column("hash").to_numpy(zero_copy_only=False), dtype=np.int64)
            .view(np.uint64)
            .sum(dtype=np.uint64)
        )
        lengths += pc.sum(pc.binary_length(batch.column(url))).as_py() or 0
    return rows, hashes % 2**64, lengths


def run_engine(engine: str, src: Path) -> tuple[common.Run, dict]:
    out = str(common.WORK / "filter-out" / engine)
    r = common.run([common.PYTHON, "-m", "bench.filter_bench", "worker", engine, str(src), out], cwd=common.ROOT)
    return r, common.last_json(r.stdout)


def bench(rows: int, repeats: int, small_rows: int | None = None) -> tuple[str, list[str]]:
    """Run every engine `repeats` times, interleaved; return a markdown report and its goal lines."""
    src = generate(rows)
    best: dict[str, float] = {}
    peak: dict[str, int] = {}
    cpu: dict[str, float] = {}
    startup: dict[str, float] = {}
    info: dict[str, dict] = {}
    sums: dict[str, tuple] = {}
    for attempt in range(repeats):
        for engine in ENGINES:
            r, result = run_engine(engine, src)
            print(
                f"[filter] {engine:<16} run {attempt + 1}/{repeats}: {result['seconds']:6.2f} s, "
                f"CPU {r.cpu:6.1f} s, peak {common.mb(r.peak_rss)}, load {common.load()}",
                file=sys.stderr,
                flush=True,
            )
            best[engine] = min(best.get(engine, float("inf")), result["seconds"])
            peak[engine] = max(peak.get(engine, 0), r.peak_rss)
            cpu[engine] = min(cpu.get(engine, float("inf")), r.cpu)
            if "startup" in result:
                startup[engine] = min(startup.get(engine, float("inf")), result["startup"])
            if engine not in sums:
                sums[engine] = output_checksum(engine, str(common.WORK / "filter-out" / engine))
                info[engine] = result
    shutil.rmtree(common.WORK / "filter-out", ignore_errors=True)  # gigabytes; the inputs are kept
    kept = sums["pyspark"]
    for engine, s in sums.items():
        if engine != "project-default" and s != kept:
            raise SystemExit(f"[filter] {engine} wrote other rows than pyspark: {s} != {kept}")
    rows_kept = kept[0]
    # Memory bound: the same run on a file a quarter the size.
    small = None
    if small_rows:
        r, _ = run_engine("project", generate(small_rows))
        small = r.peak_rss
        shutil.rmtree(common.WORK / "filter-out", ignore_errors=True)
    fastest = min(EXTERNAL, key=lambda e: best[e])
    lines = []
    for engine, label in ENGINES.items():
        extra = f" (+{startup[engine]:.1f} s session start-up)" if engine in startup else ""
        lines.append(
            [
                label,
                f"{best[engine]:.2f} s{extra}",
                f"{rows / best[engine] / 1e6:,.2f} M",
                common.mb(peak[engine]),
                f"{cpu[engine]:.1f} s",
                f"{best['pyspark'] / best[engine]:.1f}×",
                f"{best[engine] / best[fastest]:.2f}×",
            ]
        )
    report = [
        f"Filter: {rows:,} generated LAION2B-en aesthetics 4.5+ rows ({src.stat().st_size / 2**30:.2f} GiB parquet), "
        f"{rows_kept:,} kept by the seeds' filter; every engine wrote the same rows, all columns (count and "
        f"checksums compared; the project with dedupe and shuffle off, its defaults also drop "
        f"{rows_kept - sums['project-default'][0]:,} duplicate URLs and shuffle). Best of {repeats} fresh-process "
        f"runs each; rows/s = rows read / job seconds; memory = peak resident size of the process tree; "
        f"process CPU = CPU seconds of the whole run (imports and start-up included; least of the runs).",
        "",
        common.table(
            [
                "engine",
                "job time",
                "rows/s",
                "peak memory",
                "process CPU",
                "speed vs pyspark",
                f"time vs fastest other ({fastest})",
            ],
            lines,
        ),
    ]
    if small is not None:
        report += [
            "",
            f"Project filter peak memory: {common.mb(small)} on {small_rows:,} rows, "
            f"{common.mb(peak['project'])} on {rows:,} rows ({rows // small_rows}× the rows, same shape).",
        ]
    p = best["project"]
    goals = [
        f"filter ≥ 5× pyspark: {best['pyspark'] / p:.1f}× — {common.goal(best['pyspark'] / p >= 5)}",
        f"filter within 1.2× of the fastest engine ({fastest}): {p / best[fastest]:.2f}× — "
        f"{common.goal(p / best[fastest] <= 1.2)}",
    ]
    if small is not None:
        goals.append(
            f"filter memory bounded independent of file size: {common.mb(small)} at {small_rows:,} rows, "
            f"{common.mb(peak['project'])} at {rows:,} — "
            f"{common.goal(peak['project'] <= 1.25 * small + 64 * 2**20)}"
        )
    return "\n".join(report), goals


def main(argv: list[str]) -> None:
    if argv[:1] == ["worker"]:
        print(json.dumps(worker(*argv[1:4])), flush=True)
        return
    rows = int(argv[0]) if argv else 200_000
    report, goals = bench(rows, repeats=1, small_rows=rows // 4)
    print(report)
    print("\n".join(goals))


if __name__ == "__main__":
    main(sys.argv[1:])
