"""The LaionPart resource: its CRD (spec schema, status schema, printer columns) and its status
fields made from the progress the job persists (`contract.PROGRESS`).

Because the progress lives beside the data, the operator, its metrics and a restarted operator all
read the same truth.
"""

from __future__ import annotations

import time

from ..contract import PHASES, Progress


def _iso(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None


def cr_status(progress: Progress) -> dict:
    """The LaionPart status fields that come from the job's persisted progress."""
    status = {
        "rowsRead": progress.rows_read,
        "rowsKept": progress.rows_kept,
        "shards": {"total": progress.shards_total, "done": progress.shards_done, "failed": progress.shards_failed},
        "shardsProgress": f"{progress.shards_done}/{progress.shards_total}",
        "images": {
            "ok": progress.images_ok,
            "failed": progress.images_failed,
            "failedByReason": dict(progress.failed_by_reason),
            "optedOutBy": dict(progress.opted_out_by),
        },
        "bytesWritten": progress.bytes_written,
        "successRate": progress.success_rate,
        "startedAt": _iso(progress.started_at),
        "finishedAt": _iso(progress.finished_at),
    }
    for stage in ("latents", "embeddings"):  # already in the status's shape (stages/encoding.py's Counts)
        if getattr(progress, stage):
            status[stage] = dict(getattr(progress, stage))
    return status


COUNT_SCHEMA = {"type": "integer", "minimum": 0}
# Shared by the LaionPart's and the LaionDataset's status.
IMAGES_SCHEMA = {
    "type": "object",
    "properties": {
        "ok": COUNT_SCHEMA,
        "failed": COUNT_SCHEMA,
        "failedByReason": {"type": "object", "additionalProperties": COUNT_SCHEMA},
        "optedOutBy": {"type": "object", "additionalProperties": COUNT_SCHEMA},
    },
}
CONDITIONS_SCHEMA = {
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
}

# A model stage's counts (latents, embeddings).
ENCODED = {
    "shards": {"type": "object", "properties": {"total": COUNT_SCHEMA, "done": COUNT_SCHEMA, "failed": COUNT_SCHEMA}},
    "written": COUNT_SCHEMA,
    "skipped": COUNT_SCHEMA,
    "perSecond": {"type": "number", "minimum": 0},
}

STATUS_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "phase": {"type": "string", "enum": PHASES},
        "message": {"type": "string"},
        "observedGeneration": {"type": "integer"},
        "submissionId": {"type": "string"},
        "retries": COUNT_SCHEMA,
        "specHash": {
            "type": "string",
            "description": "Digest of the spec fields the output depends on, of the run that made it.",
        },
        "output": {"type": "string"},
        "activeSince": {
            "type": "string",
            "format": "date-time",
            "nullable": True,
            "description": "When the current run was first submitted (spec.activeDeadlineSeconds).",
        },
        "rowsRead": COUNT_SCHEMA,
        "rowsKept": COUNT_SCHEMA,
        "shards": {
            "type": "object",
            "properties": {"total": COUNT_SCHEMA, "done": COUNT_SCHEMA, "failed": COUNT_SCHEMA},
        },
        "shardsProgress": {"type": "string"},
        "images": IMAGES_SCHEMA,
        "bytesWritten": COUNT_SCHEMA,
        "successRate": {"type": "number", "description": "Percent of attempted images downloaded."},
        "latents": {
            "type": "object",
            "description": "The latents stage (spec.latents): shards, samples encoded, undecodable images, rate.",
            "properties": ENCODED,
        },
        "embeddings": {
            "type": "object",
            "description": "The embeddings stage (spec.embeddings): shards, samples embedded, undecodable images, rate",
            "properties": ENCODED,
        },
        "startedAt": {"type": "string", "format": "date-time", "nullable": True},
        "finishedAt": {"type": "string", "format": "date-time", "nullable": True},
        "conditions": CONDITIONS_SCHEMA,
    },
    # kopf keeps its own bookkeeping under status (handler progress) unless told otherwise.
    "x-kubernetes-preserve-unknown-fields": True,
}

PRINTER_COLUMNS: list[dict] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Shards", "type": "string", "jsonPath": ".status.shardsProgress"},
    {"name": "Images", "type": "integer", "jsonPath": ".status.images.ok"},
    {"name": "Success %", "type": "number", "jsonPath": ".status.successRate"},
    {"name": "Latents", "type": "integer", "jsonPath": ".status.latents.written", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
