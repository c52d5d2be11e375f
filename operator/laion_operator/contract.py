"""The output folder's contract: where the pipeline meets the operator.

The pipeline (inside Ray) writes a part's output folder; the control plane (the operator) only reads
it. This module is the one place that names what is in it, so that neither side imports the other:

    <output>/
      00000.tar | 00000.parquet | 00000.tfrecord | 00000/   a shard in the part's outputFormat
      00000.parquet                                          every sample's metadata and status
      00000_stats.json                                       the shard is finished (written last)
      part_<id>_stats.csv | part_<id>.csv                    the annotations trainers read
      part_<id>_summary.json                                 counts, failure reasons, durations
      _laion/filter.json                                     the filter's manifest and fingerprint
      _laion/shards/00000.parquet                            the filtered rows of each shard
      _laion/progress.json                                   the part's progress, as it runs

It also holds what the job tells the operator besides files: its exit codes, the phases of a part,
and the bounded set of failure reasons every count (summary, status, metrics) is keyed by.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .spec import PartSpec

META_DIR = "_laion"
PROGRESS = f"{META_DIR}/progress.json"
MANIFEST = f"{META_DIR}/filter.json"
SHARDS_DIR = f"{META_DIR}/shards"

# The file (or, for `files`, the folder) a shard's samples go to, by outputFormat.
SHARD_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet", "tfrecord": ".tfrecord", "files": ""}
# img2dataset's writers name shards with this many digits: 00000, 00001, …
SHARD_DIGITS = 5


def shard_name(shard: int) -> str:
    return f"{shard:0{SHARD_DIGITS}d}"


def shard_input(shard: int) -> str:
    """The filtered rows a shard downloads."""
    return f"{SHARDS_DIR}/{shard_name(shard)}.parquet"


def shard_stats(shard: int) -> str:
    """Present only once every other file of the shard is complete."""
    return f"{shard_name(shard)}_stats.json"


def shard_metadata(shard: int) -> str:
    """Every sample of the shard: its metadata row, key, status and failure reason."""
    return f"{shard_name(shard)}.parquet"


def shard_data(shard: int, output_format: str) -> str:
    return shard_name(shard) + SHARD_SUFFIX[output_format]


def shard_files(shard: int) -> list[str]:
    """Everything a shard may have written, whatever the format: removed before it is redone."""
    return sorted({shard_name(shard) + suffix for suffix in SHARD_SUFFIX.values()} | {shard_metadata(shard)})


def stats_csv(part_id: str) -> str:
    """Shard path and sample count, one row a shard (webdataset, parquet, tfrecord)."""
    return f"part_{part_id}_stats.csv"


def files_csv(part_id: str) -> str:
    """Image path and caption, one row an image (files)."""
    return f"part_{part_id}.csv"


def annotations(part_id: str, output_format: str) -> str:
    return files_csv(part_id) if output_format == "files" else stats_csv(part_id)


def summary(part_id: str) -> str:
    return f"part_{part_id}_summary.json"


# A LaionDataset's output holds one part folder per part (the seeds' data_dir layout) and an index
# of every part's annotation files, written by the operator:
#
#     <dataset output>/part_<id>/…        one part's output folder, as above
#     <dataset output>/dataset_index.json  {"parts": [{"partId", "output", "annotations", "phase", …}]}
DATASET_INDEX = "dataset_index.json"


def part_dir(part_id: str) -> str:
    return f"part_{part_id}"


def fingerprint(spec: "PartSpec") -> str:
    """What decides the shards' content; a resumed run into the same output must see the same value."""
    data = spec.to_dict()
    key = {k: data.get(k) for k in ("source", "columns", "filter")}
    key["additional"] = data["download"]["saveAdditionalColumns"]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class InputError(ValueError):
    """Bad input — spec, metadata, columns or an unusable output — named in the message; the job ends
    with ExitCode.BAD_INPUT, the CLI with the same code."""


class ExitCode(enum.IntEnum):
    """How a part's job ends, which tells the operator what a retry can do."""

    OK = 0
    SHARDS_FAILED = 1  # a retry resumes the failed shards
    BAD_INPUT = 2  # spec, metadata or output unusable: a retry cannot help


class Phase(str, enum.Enum):
    """A part's phase: the job writes the middle ones into progress.json, the operator the others."""

    PENDING = "Pending"  # submitted, the job has not reported yet
    QUEUED = "Queued"  # waiting for a slot (maxConcurrentParts)
    FILTERING = "Filtering"
    DOWNLOADING = "Downloading"
    ANNOTATING = "Annotating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    STOPPING = "Stopping"  # deleted; its job is being stopped
    SUSPENDED = "Suspended"  # spec.suspend: its job is stopped, its finished shards kept until resumed

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def running(self) -> bool:
        return self in RUNNING


# A job has been submitted for the part and has not ended.
RUNNING = frozenset({Phase.PENDING, Phase.FILTERING, Phase.DOWNLOADING, Phase.ANNOTATING})
TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED})
# No job runs and none will until the spec changes again: terminal, or suspended.
SETTLED = TERMINAL | {Phase.SUSPENDED}
PHASES = [p.value for p in Phase]

FAILURE_REASONS = [
    "http_4xx", "http_5xx", "timeout", "tls", "dns", "connection", "decode", "too_small", "aspect_ratio",
    "opt_out", "other",
]


def reason_of(reason: str) -> str:
    """The bounded value for a failure reason a job reported (an older or newer job's may differ)."""
    return reason if reason in FAILURE_REASONS else "other"


@dataclass
class Progress:
    """`_laion/progress.json`: written by the job as it runs, read by the operator and a resumed run."""

    part_id: str
    phase: str = Phase.FILTERING.value
    rows_read: int = 0
    rows_kept: int = 0
    dropped_by: dict[str, int] = field(default_factory=dict)
    shards_total: int = 0
    shards_done: int = 0
    shards_failed: int = 0
    images_ok: int = 0
    images_failed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    message: str = ""

    @property
    def success_rate(self) -> float:
        """Percent of attempted images that made it into the dataset."""
        attempted = self.images_ok + self.images_failed
        return round(100.0 * self.images_ok / attempted, 2) if attempted else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "success_rate": self.success_rate}

    @classmethod
    def from_json(cls, data: dict) -> "Progress":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class ShardStats:
    """`<shard>_stats.json`: img2dataset's stats fields, plus failure reasons and bytes."""

    shard: int
    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    start_time: float = 0.0
    end_time: float = 0.0

    @property
    def failed(self) -> int:
        return self.failed_to_download + self.failed_to_resize

    def to_json(self) -> dict:
        # img2dataset's own stats fields first, so its tooling reads these files too.
        return {
            "count": self.count, "successes": self.successes, "failed_to_download": self.failed_to_download,
            "failed_to_resize": self.failed_to_resize, "duration": self.end_time - self.start_time,
            "start_time": self.start_time, "end_time": self.end_time,
            "status_dict": {"success": self.successes, **self.failed_by_reason},
            "shard": self.shard, "failed_by_reason": self.failed_by_reason, "bytes_written": self.bytes_written,
        }

    @classmethod
    def from_json(cls, data: dict) -> "ShardStats":
        return cls(shard=data["shard"], count=data["count"], successes=data["successes"],
                   failed_to_download=data["failed_to_download"], failed_to_resize=data["failed_to_resize"],
                   failed_by_reason=dict(data.get("failed_by_reason", {})),
                   bytes_written=data.get("bytes_written", 0), start_time=data.get("start_time", 0.0),
                   end_time=data.get("end_time", 0.0))
