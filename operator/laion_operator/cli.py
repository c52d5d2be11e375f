"""`laion-operator`: run a part on a local Ray, plan it, convert or verify a dataset, precompute its
latents, run the demo, print the CRD, run the operator."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from . import contract
from . import spec as specs
from .contract import ExitCode
from .errors import InputError
from .storage import StorageUnavailable, Store


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


def _output(args) -> dict:
    return {
        k: v
        for k, v in {
            "uri": args.output,
            "endpoint": args.endpoint,
            "region": args.region,
            "pathStyle": args.path_style or None,
            "profile": args.profile,
        }.items()
        if v is not None
    }


def cmd_heal(args) -> int:
    keep_ray_on_loopback(None)  # the shards to heal run as Ray tasks, on a local Ray
    from .contract import FAILURE_REASONS, TRANSIENT_REASONS
    from .pipeline.driver import heal_part
    from .pipeline.local import print_summary
    from .summary import Summary

    part = specs.load(args.part)
    reasons = [r.strip() for r in args.reasons.split(",") if r.strip()] if args.reasons else None
    unknown = sorted(set(reasons or []) - set(FAILURE_REASONS))
    if unknown:
        raise InputError(f"--reasons: {', '.join(unknown)} not among the failure reasons {', '.join(FAILURE_REASONS)}")
    shown = reasons or (list(part.heal.reasons) if part.heal else TRANSIENT_REASONS)
    print(f"part {part.part_id}: healing samples that failed for {', '.join(shown)} in {part.output.uri}", flush=True)
    healed = heal_part(part, reasons, force=True)
    summary = Summary.from_json(healed) if healed else None
    if summary is None or summary.heal is None:  # forced: a heal done before is done again
        raise RuntimeError(f"heal of {part.output.uri} ended without healing")
    print(f"  {summary.heal.refetched:,} samples fetched again in {summary.heal.shards} shards")
    print_summary(summary)
    return ExitCode.OK


def cmd_latents(args) -> int:
    keep_ray_on_loopback(args.ray_address)
    source = None
    if args.mds:
        from .pipeline.formats.mds import MDSFolder

        # Over an MDS folder the YAML needs only latents and output: the folder is the source.
        data = specs.load_data(args.part)
        if not isinstance(data, dict):
            raise specs.SpecError(f"{args.part}: expected a mapping with output and latents")
        data.setdefault("partId", "latents")
        data.setdefault("source", {"dataset": {"uri": args.mds}})
        try:
            part = specs.PartSpec.from_dict(data)
        except specs.SpecError as err:
            raise specs.SpecError(f"{args.part}: {err}") from None
        source = MDSFolder(args.mds, image_column=args.image_column, caption_column=args.caption_column)
    else:
        part = specs.load(args.part)
    if args.output:
        part = specs.PartSpec.from_dict({**part.to_dict(), "output": {**part.to_dict()["output"], "uri": args.output}})
    from .pipeline.local import encode_with_progress

    return encode_with_progress(part, args.ray_address, source=source)


def cmd_embed(args) -> int:
    keep_ray_on_loopback(args.ray_address)
    part = specs.load(args.part)
    if args.output:
        part = specs.PartSpec.from_dict({**part.to_dict(), "output": {**part.to_dict()["output"], "uri": args.output}})
    from .pipeline.local import embed_with_progress

    return embed_with_progress(part, args.ray_address)


def cmd_index(args) -> int:
    from .pipeline.index import build

    store = Store(specs.output_of({"uri": args.output}))
    model = args.model or (store.read_json(contract.EMBEDDINGS_INDEX, "index.json") or {}).get("model")
    if not model:
        found = store.read_json(contract.PROGRESS) or {}
        summary = store.read_json(contract.summary(found.get("part_id", ""))) or {}
        model = summary.get("embeddings", {}).get("model")
    if not model:
        raise InputError(f"--model: {args.output} names no embeddings model (no summary with an embeddings section)")
    info = build(store, model, args.memory)
    print(f"indexed {info['count']:,} samples of {args.output} ({', '.join(info['indexes'])}) in {args.memory}")
    return ExitCode.OK


def cmd_search(args) -> int:
    from .pipeline.index import search

    image = None
    if args.image:
        try:
            image = Path(args.image).read_bytes()
        except OSError as err:
            raise InputError(f"--image {args.image}: {err.strerror}") from None
    store = Store(specs.output_of({"uri": args.output}))
    for hit in search(store, text=args.text, image=image, k=args.k, against=args.against):
        print(f"{hit.similarity:.4f}\t{hit.key}\t{hit.url or ''}\t{hit.caption or ''}")
    return ExitCode.OK


def cmd_dedup(args) -> int:
    from .pipeline.dedup import dedup_parts

    given = {"hammingDistance": args.hamming_distance, "similarity": args.similarity}
    dedup = {k: v for k, v in given.items() if v is not None}
    section = {"model": "-", "dedup": dedup}  # the dedup section as the spec validates and defaults it
    spec = specs.PartSpec.from_dict(
        {"partId": "d", "source": {"urls": ["-"]}, "output": {"uri": args.into}, "embeddings": section}
    )
    assert spec.embeddings is not None and spec.embeddings.dedup is not None
    stores = [Store(specs.output_of({"uri": uri})) for uri in args.outputs]
    counts = dedup_parts(stores, spec.embeddings.dedup, Store(spec.output))
    print(f"{', '.join(f'{n:,} {kind}' for kind, n in counts.items())} -> {args.into}/{contract.EMBEDDINGS_DUPLICATES}")
    return ExitCode.OK


def _selection(args) -> dict:
    """convert's --drop-duplicates, --min-score and --max-score as spec.filter's fields."""
    scores: dict[str, dict[str, float]] = {}
    for bound, given in (("min", args.min_score), ("max", args.max_score)):
        for item in given or ():
            column, sep, value = item.partition("=")
            try:
                scores.setdefault(column, {})[bound] = float(value)
            except ValueError:
                raise InputError(f"--{bound}-score {item!r}: expected COLUMN=NUMBER") from None
            if not sep or not column:
                raise InputError(f"--{bound}-score {item!r}: expected COLUMN=NUMBER")
    return {**({"dropDuplicates": True} if args.drop_duplicates else {}), **({"scores": scores} if scores else {})}


def cmd_convert(args) -> int:
    """An existing dataset written again in another format: a part whose source is that dataset."""
    keep_ray_on_loopback(args.ray_address)
    dataset = {
        k: v
        for k, v in {
            "uri": args.input,
            "format": args.input_format,
            "captions": args.captions,
            "imageField": args.image_field,
            "captionField": args.caption_field,
        }.items()
        if v is not None
    }
    # Unless a size is asked for, images keep their bytes: a conversion changes the format only.
    download = {"outputFormat": args.output_format, "resizeMode": "no", "skipReencode": True}
    if args.image_size:
        download.update(imageSize=args.image_size, resizeMode=args.resize_mode, skipReencode=False)
    if args.mds_shard_size_limit:
        download["mdsShardSizeLimit"] = args.mds_shard_size_limit
    part = specs.PartSpec.from_dict(
        {
            "partId": args.part_id,
            "source": {"dataset": dataset},
            "output": _output(args),
            "download": download,
            "filter": {"samplesPerShard": args.samples_per_shard, **_selection(args)},
            "verify": not args.no_verify,
        }
    )
    Store(part.output).check_writable()
    from .pipeline.local import run_with_progress

    return run_with_progress(part, args.ray_address)


def cmd_verify(args) -> int:
    """Read a finished output back; exit 1 when a shard disagrees with what the part says it wrote."""
    store = Store(specs.output_of(_output(args)))
    from .pipeline.verify import verify_output

    summary, result = verify_output(store)
    fmt = summary.written.output_format if summary.written else "-"
    print(f"part {summary.part_id} -> {store.uri} ({fmt}): {'verified' if result.ok else 'NOT verified'}")
    print(
        f"  {result.samples:,} samples in {result.shards} shards read back, {result.images_decoded:,} images "
        f"decoded in {result.seconds:.1f} s"
    )
    for problem in result.problems:
        print(f"  {problem}")
    return ExitCode.OK if result.ok else ExitCode.SHARDS_FAILED


def cmd_plan(part: specs.PartSpec) -> int:
    from .pipeline import sources

    source = sources.of(part)
    if isinstance(source, sources.SampleSource):
        Store(part.output)  # registers the S3 options the input is read with
        line = source.plan_line(part, source.list_inputs(part))
        print(f"part {part.part_id}: {line} -> {part.output.uri} as {part.download.output_format}")
        return ExitCode.OK
    from .pipeline.filter import plan
    from .storage import configure

    configure(part.output)  # s3:// metadata and removal lists are read with the output's endpoint options
    result = plan(part)
    print(
        f"part {part.part_id}: {result.rows_read:,} rows read, {result.rows_kept:,} kept "
        f"in {result.shards} shards of up to {part.filter.samples_per_shard:,}"
    )
    for reason, n in sorted(result.dropped_by.items(), key=lambda kv: -kv[1]):
        if n:
            print(f"  {n:>10,} dropped by {reason}")
    d = part.download
    # A resized JPEG of side s at quality q is roughly s*s*(q/100)*0.25 bytes; the estimate says so.
    per_image = d.image_size * d.image_size * (0.1 + 0.25 * d.encode_quality / 100)
    print(
        f"  output {part.output.uri} as {d.output_format}, about {result.rows_kept * per_image / 1e9:,.2f} GB "
        f"if every image downloads ({d.image_size}px {d.encode_format})"
    )
    return ExitCode.OK


def cmd_crd(args) -> int:
    from .control import crds

    crd = crds.dataset_crd if getattr(args, "kind", None) == "LaionDataset" else crds.part_crd
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


def ray_address_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="laion-operator", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="filter, download and annotate one part on Ray")
    run.add_argument("part", help="part spec YAML (a bare spec or a LaionPart manifest)")
    run.add_argument("--dry-run", action="store_true", help="print the plan without downloading")
    run.add_argument("--output", help="override output.uri")
    ray_address_option(run)
    run.set_defaults(func=cmd_run)
    conv = sub.add_parser(
        "convert",
        help="write an existing dataset (webdataset tars, a files folder, images "
        "and a captions JSONL) in another output format, on Ray",
    )
    conv.add_argument("input", help="the dataset's folder: a local path or s3://bucket/prefix")
    conv.add_argument("output", help="the new dataset's folder: a local path or s3://bucket/prefix")
    conv.add_argument("--output-format", required=True, choices=specs.OUTPUT_FORMATS)
    conv.add_argument("--input-format", choices=specs.DATASET_FORMATS, help="default: detected")
    conv.add_argument("--captions", help="images: the captions JSONL (relative to INPUT unless absolute)")
    conv.add_argument("--image-field", help="images: the JSONL field naming the image (default img_path)")
    conv.add_argument("--caption-field", help="images: the JSONL field holding the caption (default prompt)")
    conv.add_argument("--part-id", default="0", help="names the annotation files (part_<id>_stats.csv)")
    conv.add_argument("--samples-per-shard", type=int, default=10000, help="images: JSONL lines per shard")
    conv.add_argument("--image-size", type=int, help="resize to this side (default: keep the images' bytes)")
    conv.add_argument("--resize-mode", default="keep_ratio", choices=specs.RESIZE_MODES)
    conv.add_argument("--mds-shard-size-limit", type=int, help="mds: bytes per MDS shard file")
    conv.add_argument("--no-verify", action="store_true", help="do not read the shards back afterwards")
    conv.add_argument(
        "--drop-duplicates",
        action="store_true",
        help="leave out what INPUT's embeddings/duplicates.parquet marks as not kept (spec.filter.dropDuplicates)",
    )
    for bound in ("min", "max"):
        conv.add_argument(
            f"--{bound}-score",
            action="append",
            metavar="COLUMN=VALUE",
            help=f"keep samples whose INPUT embeddings metadata COLUMN is at {'least' if bound == 'min' else 'most'} "
            "VALUE (clip_score, a head's column; spec.filter.scores; repeatable)",
        )
    ray_address_option(conv)
    ver = sub.add_parser(
        "verify",
        help="read every shard of a finished output back, decode every image, "
        "compare the counts with the annotations and the summary",
    )
    ver.add_argument("output", help="the part's output folder: a local path or s3://bucket/prefix")
    for p_ in (conv, ver):
        p_.add_argument("--endpoint", help="S3 endpoint URL (MinIO and the like)")
        p_.add_argument("--region", help="S3 region")
        p_.add_argument("--path-style", action="store_true", help="path-style S3 addressing (MinIO)")
        p_.add_argument("--profile", help="named AWS profile holding the credentials")
    conv.set_defaults(func=cmd_convert)
    ver.set_defaults(func=cmd_verify)
    latents = sub.add_parser(
        "latents",
        help="precompute image latents and text embeddings (spec.latents) of an output already downloaded or converted",
    )
    latents.add_argument("part", help="part spec YAML with spec.latents (with --mds: latents and output only)")
    latents.add_argument("--output", help="override output.uri")
    latents.add_argument(
        "--mds",
        metavar="FOLDER",
        help="read an MDS folder anyone wrote (index.json and its shard "
        "files, local or s3://) instead of the part's output",
    )
    latents.add_argument("--image-column", default="jpg", help="--mds: the column holding encoded images (default jpg)")
    latents.add_argument("--caption-column", default="caption", help="--mds: the caption column (default caption)")
    ray_address_option(latents)
    latents.set_defaults(func=cmd_latents)
    embed = sub.add_parser(
        "embed",
        help="CLIP image and caption embeddings (spec.embeddings) of an output already downloaded or converted, "
        "in clip-retrieval's layout",
    )
    embed.add_argument("part", help="part spec YAML with spec.embeddings")
    embed.add_argument("--output", help="override output.uri")
    ray_address_option(embed)
    embed.set_defaults(func=cmd_embed)
    dedup = sub.add_parser(
        "dedup", help="duplicates across embedded outputs (a dataset's parts), in order of precedence"
    )
    dedup.add_argument("outputs", nargs="+", help="embedded outputs; a group keeps the first output's sample")
    dedup.add_argument("--into", required=True, help="where embeddings/duplicates.parquet is written")
    dedup.add_argument("--hamming-distance", type=int, help="perceptual: DCT hashes this many bits apart (default 6)")
    dedup.add_argument("--similarity", type=float, help="semantic: the cosine of duplicates (default 0.95)")
    dedup.set_defaults(func=cmd_dedup)
    index = sub.add_parser("index", help="FAISS indexes (autofaiss) of an output's embeddings, within a memory budget")
    index.add_argument("output", help="the part's output folder: a local path or s3://bucket/prefix")
    index.add_argument("--memory", default="4G", help="the index's memory budget (autofaiss's, e.g. 512M, 4G)")
    index.add_argument("--model", help="the model the embeddings came from (default: the part's summary's)")
    index.set_defaults(func=cmd_index)
    search = sub.add_parser("search", help="the samples of an indexed output nearest a caption or an image")
    search.add_argument("output", help="the part's output folder, indexed")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a caption to search for")
    query.add_argument("--image", help="an image file to search for")
    search.add_argument("-k", type=int, default=10, help="results (default 10)")
    search.add_argument(
        "--against", choices=["image", "text"], default="image", help="the images' or the captions' index"
    )
    search.set_defaults(func=cmd_search)
    heal = sub.add_parser(
        "heal",
        help="fetch again the samples of a finished part that failed for transient reasons, rewriting their shards",
    )
    heal.add_argument("part", help="part spec YAML (a bare spec or a LaionPart manifest)")
    heal.add_argument(
        "--reasons",
        help="comma-separated failure reasons (default: spec.heal.reasons, or "
        "timeout, dns, connection, http_5xx, rate_limited)",
    )
    heal.set_defaults(func=cmd_heal)
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
    op.add_argument(
        "--priority",
        type=int,
        help="this replica's peering priority: the highest works, the others stand by (default: random)",
    )
    op.set_defaults(func=cmd_operator)
    job = sub.add_parser("job", help="(inside a Ray job) run the part given by LAION_PART_SPEC")
    job.set_defaults(func=cmd_job)
    return p


# The commands that run the pipeline in this process (the operator's must never load it).
PIPELINE_COMMANDS = {"run", "convert", "verify", "latents", "embed", "dedup", "index", "search", "heal", "demo"}


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    if own_process and args.command in PIPELINE_COMMANDS:
        # The process is the part's alone: the pipeline loads without img2dataset's CLI and torch,
        # 3 s of a part's start on its critical path (pipeline.load_light).
        from .pipeline import load_light

        load_light()
    try:
        return args.func(args)
    except InputError as err:
        print(f"laion-operator: {err}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except StorageUnavailable as err:
        print(f"laion-operator: StorageUnavailable: {err}", file=sys.stderr)
        return ExitCode.STORAGE_UNAVAILABLE


def script() -> int:
    """The `laion-operator` command."""
    return main(own_process=True)


if __name__ == "__main__":
    sys.exit(script())
