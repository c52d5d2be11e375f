"""`part_<id>_summary.json`, beside a part's dataset: what its stages did, as typed records.

The stages fill a `Summary` as they run (annotate its counts, verify, latents and heal their
sections) and write its JSON, camelCase as trainers' tooling and the tests read it; nothing else
spells its keys. Its own module rather than `contract`'s: only the pipeline and the CLI read it (the
operator reads progress.json), and the contract stays one screen of names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .contract import PartCounts, Verification
from .names import camel as _camel


def _camel_json(record: Any) -> dict:
    return {_camel(k): v for k, v in asdict(record).items()}


def _from_camel(cls: Any, data: dict) -> Any:
    return cls(**{f.name: data[_camel(f.name)] for f in fields(cls) if _camel(f.name) in data})


@dataclass
class Written(PartCounts):
    """The counts of the stage that wrote the shards (download or convert): rows, shards, images."""

    output_format: str
    attempted: int = 0
    ok: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    opted_out_by: dict[str, int] = field(default_factory=dict)  # `opt_out` by rule (contract.OPT_OUT_RULES)
    left_out_by: dict[str, int] = field(default_factory=dict)  # `filtered` by dropDuplicates/scores, by kind
    slowed_down: int = 0  # 429s (and 503s with Retry-After) the hosts answered: the host budget's cuts
    success_rate: float = 0.0
    total_seconds: float = 0.0
    shard_seconds_sum: float = 0.0

    # The JSON's top-level fields, then its sections and the fields each holds.
    TOP = ("output_format", "success_rate", "bytes_written")
    SECTIONS = {
        "metadata": ("rows_read", "rows_kept", "dropped_by"),
        "shards": ("shards_total", "shards_done", "shards_failed"),
        "images": (
            "attempted",
            "ok",
            "failed_to_download",
            "failed_to_resize",
            "failed_by_reason",
            "opted_out_by",
            "left_out_by",
            "slowed_down",
        ),
        "durations": ("total_seconds", "shard_seconds_sum"),
    }

    @staticmethod
    def _key(section: str, name: str) -> str:
        return name.removeprefix("shards_") if section == "shards" else _camel(name)

    def to_json(self) -> dict:
        data: dict[str, Any] = {_camel(name): getattr(self, name) for name in self.TOP}
        for section, names in self.SECTIONS.items():
            data[section] = {self._key(section, n): getattr(self, n) for n in names}
        return data

    @classmethod
    def from_json(cls, data: dict) -> Written:
        values = {name: data[_camel(name)] for name in cls.TOP if _camel(name) in data}
        for section, names in cls.SECTIONS.items():
            found = data.get(section, {})
            values.update({n: found[cls._key(section, n)] for n in names if cls._key(section, n) in found})
        return cls(**values)


@dataclass
class LatentsSummary:
    """The `latents` section: the latents stage's index, counts, rate, devices and shapes."""

    index: str
    samples: int = 0
    skipped: int = 0
    shards: int = 0
    latents_per_second: float = 0.0
    shard_seconds_sum: float = 0.0
    devices: list[str] = field(default_factory=list)
    image_shape: list[int] | None = None
    image_shapes: dict[str, list[int]] = field(default_factory=dict)
    caption_shape: list[int] | None = None
    dtype: str = ""
    dropped: dict[str, int] = field(default_factory=dict)  # left out by dropDuplicates/scores, by kind


@dataclass
class EmbeddingsSummary:
    """The `embeddings` section: where the embeddings are, their model, counts, rate and width, and
    with embeddings.dedup the duplicates found by kind (exact, perceptual, semantic)."""

    folder: str
    model: str = ""
    samples: int = 0
    skipped: int = 0
    shards: int = 0
    dim: int = 0
    embeddings_per_second: float = 0.0
    shard_seconds_sum: float = 0.0
    devices: list[str] = field(default_factory=list)
    duplicates: dict[str, int] | None = None
    index: str = ""  # with embeddings.index: the FAISS indexes' folder


@dataclass
class HealSummary:
    """The `heal` section: the reasons healed, the shards rewritten, the samples fetched again."""

    reasons: list[str]
    shards: int = 0
    refetched: int = 0


@dataclass
class Summary:
    """A part's summary: who it is, what its shards stage wrote, and each later stage's section."""

    part_id: str
    output: str
    written: Written | None = None  # None: the latents of a folder anyone wrote (`input`), nothing else
    annotations: str = ""  # the annotation file's URL
    input: str = ""
    verified: Verification | None = None
    latents: LatentsSummary | None = None
    embeddings: EmbeddingsSummary | None = None
    heal: HealSummary | None = None
    # Keys this version does not write (an older or newer writer's), kept as they were.
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data: dict[str, Any] = {**self.extra, "partId": self.part_id, "output": self.output}
        if self.written is not None:
            data.update(self.written.to_json())
        data.update({k: v for k, v in (("annotations", self.annotations), ("input", self.input)) if v})
        if self.verified is not None:
            data["verified"] = self.verified.to_json()
        for key, section in (("latents", self.latents), ("embeddings", self.embeddings), ("heal", self.heal)):
            if section is not None:
                data[key] = _camel_json(section)
        return data

    @classmethod
    def from_json(cls, data: dict) -> Summary:
        written = Written.from_json(data) if "outputFormat" in data else None
        known = {"partId", "output", "annotations", "input", "verified", "latents", "embeddings", "heal"}
        if written is not None:
            known |= {_camel(name) for name in Written.TOP} | set(Written.SECTIONS)
        return cls(
            part_id=data["partId"],
            output=data["output"],
            written=written,
            annotations=data.get("annotations", ""),
            input=data.get("input", ""),
            verified=Verification.from_json(data["verified"]) if "verified" in data else None,
            latents=_from_camel(LatentsSummary, data["latents"]) if "latents" in data else None,
            embeddings=_from_camel(EmbeddingsSummary, data["embeddings"]) if "embeddings" in data else None,
            heal=_from_camel(HealSummary, data["heal"]) if "heal" in data else None,
            extra={k: v for k, v in data.items() if k not in known},
        )

    @property
    def images_ok(self) -> int:
        return self.written.ok if self.written is not None else 0
