"""A part on this machine (or a Ray cluster it can reach), with a live progress line and a summary:
what `laion-operator run` and the demo show a person at a terminal."""

from __future__ import annotations

import sys
import time

from ..contract import ExitCode, Phase, Progress
from ..spec import PartSpec
from ..storage import StorageUnavailable


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
        elif p.phase == Phase.ENCODING:
            line = (
                f"[latents] shards {p.latents_shards_done}/{p.latents_shards_total}"
                f"{f' ({p.latents_shards_failed} failed)' if p.latents_shards_failed else ''} | "
                f"{p.latents_written:,} samples, {p.latents_per_second:,.1f}/s"
            )
        else:
            attempted = p.images_ok + p.images_failed
            line = (
                f"[{p.phase.lower()}] shards {p.shards_done}/{p.shards_total}"
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


def print_summary(summary: dict, out=sys.stdout) -> None:
    images = summary["images"]
    meta = summary["metadata"]
    out.write(f"\npart {summary['partId']} -> {summary['output']} ({summary['outputFormat']})\n")
    out.write(f"  metadata  {meta['rowsRead']:,} rows read, {meta['rowsKept']:,} kept\n")
    for reason, n in sorted(meta["droppedBy"].items(), key=lambda kv: -kv[1]):
        if n:
            out.write(f"            {n:>10,} dropped by {reason}\n")
    out.write(f"  shards    {summary['shards']['done']}/{summary['shards']['total']} done\n")
    out.write(f"  images    {images['ok']:,} of {images['attempted']:,} ok ({summary['successRate']:.1f}%)\n")
    for reason, n in sorted(images["failedByReason"].items(), key=lambda kv: -kv[1]):
        out.write(f"            {n:>10,} failed: {reason}\n")
    out.write(f"  written   {summary['bytesWritten'] / 1e6:,.1f} MB in {summary['durations']['totalSeconds']:.1f} s\n")
    verified = summary.get("verified")
    if verified:
        out.write(
            f"  verified  {verified['samples']:,} samples in {verified['shards']} shards read back, "
            f"{verified['imagesDecoded']:,} images decoded\n"
        )
    if "annotations" in summary:
        out.write(f"  index     {summary['annotations']}\n")
    if "latents" in summary:
        lat = summary["latents"]
        out.write(
            f"  latents   {lat['samples']:,} samples ({lat['skipped']:,} undecodable) at "
            f"{lat['latentsPerSecond']:,.1f}/s on {', '.join(lat['devices']) or '-'}; image "
            f"{'x'.join(map(str, lat['imageShape'] or []))}, text {'x'.join(map(str, lat['captionShape'] or []))} "
            f"{lat['dtype']}\n"
        )
        out.write(f"            {lat['index']}\n")


def run_with_progress(part: PartSpec, ray_address: str | None = None, out=sys.stdout) -> int:
    """Run a part with a live progress line, then print its summary; the exit code says how it went."""
    from .driver import PartFailed, run_part
    from .runtime import ensure_ray

    sources = (
        f"dataset {part.dataset.uri}"
        if part.dataset
        else f"{len(part.source)} metadata file{'s' if len(part.source) > 1 else ''}"
    )
    print(f"part {part.part_id}: {sources} -> {part.output.uri} ({part.download.output_format})", file=out, flush=True)
    ensure_ray(ray_address)
    bar = ProgressBar()
    try:
        summary = run_part(part, on_progress=bar)
    except PartFailed as err:
        bar.close()
        print(f"laion-operator: part {part.part_id} failed: {err}", file=sys.stderr)
        return ExitCode.SHARDS_FAILED
    except StorageUnavailable as err:
        bar.close()
        print(
            f"laion-operator: part {part.part_id} failed: StorageUnavailable: {err}; run it again to resume",
            file=sys.stderr,
        )
        return ExitCode.STORAGE_UNAVAILABLE
    bar.close()
    print_summary(summary, out)
    return ExitCode.OK


def encode_with_progress(part: PartSpec, ray_address: str | None = None, out=sys.stdout, source=None) -> int:
    """`laion-operator latents`: the latents stage alone over an output already downloaded or converted,
    or over an MDS folder (`source`, a latents.MDSFolder) into the part's output."""
    from .driver import PartFailed, encode_mds, encode_part

    print(f"part {part.part_id}: latents of {source.uri if source else part.output.uri}", file=out, flush=True)
    bar = ProgressBar()
    try:
        if source is not None:
            summary = encode_mds(part, source, on_progress=bar, ray_address=ray_address)
        else:
            summary = encode_part(part, on_progress=bar, ray_address=ray_address)
    except PartFailed as err:
        bar.close()
        print(f"laion-operator: part {part.part_id} failed: {err}", file=sys.stderr)
        return ExitCode.SHARDS_FAILED
    bar.close()
    print_summary(summary, out)
    return ExitCode.OK
