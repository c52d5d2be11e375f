"""`make bench`: the project's stages against what users run today, on the same data, in one run.

Prints the ratios and appends them, with the machine, the date and the command, to bench/RESULTS.md.
Installs what it compares against itself (bench/requirements.txt with the project's pins; Debian's
Java for pyspark). bench/README.md says what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import time

from . import common, internet_profiles

RESULTS = common.ROOT / "bench" / "RESULTS.md"
REQUIREMENTS = common.ROOT / "bench" / "requirements.txt"
VERSIONS = [
    "pyarrow",
    "polars",
    "duckdb",
    "pyspark",
    "img2dataset",
    "opencv-python-headless",
    "ray",
    "torch",
    "diffusers",
    "transformers",
    "mosaicml-streaming",
    "open-clip-torch",
    "clip-retrieval",
]
HEADER = """# Benchmark results

Appended by `make bench` (`python -m bench`), newest last; bench/README.md says what each number
means and how it is measured. Every ratio in an entry was measured in that one run, on one machine.
"""


def ensure_python_tools(no_deps: bool = False) -> None:
    """Install the engines compared against, pinned, unless they are there already. A line marked
    `# no-deps` is installed without its dependencies (its own pins conflict with the project's); with
    `no_deps`, only those lines are wanted."""
    wanted, plain, bare = {}, [], []
    for raw in REQUIREMENTS.read_text().splitlines():
        line, _, comment = raw.partition("#")
        line = line.strip()
        if "==" in line:
            name, version = line.split("==")
            if "no-deps" in comment:
                bare.append(line)
            elif no_deps:
                continue
            else:
                plain.append(line)
            wanted[name.strip()] = version.strip()
    missing = []
    for name, version in wanted.items():
        try:
            if importlib.metadata.version(name) != version:
                missing.append(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        print(f"bench: installing {', '.join(missing)} (bench/requirements.txt)", file=sys.stderr, flush=True)
        pip = [common.PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        lock = ["-c", str(common.ROOT / "requirements.lock")]
        if plain:
            subprocess.run([*pip, *plain, *lock], check=True)
        if bare:
            subprocess.run([*pip, "--no-deps", *bare, *lock], check=True)


def ensure_java() -> None:
    """pyspark needs a JVM: Debian's default-jre-headless."""
    if shutil.which("java"):
        return
    print("bench: installing Debian's default-jre-headless (for pyspark)", file=sys.stderr, flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "default-jre-headless"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=common.ROOT, capture_output=True, text=True
        ).stdout.strip()
        return rev + (" with local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--only",
        choices=[
            "filter",
            "download",
            "internet",
            "archives",
            "operator",
            "latents",
            "embeddings",
            "soak",
            "host-budget",
        ],
        help="run one benchmark only (soak, 200 parts through the operator, and host-budget, the cluster-wide "
        "host budget against the per-task scheme on many-hosts with 8 tasks, run only when asked)",
    )
    p.add_argument("--soak-parts", type=int, default=200, help="LaionParts in the soak (default 200)")
    p.add_argument("--filter-rows", type=int, default=20_000_000, help="metadata rows (default 20,000,000)")
    p.add_argument("--images", type=int, default=5000, help="images to download (default 5,000)")
    p.add_argument(
        "--internet-urls",
        type=int,
        help="URLs on the loopback internet, every profile (default: each profile's own, bench/README.md)",
    )
    p.add_argument(
        "--profiles",
        help="internet profiles, comma-separated (default: "
        + ",".join(p.name for p in internet_profiles.select(None))
        + f"; also {', '.join(n for n, p in internet_profiles.PROFILES.items() if not p.default)}, and "
        "`stragglers` for all four straggler profiles)",
    )
    p.add_argument(
        "--internet-sweep",
        default="64,512",
        help="img2dataset thread counts tried per internet profile, its best by median taken (default 64,512)",
    )
    p.add_argument("--seed", type=int, help="internet: the reporting seed (default 29; --tune: the tuning seed, 11)")
    p.add_argument(
        "--tune",
        action="store_true",
        help="internet: sweep download.maxPerHost and maxInFlight on the tuning seed instead of running the matrix",
    )
    p.add_argument(
        "--per-host-sweep",
        default="4,8,16,32",
        help="--tune: the download.maxPerHost values tried (default 4,8,16,32)",
    )
    p.add_argument(
        "--in-flight-sweep",
        default="64,128,256",
        help="--tune: the download.maxInFlight values tried (default 64,128,256)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per filter engine (best kept) and per internet side (in turns, median kept) (default 3)",
    )
    p.add_argument("--download-repeats", type=int, default=3, help="runs per download side (default 3)")
    p.add_argument("--archives-rounds", type=int, default=3, help="runs per archives side, in turns (default 3)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a try-out: 200k rows, 300 images, 300 internet URLs, 64 latents, 1 run",
    )
    p.add_argument("--latents-images", type=int, default=512, help="images the latents benchmark encodes (default 512)")
    p.add_argument("--latents-repeats", type=int, default=3, help="runs per latents side (default 3)")
    p.add_argument("--device", default="cpu", help="latents, embeddings: cpu or cuda[:N] (default cpu)")
    p.add_argument(
        "--latents-models",
        choices=["sd", "tiny"],
        help="latents: Stable Diffusion's VAE and CLIP-L shapes or tiny ones (default: sd on cuda, tiny on cpu)",
    )
    p.add_argument("--latents-resolutions", default="256,512", help="latents: resolutions (default 256,512)")
    p.add_argument("--latents-batch", type=int, default=32, help="latents: batch size (default 32)")
    p.add_argument(
        "--embeddings-images", type=int, default=640, help="images the embeddings benchmark embeds (default 640)"
    )
    p.add_argument(
        "--embeddings-rounds", type=int, default=3, help="embeddings: rounds, the sides in turns (default 3)"
    )
    p.add_argument(
        "--embeddings-batch", type=int, help="embeddings: batch size of both sides (default 256 on cuda, 32 on cpu)"
    )
    p.add_argument(
        "--embeddings-dedup",
        type=int,
        default=1_000_000,
        help="embeddings: vectors semantic dedup's cost is measured on (default 1,000,000; 0: skip)",
    )
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.filter_rows, args.images, args.repeats, args.download_repeats = 200_000, 300, 1, 1
        args.archives_rounds = 1
        args.internet_urls, args.internet_sweep, args.per_host_sweep, args.in_flight_sweep = 300, "128", "8,16", "128"
        args.latents_images, args.latents_repeats = 64, 1
        args.embeddings_images, args.embeddings_rounds, args.embeddings_dedup = 64, 1, 20_000
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    command = "python -m bench" + (" " + shlex.join(argv) if argv else "")
    if os.environ.get("MAKELEVEL"):
        command = f"make bench ({command})"
    os.environ.update(common.QUIET_ENV)
    # latents compares against plain torch, internet against img2dataset, archives against micro_diffusion's
    # scripts written out in the bench (torchvision, streaming): all project dependencies; soak nothing
    if args.only not in ("latents", "soak", "internet", "archives", "host-budget"):
        ensure_python_tools(no_deps=args.only == "embeddings")
    if args.only in (None, "filter"):
        ensure_java()

    from . import download_bench, filter_bench

    started, load_before, revision = time.time(), common.load(), git_revision()  # what ran, not what is there after
    sections, goals = [], []
    if args.only in (None, "filter"):
        report, g = filter_bench.bench(args.filter_rows, args.repeats, small_rows=args.filter_rows // 4)
        sections.append(("Metadata filter", report))
        goals += g
    if args.only in (None, "download"):
        report, g = download_bench.bench(args.images, args.download_repeats)
        sections.append(("Download", report))
        goals += g
    if args.only in (None, "internet"):
        from . import internet_bench

        if args.tune:
            report, g = internet_bench.tune(
                args.profiles,
                args.internet_urls,
                args.repeats,
                internet_bench.TUNE_SEED if args.seed is None else args.seed,
                tuple(int(h) for h in args.per_host_sweep.split(",") if h),
                tuple(int(v) for v in args.in_flight_sweep.split(",") if v),
            )
            sections.append(("Tuning on the loopback internet", report))
        else:
            report, g = internet_bench.bench(
                args.profiles,
                args.internet_urls,
                args.repeats,
                internet_bench.SEED if args.seed is None else args.seed,
                tuple(int(t) for t in args.internet_sweep.split(",") if t),
            )
            sections.append(("Download on the internet on loopback", report))
        goals += g
    if args.only in (None, "archives"):
        from . import archives_bench

        report, g = archives_bench.bench(args.archives_rounds)
        sections.append(("Archives against micro_diffusion's download, extract, convert", report))
        goals += g
    if args.only in (None, "operator"):
        from . import operator_bench

        rows = operator_bench.run()
        sections.append(("Operator overhead", "\n".join(operator_bench.report(rows))))
        many = rows[-1]
        goals.append(
            f"operator overhead: {many['parts']} parts applied at once all submitted in "
            f"{many['submit_all_s']:.2f} s ({many['submit_all_s'] / many['baseline_s']:.1f}× the API round "
            f"trip of as many objects); status lag median {many['lag_median_s']:.2f} s with pollSeconds 1; operator "
            f"resident memory {rows[0]['rss_mb']:.0f} MB idle, {many['rss_mb']:.0f} MB with {many['parts']} parts"
        )

    if args.only in (None, "latents"):
        from . import latents_bench

        report, g = latents_bench.bench(
            args.latents_images,
            args.latents_repeats,
            device=args.device,
            model_size=args.latents_models,
            resolutions=tuple(int(r) for r in args.latents_resolutions.split(",")),
            batch=args.latents_batch,
        )
        sections.append(("Latents", report))
        goals += g

    if args.only in (None, "embeddings"):
        from . import embeddings_bench

        report, g = embeddings_bench.bench(
            args.embeddings_images,
            args.embeddings_rounds,
            device=args.device,
            batch=args.embeddings_batch,
            dedup_n=args.embeddings_dedup,
        )
        sections.append(("Embeddings against clip-retrieval's clip_inference", report))
        goals += g

    if args.only == "host-budget":
        from . import host_budget_bench

        report, g = host_budget_bench.bench(args.internet_urls, args.repeats)
        sections.append(("Cluster-wide host budget against the per-task scheme", report))
        goals += g

    if args.only == "soak":
        from . import soak_bench

        result = soak_bench.run(args.soak_parts)
        sections.append(("Operator soak", soak_bench.report(result)))
        goals += soak_bench.goals(result)

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = [
        f"## {when}",
        "",
        f"- command: `{command}` ({(time.time() - started) / 60:.0f} min)",
        f"- machine: {common.machine()}",
        f"- load average (1/5/15 min) before the run: {load_before} (other work on the same cores slows every side; "
        "the benchmark itself adds about 2 while it runs)",
        f"- code: laion-operator {revision}",
        f"- versions: {common.versions(VERSIONS)}, {common.java_version()}",
        "",
        "### Goals",
        "",
        *[f"- {g}" for g in goals],
    ]
    for title, report in sections:
        entry += ["", f"### {title}", "", report]
    text = "\n".join(entry) + "\n"
    print("\n" + text)
    if not args.no_record:
        if not RESULTS.exists():
            RESULTS.write_text(HEADER)
        with RESULTS.open("a") as f:
            f.write("\n" + text)
        print(f"bench: appended to {RESULTS.relative_to(common.ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
