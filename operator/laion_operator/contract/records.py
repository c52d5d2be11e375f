"""The typed records the job writes into the output folder beside its files and the operator reads:
`Progress` (`_laion/progress.json`), a shard's `ShardStats` (`NNNNN_stats.json`), the verify stage's
`Verification`, and the model stages' per-shard stats (`EncodeStats`, `LatentStats`)."""

import time
from collections.abc import Sequence
from copy import copy
from dataclasses import asdict, dataclass, field, fields

from . import PHASES, Phase


@dataclass(kw_only=True)
class PartCounts:
    """What a part's metadata and shards came to: its progress as it runs, its summary (summary.Written)
    at the end."""

    rows_read: int = 0
    rows_kept: int = 0
    dropped_by: dict[str, int] = field(default_factory=dict)
    shards_total: int = 0
    shards_done: int = 0
    shards_failed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0

    def part_counts(self) -> dict:
        """These counts alone, copied (the summary's from the progress)."""
        return {f.name: copy(getattr(self, f.name)) for f in fields(PartCounts)}


@dataclass
class Progress(PartCounts):
    """`_laion/progress.json`: written by the job as it runs, read by the operator and a resumed run."""

    part_id: str
    phase: Phase = Phase.FILTERING
    # The operator's submission id of the run that wrote it (JOB_ID_ENV; "" outside the operator): a
    # re-run's operator must not show the last run's phase as this one's.
    job: str = ""
    images_ok: int = 0
    images_failed: int = 0
    # The `opt_out` failures by the rule that refused them (OPT_OUT_RULES): a user answering a host's
    # complaint needs to know which opt-out was honoured, not only how many.
    opted_out_by: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    message: str = ""
    # The verify stage's result (Verification.to_json); empty until it ran.
    verified: dict = field(default_factory=dict)
    # The model stages' counts (spec.latents, spec.embeddings), each as the status shows it
    # (pipeline/stages/encoding.py: Counts.status); empty for a part without the stage.
    latents: dict = field(default_factory=dict)
    embeddings: dict = field(default_factory=dict)

    def count_images(self, finished: Sequence["ShardStats"], running: Sequence["ShardStats"] = ()) -> None:
        """Images by outcome from the shards (the finished ones and the running ones' counts so far);
        bytes from the finished ones only."""
        shards = [*finished, *running]
        self.images_ok = sum(s.successes for s in shards)
        self.images_failed = sum(s.failed for s in shards)
        reasons: dict[str, int] = {}
        for s in shards:
            for reason, n in s.failed_by_reason.items():
                reasons[reason] = reasons.get(reason, 0) + n
        self.failed_by_reason = reasons
        rules: dict[str, int] = {}
        for s in shards:
            for rule, n in s.opted_out_by.items():
                rules[rule] = rules.get(rule, 0) + n
        self.opted_out_by = rules
        self.bytes_written = sum(s.bytes_written for s in finished)

    @property
    def success_rate(self) -> float:
        """Percent of attempted images that made it into the dataset."""
        attempted = self.images_ok + self.images_failed
        return round(100.0 * self.images_ok / attempted, 2) if attempted else 0.0

    def __post_init__(self) -> None:
        # The phase as JSON spells it (progress.json, a test's Progress(phase="Encoding")); one this
        # version does not know (a newer job's) reads as not yet reported.
        self.phase = Phase(self.phase) if self.phase in PHASES else Phase.PENDING

    def to_json(self) -> dict:
        return {**asdict(self), "phase": self.phase.value, "success_rate": self.success_rate}

    @classmethod
    def from_json(cls, data: dict) -> "Progress":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Verification:
    """What the verify stage found: every shard read back with its format's own reader."""

    ok: bool = False
    shards: int = 0
    samples: int = 0
    images_decoded: int = 0
    problems: list[str] = field(default_factory=list)  # each names its shard (or the annotation file)
    bad_shards: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "shards": self.shards,
            "samples": self.samples,
            "imagesDecoded": self.images_decoded,
            "problems": list(self.problems),
            "badShards": list(self.bad_shards),
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Verification":
        return cls(
            ok=bool(data.get("ok")),
            shards=data.get("shards", 0),
            samples=data.get("samples", 0),
            images_decoded=data.get("imagesDecoded", 0),
            problems=list(data.get("problems", [])),
            bad_shards=list(data.get("badShards", [])),
            seconds=data.get("seconds", 0.0),
        )

    @property
    def message(self) -> str:
        if self.ok:
            return f"{self.samples} samples in {self.shards} shards read back, {self.images_decoded} images decoded"
        more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        return "; ".join(self.problems[:3]) + more


@dataclass
class ShardStats:
    """`<shard>_stats.json`: img2dataset's stats fields, plus failure reasons, the opt-out rules that
    refused the `opt_out` ones (OPT_OUT_RULES), and bytes."""

    shard: int
    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    opted_out_by: dict[str, int] = field(default_factory=dict)
    # a converted dataset's samples left out by filter.dropDuplicates/scores, by kind (`filtered` rows)
    left_out_by: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    start_time: float = 0.0
    end_time: float = 0.0
    # Answers asking the shard to slow down (429, 503 with Retry-After): each halves its host's limit.
    slowed_down: int = 0

    @property
    def failed(self) -> int:
        return self.failed_to_download + self.failed_to_resize

    def to_json(self) -> dict:
        # img2dataset's own stats fields first, so its tooling reads these files too.
        return {
            "count": self.count,
            "successes": self.successes,
            "failed_to_download": self.failed_to_download,
            "failed_to_resize": self.failed_to_resize,
            "duration": self.end_time - self.start_time,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "status_dict": {"success": self.successes, **self.failed_by_reason},
            "shard": self.shard,
            "failed_by_reason": self.failed_by_reason,
            "opted_out_by": self.opted_out_by,
            "left_out_by": self.left_out_by,
            "bytes_written": self.bytes_written,
            "slowed_down": self.slowed_down,
        }

    @classmethod
    def from_json(cls, data: dict) -> "ShardStats":
        return cls(
            shard=data["shard"],
            count=data["count"],
            successes=data["successes"],
            failed_to_download=data["failed_to_download"],
            failed_to_resize=data["failed_to_resize"],
            failed_by_reason=dict(data.get("failed_by_reason", {})),
            opted_out_by=dict(data.get("opted_out_by", {})),
            left_out_by=dict(data.get("left_out_by", {})),
            bytes_written=data.get("bytes_written", 0),
            start_time=data.get("start_time", 0.0),
            end_time=data.get("end_time", 0.0),
            slowed_down=data.get("slowed_down", 0),
        )


@dataclass
class EncodeStats:
    """`<stage>/<shard>_stats.json`: one shard's encoding by a model (latents, embeddings)."""

    shard: int
    count: int = 0  # samples the shard's images hold
    written: int = 0  # samples encoded
    skipped: int = 0  # images that did not decode
    start_time: float = 0.0
    end_time: float = 0.0
    device: str = ""

    def to_json(self) -> dict:
        return {**asdict(self), "duration": self.end_time - self.start_time}

    @classmethod
    def from_json(cls, data: dict):  # the subclass's own (LatentStats, embeddings' EmbeddingStats)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class LatentStats(EncodeStats):
    """`latents/<shard>_stats.json`, with what turns its bytes back into tensors (the same every shard)."""

    image_shape: list[int] = field(default_factory=list)  # the smallest resolution's
    image_shapes: dict[str, list[int]] = field(default_factory=dict)  # every resolution's, by resolution
    caption_shape: list[int] = field(default_factory=list)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)  # left out by dropDuplicates/scores, by kind
