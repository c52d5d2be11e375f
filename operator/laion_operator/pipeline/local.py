"""A part on this machine (or a Ray cluster it can reach), with a live progress line and a summary:
what `laion-operator run` and the demo show a person at a terminal."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable

from ..contract import ExitCode, Phase, Progress
from ..spec import PartSpec
from ..summary import Summary
from . import sources

# The model stages' phases, and the Progress field that holds each one's counts.
MODEL_STAGES = {Phase.ENCODING: "latents", Phase.EMBEDDING: "embeddings"}


class ProgressBar:
    """One line that says how far along the part is: shards, images/s, success rate."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.start = time.time()
        self.tty = stream.isatty()
        self._last_line = ""

    def __call__(self, p: Progress) -> None:
        elapsed = max(time.time() - self.start, 1e-6)
        if p.phase == Phase.FILTERING:
            if not p.rows_read:  # nothing read yet: a line of zeros says nothing
                return
            line = f"[filter] {p.rows_read:,} rows read, {p.rows_kept:,} kept"
        elif p.phase in MODEL_STAGES:
            stage = MODEL_STAGES[p.phase]
            counts = getattr(p, stage)
            if not counts:  # the stage has not counted its shards yet
                return
            shards = counts["shards"]
            failed = f" ({shards['failed']} failed)" if shards["failed"] else ""
            line = (
                f"[{stage}] shards {shards['done']}/{shards['total']}{failed} | "
                f"{counts['written']:,} samples, {counts['perSecond']:,.1f}/s"
            )
        else:
            attempted = p.images_ok + p.images_failed
            line = (
                f"[{p.phase.value.lower()}] shards {p.shards_done}/{p.shards_total}"
                f"{f' ({p.shards_failed} failed)' if p.shards_failed else ''} | "
                f"{attempted:,} images, {attempted / elapsed:,.1f}/s | success {p.success_rate:.1f}%"
            )
        if line == self._last_line:
            return
        self._last_line = line
        self.stream.write(("\r\033[K" if self.tty else "") + line + ("" if self.tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def print_summary(summary: Summary, out=sys.stdout) -> None:
    written, verified, lat = summary.written, summary.verified, summary.latents
    if written is not None:
        out.write(f"\npart {summary.part_id} -> {summary.output} ({written.output_format})\n")
        out.write(f"  metadata  {written.rows_read:,} rows read, {written.rows_kept:,} kept\n")
        for reason, n in sorted(written.dropped_by.items(), key=lambda kv: -kv[1]):
            if n:
                out.write(f"            {n:>10,} dropped by {reason}\n")
        out.write(f"  shards    {written.shards_done}/{written.shards_total} done\n")
        out.write(f"  images    {written.ok:,} of {written.attempted:,} ok ({written.success_rate:.1f}%)\n")
        for reason, n in sorted(written.failed_by_reason.items(), key=lambda kv: -kv[1]):
            out.write(f"            {n:>10,} failed: {reason}\n")
        out.write(f"  written   {written.bytes_written / 1e6:,.1f} MB in {written.total_seconds:.1f} s\n")
    if verified:
        out.write(
            f"  verified  {verified.samples:,} samples in {verified.shards} shards read back, "
            f"{verified.images_decoded:,} images decoded\n"
        )
    if summary.annotations:
        out.write(f"  index     {summary.annotations}\n")
    if lat is not None:
        out.write(
            f"  latents   {lat.samples:,} samples ({lat.skipped:,} undecodable) at "
            f"{lat.latents_per_second:,.1f}/s on {', '.join(lat.devices) or '-'}; image "
            f"{'x'.join(map(str, lat.image_shape or []))}, text {'x'.join(map(str, lat.caption_shape or []))} "
            f"{lat.dtype}\n"
        )
        out.write(f"            {lat.index}\n")
    emb = summary.embeddings
    if emb is not None:
        out.write(
            f"  embedded  {emb.samples:,} samples ({emb.skipped:,} undecodable) at "
            f"{emb.embeddings_per_second:,.1f}/s on {', '.join(emb.devices) or '-'}; {emb.dim} wide, {emb.model}\n"
        )
        if emb.duplicates is not None:
            found = ", ".join(f"{n:,} {kind}" for kind, n in emb.duplicates.items())
            out.write(f"            duplicates: {found}\n")
        out.write(f"            {emb.folder}\n")
        if emb.index:
            out.write(f"  index     {emb.index}\n")


def _run(part: PartSpec, run: Callable[[ProgressBar], dict], out) -> int:
    """Run a part with a live progress line, then print its summary; the exit code says how it went."""
    from .runtime import ENDED, ending

    bar = ProgressBar()
    try:
        summary = run(bar)
    except ENDED as err:
        bar.close()
        code, message = ending(part.part_id, err)
        print(f"laion-operator: {message}", file=sys.stderr)
        return code
    bar.close()
    print_summary(Summary.from_json(summary), out)
    return ExitCode.OK


def warm_imports(part: PartSpec) -> tuple[str, ...]:
    """What the part's shard tasks import: the download's or the convert's modules, and the modules
    its output format's writer imports when its first shard opens one."""
    from . import formats

    source = sources.of(part)
    stage = (
        ("convert", "record", f"sources.{source.name}") if source.converts else ("download", "record", "fetch.engine")
    )
    return (*(f"{__package__}.{m}" for m in stage), *formats.get(part.download.output_format).writer_imports)


def _start_host_budget(part: PartSpec) -> None:
    from .fetch import cluster_budget

    cluster_budget(part.download)  # the actors start now; the shard tasks find them by name


def run_with_progress(part: PartSpec, ray_address: str | None = None, out=sys.stdout) -> int:
    """`laion-operator run` and `convert`: every stage of the part."""
    from .runtime import settle_ray_start, start_ray

    # The stage that needs Ray waits for it; the imports and the filter run meanwhile, and so does the
    # start of the host budget's actors, which the first URLs of every shard would otherwise wait for.
    prepare = None if sources.of(part).converts else functools.partial(_start_host_budget, part)
    start_ray(ray_address, warm=warm_imports(part), prepare=prepare)
    try:
        from .driver import run_part

        source = sources.of(part).describe(part)
        line = f"part {part.part_id}: {source} -> {part.output.uri} ({part.download.output_format})"
        print(line, file=out, flush=True)
        return _run(part, lambda bar: run_part(part, on_progress=bar), out)
    finally:
        settle_ray_start()


def embed_with_progress(part: PartSpec, ray_address: str | None = None, out=sys.stdout) -> int:
    """`laion-operator embed`: the embeddings stage alone over an output already downloaded or converted."""
    from .driver import embed_part

    model = part.embeddings.model if part.embeddings else "-"
    print(f"part {part.part_id}: CLIP embeddings of {part.output.uri} by {model}", file=out, flush=True)
    return _run(part, lambda bar: embed_part(part, on_progress=bar, ray_address=ray_address), out)


def encode_with_progress(part: PartSpec, ray_address: str | None = None, out=sys.stdout, source=None) -> int:
    """`laion-operator latents`: the latents stage alone over an output already downloaded or converted,
    or over an MDS folder (`source`, a formats.mds.MDSFolder) into the part's output."""
    from .driver import encode_mds, encode_part

    print(f"part {part.part_id}: latents of {source.uri if source else part.output.uri}", file=out, flush=True)
    if source is not None:
        return _run(part, lambda bar: encode_mds(part, source, on_progress=bar, ray_address=ray_address), out)
    return _run(part, lambda bar: encode_part(part, on_progress=bar, ray_address=ray_address), out)
