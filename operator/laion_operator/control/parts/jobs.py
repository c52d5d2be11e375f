"""A part's jobs: asking the backend about them, stopping them, and the clocks that bound them
(spec.activeDeadlineSeconds, the retry backoff)."""

from __future__ import annotations

import asyncio
import calendar
import logging
import time

from ...contract import PHASES, Phase
from ...spec import PartSpec, SpecError
from ..backend import BackendError, Job
from ..lifecycle import delete_needs_backend
from .base import PartObject

log = logging.getLogger(__name__)
# How long a stopped job may take to be seen stopped before the operator says so and tries again later.
STOP_WAIT_SECONDS = 120.0


def _epoch(timestamp: str) -> float:
    """A status timestamp (resource.now) in seconds since the epoch."""
    return calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ"))


class Jobs(PartObject):
    async def job_state(self, job_id: str) -> Job:
        try:
            return await asyncio.to_thread(self.op.backend.state, self.owner, job_id)
        except Exception:
            self.op.metrics.ray_submission_errors.inc()
            raise

    async def stop_others(self, keep: str | None) -> None:
        """Stop every job of this part but `keep`, and return once none of them is active: whatever a
        crash, a failover or an edit while the operator was down left behind, one job at most runs.
        A part whose status names no job is let go when the backend cannot be asked (no Ray at all):
        only a crash between a submission and its status write leaves a job behind such a part."""
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        asked: set[str] = set()
        while True:
            try:
                jobs = await asyncio.to_thread(self.op.backend.jobs, self.owner)
            except BackendError as err:
                if self.status.get("submissionId") or keep:
                    raise
                log.info(
                    "part %s/%s: no job to stop known, and the backend cannot be asked: %s",
                    self.namespace,
                    self.name,
                    err,
                )
                return
            active = [j for j in jobs if j.id != keep and j.state.active]
            if not active:
                return
            for job in active:
                if job.id not in asked:
                    log.info(
                        "part %s/%s: stopping job %s (%s) before going on",
                        self.namespace,
                        self.name,
                        job.id,
                        job.state.value,
                    )
                    await asyncio.to_thread(self.op.backend.stop, self.owner, job.id)
                    asked.add(job.id)
            if time.monotonic() > deadline:
                raise BackendError(
                    f"jobs {', '.join(j.id for j in active)} of this part did not stop within "
                    f"{STOP_WAIT_SECONDS:.0f}s; asking again"
                )
            await asyncio.sleep(1)

    async def stop(self) -> None:
        """On delete: stop every job of the part and see them stopped (the finalizer goes only then),
        and give its slot back; the output stays. A part whose jobs were all seen stopped already (a
        settled one) goes even when Ray cannot be asked: Ray down or decommissioned must not leave it,
        its dataset and its namespace Terminating for good."""
        self.op.slots.release(self.key)
        # A submission in flight when the delete came: its job must be in the listing stop_others reads.
        await self.op.submissions_done(self.key)
        status = self.status
        phase = Phase(status["phase"]) if status.get("phase") in PHASES else None
        job_id = status.get("submissionId")
        if not delete_needs_backend(phase, job_id):
            try:
                await self.stop_others(keep=None)
            except BackendError as err:
                log.info("part %s/%s: deleted without asking Ray, its jobs all ended: %s", *self.key, err)
            return
        if phase is not None:
            await self.write(phase=Phase.STOPPING.value, message=f"stopping job {job_id}; finished output is kept")
        await self.stop_others(keep=None)

    def deadline_left(self, spec: PartSpec) -> float | None:
        """Seconds left of the run's spec.activeDeadlineSeconds (negative: passed); None: no deadline."""
        since = self.status.get("activeSince")
        if not spec.active_deadline_seconds or not since:
            return None
        return _epoch(since) + spec.active_deadline_seconds - time.time()

    def deadline_passed(self, spec: PartSpec) -> bool:
        left = self.deadline_left(spec)
        return left is not None and left < 0

    def retry_backoff(self, attempt: int) -> float:
        """How long the retry after attempt `attempt` waits: retryBackoffSeconds × 2^attempt, capped."""
        return self.capped(self.op.config.retry_backoff_seconds * 2**attempt)

    def retry_wait(self) -> float:
        """Seconds until a retry's backoff ends (0: no retry waits), from when the status says it was
        decided, so that a restarted operator keeps to it too; a spec change since ends it, and it is
        cut short where the run's deadline passes first (the next poll fails the part then)."""
        status = self.status
        retrying: dict = next((c for c in status.get("conditions") or [] if c.get("type") == "Retrying"), {})
        if (
            status.get("phase") != Phase.QUEUED.value
            or retrying.get("status") != "True"
            or status.get("observedGeneration") != self.generation
        ):
            return 0.0
        wait = _epoch(retrying["lastTransitionTime"]) + self.retry_backoff(int(status.get("retries") or 1) - 1)
        wait -= time.time()
        try:
            left = self.deadline_left(PartSpec.from_dict(self.body["spec"]))
        except SpecError:
            left = None
        return max(0.0, wait if left is None else min(wait, left + 1))
