"""How download.maxInFlight and maxPerHost were chosen: one shard task's fetch engine (one decode
thread, as a Ray task of 1 CPU has) against fake-web hosts with latency, beside its zero-latency rate.

Not part of `make bench` (no goal, nothing recorded): a short sweep to pick defaults, rerun when the
engine changes. bench/README.md has the numbers it gave.

    .venv/bin/python -m bench.fetch_defaults [--images 1500] [--hosts 128] [--repeats 2]

Hosts are distinct loopback addresses (127.0.0.1 … 127.0.0.N), served by one separate process with
keep-alive; the top host has 5 % of the URLs, the rest share by 1/sqrt(rank). Latency to the first
byte is log-normal, median 0.3 s, capped at 3 s (about the p99). Each image is a 640x480 JPEG,
resized to 256 (border) and hashed (sha256) on the decode thread.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import time

import numpy as np

from . import common

SERVE = """
import sys, time
from laion_operator.testbed.fakeweb import ImageServer
servers = [ImageServer(host=f"127.0.0.{i + 1}", keep_alive=True).start() for i in range(int(sys.argv[1]))]
servers[0].warm([servers[0].base_url + f"/img/m{j}_640x480.jpg" for j in range(200)])
for s in servers[1:]:
    s.cache = servers[0].cache
print(" ".join(s.base_url for s in servers), flush=True)
time.sleep(1e6)
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--hosts", type=int, default=128)
    p.add_argument("--top-host", type=float, default=0.05)
    p.add_argument("--in-flight", default="32,64,128,256")
    p.add_argument("--per-host", default="4,6,8")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    sys.path.insert(0, str(common.ROOT / "operator"))
    from laion_operator.pipeline import fetch
    from laion_operator.pipeline.record import make_resizer
    from laion_operator.spec import PartSpec

    server = subprocess.Popen(
        [common.PYTHON, "-c", SERVE, str(args.hosts)],
        stdout=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(common.ROOT / "operator")},
    )
    bases = server.stdout.readline().split()
    rng = np.random.default_rng(1)
    n = args.images
    rest = 1 / np.sqrt(np.arange(1, args.hosts))
    weights = np.concatenate([[args.top_host], (1 - args.top_host) * rest / rest.sum()])
    host = rng.choice(args.hosts, n, p=weights)
    latency = np.minimum(np.exp(rng.normal(np.log(0.3), 1.0, n)), 3.0)
    image = rng.integers(0, 200, n)

    def urls(with_latency: bool) -> list[str]:
        return [
            f"{bases[h]}/slow/{s:.3f}/m{i}_640x480.jpg" if with_latency else f"{bases[h]}/img/m{i}_640x480.jpg"
            for h, s, i in zip(host, latency, image)
        ]

    def run(batch: list[str], **download) -> str:
        opts = PartSpec.from_dict(
            {
                "partId": "b",
                "source": {"urls": ["m"]},
                "output": {"uri": "o"},
                "download": {"allowedNetworks": ["127.0.0.0/8"], **download},
            }
        ).download
        resizer = make_resizer(opts)
        spans = []

        def handle(index, data, error):
            t0 = time.monotonic()
            if data is not None:
                resizer(io.BytesIO(data))
                hashlib.sha256(data).hexdigest()
            spans.append((t0, time.monotonic()))

        start, cpu = time.monotonic(), time.process_time()
        fetch.run(batch, opts, handle, 1)
        wall = time.monotonic() - start
        idle = spans[0][0] - start + sum(max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:]))
        return (
            f"{len(batch) / wall:6.1f} images/s, {(time.process_time() - cpu) / len(batch) * 1e3:.2f} ms CPU "
            f"an image, decode thread waiting for bodies {100 * idle / wall:.0f} % of the time"
        )

    try:
        run(urls(False)[:200])  # warm-up
        for _ in range(args.repeats):
            print("zero latency, maxInFlight 32:       ", run(urls(False), maxInFlight=32, maxPerHost=32), flush=True)
            for m in [int(x) for x in args.in_flight.split(",") if x]:
                print(
                    f"maxInFlight {m:4d}, maxPerHost 6:     ", run(urls(True), maxInFlight=m, maxPerHost=6), flush=True
                )
            for h in [int(x) for x in args.per_host.split(",") if x]:
                print(
                    f"maxInFlight  128, maxPerHost {h:2d}:    ",
                    run(urls(True), maxInFlight=128, maxPerHost=h),
                    flush=True,
                )
    finally:
        server.kill()


if __name__ == "__main__":
    main()
