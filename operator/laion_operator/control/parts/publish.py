"""Publishing a part's status: its counts, phase and conditions as the job's progress says, the
Stalled condition, and the final Succeeded or Failed."""

from __future__ import annotations

import logging
import time
from typing import Any

from ...contract import Phase, Progress, Verification
from ...spec import PartSpec
from ..lifecycle import Reason
from ..metrics import stall_counts
from ..resource import condition
from ..status import cr_status
from .base import PartObject

log = logging.getLogger(__name__)
# Counts that only grow within one output: a new attempt's filtering must not show them dropping to 0.
# (A heal lowers failed counts: its final status, written unfloored, says so.)
_MONOTONE = (
    ("rowsRead",),
    ("rowsKept",),
    ("bytesWritten",),
    ("images", "ok"),
    ("images", "failed"),
    ("shards", "total"),
    ("shards", "done"),
)


def verified_condition(progress: Progress | None, previous: list[dict]) -> dict | None:
    """The `Verified` condition once the job's verify stage has read every shard back (None before)."""
    if not progress or not progress.verified:
        return None
    verified = Verification.from_json(progress.verified)
    return condition(
        "Verified", verified.ok, "ShardsReadBack" if verified.ok else "ShardMismatch", verified.message, previous
    )


def _get(data: dict, path: tuple[str, ...]) -> Any:
    value: Any = data
    for key in path:
        value = (value or {}).get(key)
    return value


def _set(data: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value


class Publishing(PartObject):
    """A part's status writes: what `kubectl get laionparts` and its Events say."""

    def moved(self) -> None:
        self.moved_at = time.monotonic()

    def stalled(self, spec: PartSpec, progress: Progress | None) -> bool:
        """Whether the counts have stood still for spec.stallSeconds (measured by this process)."""
        counts = None if progress is None else stall_counts(progress)
        if counts != self.last_counts:
            self.last_counts = counts
            self.moved()
        return time.monotonic() - self.moved_at > spec.stall_seconds

    async def publish(
        self,
        phase: Phase,
        progress: Progress | None,
        job_id: str,
        finished: bool = False,
        stalled: bool = False,
        message: str | None = None,
    ) -> None:
        status = self.status
        fields = cr_status(progress) if progress else {}
        if fields and not finished and status.get("output") == (self.body["spec"].get("output") or {}).get("uri"):
            # A new attempt counts up again from the finished shards: show what was done meanwhile.
            for path in _MONOTONE:
                _set(fields, path, max(_get(fields, path) or 0, _get(status, path) or 0))
            reasons = fields["images"]["failedByReason"]
            for reason, n in (_get(status, ("images", "failedByReason")) or {}).items():
                reasons[reason] = max(reasons.get(reason, 0), n or 0)
            fields["shardsProgress"] = f"{fields['shards']['done']}/{fields['shards']['total']}"
        conditions = status.get("conditions") or []
        message = message or (
            progress.message if progress and progress.message else f"job {job_id} {phase.value.lower()}"
        )
        extra: list[dict] = []
        if finished:
            extra += [
                condition("Complete", True, "Succeeded", message, conditions),
                condition("Failed", False, "Succeeded", "", conditions),
            ]
        verified = verified_condition(progress, conditions)
        if verified:
            extra.append(verified)
        was_stalled = any(c.get("type") == "Stalled" and c.get("status") == "True" for c in conditions)
        if stalled or was_stalled:
            extra.append(self.stalled_condition(stalled, job_id, conditions))
            if stalled and not was_stalled:
                stall = extra[-1]["message"]
                log.warning("part %s/%s: %s", self.namespace, self.name, stall)
                self.event("Stalled", stall, warning=True)
        await self.write(phase=phase.value, submissionId=job_id, message=message, **fields, conditions=extra)
        self.op.metrics.observe_part(
            self.namespace, self.name, phase, progress, self.status.get("retries", 0), stalled=stalled
        )

    def stalled_condition(self, stalled: bool, job_id: str, conditions: list[dict]) -> dict:
        stall = (
            f"no count has moved for {time.monotonic() - self.moved_at:.0f}s "
            f"(spec.stallSeconds); job {job_id} keeps running"
        )
        return condition(
            "Stalled", stalled, "NoProgress" if stalled else "Progressing", stall if stalled else "", conditions
        )

    async def fail(self, reason: Reason, message: str, generation: int) -> None:
        """Failed for `generation`, the one the failure was decided on: an edit made while the part was
        being failed (its job stopping) is another generation, which the next poll runs or refuses."""
        log.warning("part %s/%s failed: %s: %s", self.namespace, self.name, reason.value, message)
        conditions = self.status.get("conditions") or []
        await self.write(
            phase=Phase.FAILED.value,
            message=message,
            observedGeneration=generation,
            conditions=[
                condition("Complete", False, reason.value, message, conditions),
                condition("Failed", True, reason.value, message, conditions),
            ],
        )
        self.event(reason.value, message, warning=True)
        self.op.metrics.observe_part(self.namespace, self.name, Phase.FAILED, None, self.status.get("retries", 0))
