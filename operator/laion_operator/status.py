"""A part's progress: the document the pipeline persists in its output, and the CR status made from it.

The pipeline writes `progress.json` under the output's `_laion/` folder as shards finish. Because it
lives beside the data, the operator, its metrics and a restarted operator all read the same truth.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

PHASES = ["Pending", "Queued", "Filtering", "Downloading", "Annotating", "Succeeded", "Failed", "Stopping"]
FAILURE_REASONS = [
    "http_4xx", "http_5xx", "timeout", "tls", "dns", "connection", "decode", "too_small", "aspect_ratio",
    "opt_out", "other",
]


@dataclass
class Progress:
    part_id: str
    phase: str = "Filtering"
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


def _iso(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None


def cr_status(progress: Progress) -> dict:
    """The LaionPart status fields that come from the job's persisted progress."""
    return {
        "rowsRead": progress.rows_read,
        "rowsKept": progress.rows_kept,
        "shards": {"total": progress.shards_total, "done": progress.shards_done, "failed": progress.shards_failed},
        "shardsProgress": f"{progress.shards_done}/{progress.shards_total}",
        "images": {
            "ok": progress.images_ok,
            "failed": progress.images_failed,
            "failedByReason": dict(progress.failed_by_reason),
        },
        "bytesWritten": progress.bytes_written,
        "successRate": progress.success_rate,
        "startedAt": _iso(progress.started_at),
        "finishedAt": _iso(progress.finished_at),
    }


_COUNT = {"type": "integer", "minimum": 0}

STATUS_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "phase": {"type": "string", "enum": PHASES},
        "message": {"type": "string"},
        "observedGeneration": {"type": "integer"},
        "submissionId": {"type": "string"},
        "retries": _COUNT,
        "output": {"type": "string"},
        "rowsRead": _COUNT,
        "rowsKept": _COUNT,
        "shards": {"type": "object", "properties": {"total": _COUNT, "done": _COUNT, "failed": _COUNT}},
        "shardsProgress": {"type": "string"},
        "images": {
            "type": "object",
            "properties": {
                "ok": _COUNT,
                "failed": _COUNT,
                "failedByReason": {"type": "object", "additionalProperties": _COUNT},
            },
        },
        "bytesWritten": _COUNT,
        "successRate": {"type": "number", "description": "Percent of attempted images downloaded."},
        "startedAt": {"type": "string", "format": "date-time", "nullable": True},
        "finishedAt": {"type": "string", "format": "date-time", "nullable": True},
        "conditions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "status"],
                "properties": {
                    "type": {"type": "string"},
                    "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                    "reason": {"type": "string"},
                    "message": {"type": "string"},
                    "lastTransitionTime": {"type": "string", "format": "date-time"},
                },
            },
        },
    },
    # kopf keeps its own bookkeeping under status (handler progress) unless told otherwise.
    "x-kubernetes-preserve-unknown-fields": True,
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Shards", "type": "string", "jsonPath": ".status.shardsProgress"},
    {"name": "Images", "type": "integer", "jsonPath": ".status.images.ok"},
    {"name": "Success %", "type": "number", "jsonPath": ".status.successRate"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
