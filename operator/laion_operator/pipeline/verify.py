"""Verify: every shard of a finished part read back with its format's own reader, every image decoded,
and the counts compared with the shards' stats, the annotations and the summary.

Readers: the formats' `read_samples` (pipeline/formats/): a `.tar` grouped by key as webdataset
groups it, pyarrow for `.parquet`, the `tfrecord` package for `.tfrecord`, streaming's MDS reader
for `mds`, and for `files` the shard's folder beside the `part_<id>.csv` that lists it. What a trainer
would trip over is what this looks for: a shard that does not open, an image that does not decode, a
key twice, a count that differs from what the part says it wrote. Every problem names its shard.

Runs after annotating (the verify stage spreads `check_shard` over Ray tasks, stages/verify.py) and
on demand with `laion-operator verify OUTPUT`; the result goes into the summary as `verified` and into progress.json,
from which the operator sets the part's `Verified` condition.
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

from .. import contract
from ..contract import MANIFEST, ShardStats, Verification, shard_name
from ..errors import InputError
from ..storage import Store
from ..summary import Summary
from . import formats
from .formats import BrokenShard, shard_data
from .verify_embeddings import check_embeddings

MAX_PROBLEMS_PER_SHARD = 5


@dataclass
class ShardCheck:
    """What reading one shard back found."""

    shard: int
    samples: int = 0
    decoded: int = 0
    # samples per data file, named relative to the output (mds: one entry per MDS shard file)
    files: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # in the order read: what the embeddings' rows follow

    def problem(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS_PER_SHARD:
            self.problems.append(message)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ShardCheck:
        return cls(**data)


def decode(image: bytes) -> None:
    """Decode an image fully (not only its header); raises if it does not."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        im.load()


class _Reading:
    """Counts, decodes and checks the keys of the samples of one shard file."""

    def __init__(self, check: ShardCheck, name: str):
        self.check, self.name = check, name
        self.keys: Counter[str] = Counter()
        check.files.setdefault(name, 0)

    def sample(self, key: str, image: bytes | None) -> None:
        self.check.samples += 1
        self.check.files[self.name] += 1
        self.keys[key] += 1
        self.check.keys.append(key)
        if self.keys[key] == 2:
            self.check.problem(f"{self.name}: key {key} appears more than once")
        if not image:
            self.check.problem(f"{self.name}: sample {key} has no image")
            return
        try:
            decode(image)
            self.check.decoded += 1
        except Exception as err:  # noqa: BLE001 - any decoder error is the same finding
            self.check.problem(f"{self.name}: sample {key}: image does not decode ({len(image)} bytes): {err}")


def check_shard(store: Store, fmt: str, shard: int) -> ShardCheck:
    check = ShardCheck(shard=shard)
    readings: dict[str, _Reading] = {}
    try:
        for sample in formats.get(fmt).read_samples(store, shard):
            if sample.file not in readings:
                readings[sample.file] = _Reading(check, sample.file)
            readings[sample.file].sample(sample.key, sample.image)
    except BrokenShard as err:  # names the file and what is wrong with it
        check.problem(str(err))
    except Exception as err:  # noqa: BLE001 - a shard that does not open is a finding, named
        check.problem(f"{shard_data(shard, fmt)}: cannot be read: {type(err).__name__}: {err}")
    return check


def _annotated(store: Store, part_id: str, fmt: str) -> Counter:
    """Samples per shard file (files: per shard folder) as the annotation file lists them."""
    name = contract.annotations(part_id, fmt)
    with store.fs.open(store.path(name), "r", newline="") as f:
        rows = list(csv.DictReader(f))
    counts: Counter = Counter()
    for row in rows:
        file, samples = formats.get(fmt).annotated(row, store.uri + "/")
        counts[file] += samples
    return counts


def verify(
    store: Store, part_id: str, fmt: str, check_all: Callable[[list[int]], Iterable[ShardCheck]] | None = None
) -> Verification:
    """Read every shard of the part back and compare; `check_all` spreads check_shard (default: here)."""
    from .download import load_stats

    started = time.time()
    result = Verification()
    bad: set[int] = set()
    manifest = store.read_json(MANIFEST) or {}
    shards = list(range(manifest.get("shards", 0)))
    stats: dict[int, ShardStats] = {}
    for shard in shards:
        found = load_stats(store, shard)
        if found is None:
            result.problems.append(f"{shard_name(shard)}: not finished (no {contract.shard_stats(shard)})")
            bad.add(shard)
        else:
            stats[shard] = found
    checks: list[ShardCheck] = list((check_all or (lambda s: (check_shard(store, fmt, x) for x in s)))(sorted(stats)))
    try:
        annotated = _annotated(store, part_id, fmt)
    except FileNotFoundError:
        annotated = None
        result.problems.append(f"{contract.annotations(part_id, fmt)}: missing")
    for check in checks:
        where = shard_data(check.shard, fmt)
        result.problems += check.problems
        if check.problems:
            bad.add(check.shard)
        wrote = stats[check.shard].successes
        if check.samples != wrote:
            result.problems.append(
                f"{where}: {check.samples} samples read back, {contract.shard_stats(check.shard)} says {wrote}"
            )
            bad.add(check.shard)
        if annotated is not None:
            # the shard's data file, or the files in its folder (mds)
            listed = sum(n for name, n in annotated.items() if name == where or name.startswith(where + "/"))
            if listed != check.samples:
                result.problems.append(
                    f"{where}: {check.samples} samples read back, {contract.annotations(part_id, fmt)} lists {listed}"
                )
                bad.add(check.shard)
        result.samples += check.samples
        result.images_decoded += check.decoded
    summary = store.read_json(contract.summary(part_id))
    if summary is None:
        result.problems.append(f"{contract.summary(part_id)}: missing")
    elif (said := Summary.from_json(summary).images_ok) != result.samples:
        result.problems.append(f"{contract.summary(part_id)}: says {said} images, {result.samples} read back")
    result.shards = len(checks)
    result.bad_shards = sorted(bad)
    result.ok = not result.problems
    result.seconds = round(time.time() - started, 3)
    return result


def _summaries(store: Store) -> Iterator[Summary]:
    for path in sorted(store.fs.glob(store.path("part_*_summary.json"))):
        data = store.read_json(path.rsplit("/", 1)[-1])
        if data:
            yield Summary.from_json(data)


def verify_output(store: Store) -> tuple[Summary, Verification]:
    """`laion-operator verify OUTPUT`: verify the part found in a finished output, record the result in
    its summary (and progress.json, for the operator); returns the summary and the result."""
    summaries = list(_summaries(store))
    if len(summaries) != 1:
        raise InputError(f"{store.uri}: expected one part_<id>_summary.json (a finished part), found {len(summaries)}")
    summary = summaries[0]
    if summary.written is None:
        raise InputError(f"{store.uri}: its summary is of latents alone; it holds no shards to verify")
    fmt, checks = summary.written.output_format, {}

    def check_all(shards: list[int]) -> Iterator[ShardCheck]:
        for shard in shards:
            checks[shard] = check_shard(store, fmt, shard)
            yield checks[shard]

    result = verify(store, summary.part_id, fmt, check_all)
    if store.exists(contract.EMBEDDINGS_DIR):  # the embeddings stage's files against the shards read back
        result.problems += check_embeddings(store, {shard: check.keys for shard, check in checks.items()})
        result.ok = not result.problems
    summary.verified = result
    store.write_json(summary.to_json(), contract.summary(summary.part_id))
    progress = store.read_json(contract.PROGRESS)
    if progress is not None:
        progress["verified"] = result.to_json()
        store.write_json(progress, contract.PROGRESS)
    return summary, result
