"""`laion-operator`: run a part on a local Ray, plan it, run the demo, print the CRD, run the operator."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from . import spec as specs
from .contract import ExitCode, InputError
from .storage import Store


def keep_ray_on_loopback(address: str | None) -> None:
    """A local Ray (or one at a loopback address) needs no routable node address.

    Ray reads this switch when it is imported, so it is set before the pipeline module loads.
    """
    host = (address or "127.0.0.1").split("://")[-1].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def cmd_run(args) -> int:
    keep_ray_on_loopback(args.ray_address)
    part = specs.load(args.part)
    if args.output:
        part = specs.PartSpec.from_dict({**part.to_dict(), "output": {**part.to_dict()["output"], "uri": args.output}})
    if args.dry_run:
        return cmd_plan(part)
    Store(part.output).check_writable()
    from .pipeline.local import run_with_progress

    return run_with_progress(part, args.ray_address)


def cmd_plan(part: specs.PartSpec) -> int:
    from .pipeline.filter import plan

    result = plan(part)
    print(f"part {part.part_id}: {result.rows_read:,} rows read, {result.rows_kept:,} kept "
          f"in {result.shards} shards of up to {part.filter.samples_per_shard:,}")
    for reason, n in sorted(result.dropped_by.items(), key=lambda kv: -kv[1]):
        if n:
            print(f"  {n:>10,} dropped by {reason}")
    d = part.download
    # A resized JPEG of side s at quality q is roughly s*s*(q/100)*0.25 bytes; the estimate says so.
    per_image = d.image_size * d.image_size * (0.1 + 0.25 * d.encode_quality / 100)
    print(f"  output {part.output.uri} as {d.output_format}, about {result.rows_kept * per_image / 1e9:,.2f} GB "
          f"if every image downloads ({d.image_size}px {d.encode_format})")
    return ExitCode.OK


def cmd_crd(args) -> int:
    from .control import datasets, status

    crd = datasets.crd if getattr(args, "kind", None) == "LaionDataset" else status.crd
    yaml.safe_dump(crd(), sys.stdout, sort_keys=False)
    return 0


def cmd_demo(args) -> int:
    keep_ray_on_loopback(None)
    from .testbed.demo import run_demo

    return run_demo(Path(args.out), rows=args.rows)


def cmd_operator(args) -> int:
    from .control.controller import main as operator_main

    return operator_main(args)


def cmd_job(args) -> int:
    from .pipeline.job import main as job_main

    return job_main()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="laion-operator", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="filter, download and annotate one part on Ray")
    run.add_argument("part", help="part spec YAML (a bare spec or a LaionPart manifest)")
    run.add_argument("--dry-run", action="store_true", help="print the plan without downloading")
    run.add_argument("--output", help="override output.uri")
    run.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", help="generate a LAION-like part, serve its images on loopback, run it")
    demo.add_argument("--out", default="demo-output", help="folder for the metadata and the dataset")
    demo.add_argument("--rows", type=int, default=2000, help="metadata rows to generate")
    demo.set_defaults(func=cmd_demo)
    crd = sub.add_parser("crd", help="print the LaionPart (or LaionDataset) CustomResourceDefinition")
    crd.add_argument("--kind", choices=["LaionPart", "LaionDataset"], default="LaionPart")
    crd.set_defaults(func=cmd_crd)
    op = sub.add_parser("operator", help="run the Kubernetes operator")
    op.add_argument("--config", help="operator configuration YAML")
    op.add_argument("--namespace", action="append", help="watch only these namespaces (default: all)")
    op.add_argument("--standalone", action="store_true", help="no peering with other operator replicas")
    op.set_defaults(func=cmd_operator)
    job = sub.add_parser("job", help="(inside a Ray job) run the part given by LAION_PART_SPEC")
    job.set_defaults(func=cmd_job)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        print(f"laion-operator: {err}", file=sys.stderr)
        return ExitCode.BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
