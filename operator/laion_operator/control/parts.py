"""What the operator does for one LaionPart, from apply to a final phase; kopf only calls into here.

A part moves through: validate → wait for a slot (Queued) → check its output → submit its job
(idempotent id from uid, generation and attempt) → follow the job and the progress it persists
(Pending, Filtering, Downloading, Annotating) → Succeeded, or retry with backoff and resume, or Failed.

A spec change (new generation) of a running part stops its job and starts the new generation's job,
which resumes from the shards already finished; a change of source, columns or filter into the
same output cannot resume and is refused (phase Failed, reason FilterChanged) without touching it.

`spec.suspend: true` is such a change too: the job is stopped and the part waits in phase Suspended
until `false` resumes it from its finished shards. `spec.activeDeadlineSeconds` bounds a run (from its
first submission, retries included, reset on resume); past it the job is stopped and the part fails
with reason DeadlineExceeded.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import kopf

from ..contract import (MANIFEST, PROGRESS, RUNNING, SETTLED, TERMINAL, ExitCode, Phase, Progress, Verification,
                        fingerprint)
from ..spec import PartSpec, SpecError
from ..storage import Store
from . import kube
from .config import OperatorConfig
from .crash import crash_at
from .metrics import Metrics
from .rayjobs import JobsAPIBackend, JobState, KubeRayBackend, submission_id
from .status import cr_status

log = logging.getLogger(__name__)
# A settled part also looks again this often, should a watch event ever be missed.
SETTLED_RECHECK_SECONDS = 60.0


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Slots:
    """The operator-wide limit on running parts; the others wait, higher spec.priority first, then
    oldest first (phase Queued)."""

    def __init__(self, limit: int, on_change: Callable[[int], None] = lambda n: None):
        self.limit = limit
        self.running: set = set()
        self.waiting: dict = {}
        self.on_change = on_change
        self._cond = asyncio.Condition()

    def adopt(self, key) -> None:
        """A part whose job already runs (found at start-up) holds a slot without queueing."""
        self.running.add(key)

    async def acquire(self, key, created: str, on_queued: Callable[[], Awaitable[None]], priority: int = 0,
                      give_up: Callable[[], bool] = lambda: False) -> bool:
        """Take a slot; False if `give_up()` turned true while waiting (a spec change, suspend, shutdown)."""
        async with self._cond:
            if key in self.running:
                return True
            self.waiting[key] = (-priority, created, key)
            self.on_change(len(self.waiting))
            queued = False
            try:
                while len(self.running) >= self.limit or min(self.waiting.values())[-1] != key:
                    if give_up():
                        return False
                    if not queued:
                        queued = True
                        await on_queued()
                    try:  # woken by a release, or after a while to look at give_up() again
                        await asyncio.wait_for(self._cond.wait(), timeout=1.0)
                    except asyncio.TimeoutError:
                        pass
            finally:
                self.waiting.pop(key, None)
                self.on_change(len(self.waiting))
                self._cond.notify_all()  # the next in line may be another part now
            self.running.add(key)
            return True

    async def release(self, key) -> None:
        async with self._cond:
            self.running.discard(key)
            if self.waiting.pop(key, None) is not None:
                self.on_change(len(self.waiting))
            self._cond.notify_all()


@dataclass
class Operator:
    """What every part shares: configuration, the job backend, the slots and the metrics.
    Made once at start-up and handed to every handler through kopf's memo."""

    config: OperatorConfig
    backend: JobsAPIBackend | KubeRayBackend
    slots: Slots
    metrics: Metrics
    # Settled parts sleep until their object changes: a watch event sets the part's event.
    changes: dict = field(default_factory=dict)

    def changed(self, key) -> None:
        """A watch event for the part `key` (controller.wake): a settled part looks again."""
        event = self.changes.get(key)
        if event is not None:
            event.set()


def condition(kind: str, ok: bool, reason: str, message: str, previous: list[dict]) -> dict:
    """A Kubernetes condition whose lastTransitionTime moves only when its status does."""
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now()
    return {"type": kind, "status": status, "reason": reason, "message": message[:1000],
            "lastTransitionTime": since}


def verified_condition(progress: Progress | None, previous: list[dict]) -> dict | None:
    """The `Verified` condition once the job's verify stage has read every shard back (None before)."""
    if not progress or not progress.verified:
        return None
    verified = Verification.from_json(progress.verified)
    return condition("Verified", verified.ok, "ShardsReadBack" if verified.ok else "ShardMismatch",
                     verified.message, previous)


class Part:
    """One LaionPart followed by one kopf daemon; `body` is kopf's live view of the object."""

    def __init__(self, op: Operator, body, stopped):
        self.op, self.body, self.stopped = op, body, stopped
        self.namespace = body["metadata"]["namespace"]
        self.name = body["metadata"]["name"]
        self.uid = body["metadata"]["uid"]
        self.key = (self.namespace, self.name)
        self.owner = {"namespace": self.namespace, "name": self.name, "uid": self.uid}
        # What this process last wrote: the watch stream may not have brought it back yet.
        self.written: dict = {}

    # --- reading and writing the object -------------------------------------------------------

    @property
    def generation(self) -> int:
        return int(self.body["metadata"].get("generation") or 1)

    @property
    def status(self) -> dict:
        return {**(self.body.get("status") or {}), **self.written}

    async def write(self, **fields) -> None:
        """Patch the status (merge), keeping conditions whole and the metrics in step."""
        conditions = list(self.status.get("conditions") or [])
        for new in fields.pop("conditions", []):
            conditions = [c for c in conditions if c.get("type") != new["type"]] + [new]
        patch = {**fields, "conditions": conditions}
        try:
            await asyncio.to_thread(kube.patch_status, self.namespace, self.name, patch)
        except kube.KubeError as err:
            self.op.metrics.kube_api_errors.inc()
            if err.status == 404:  # deleted meanwhile
                return
            raise
        self.written.update(patch)

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        """A Kubernetes Event on the LaionPart (`kubectl describe lp`), posted in the background by kopf."""
        kopf.event(self.body, type="Warning" if warning else "Normal", reason=reason, message=message[:1000])

    async def fail(self, reason: str, message: str) -> None:
        log.warning("part %s/%s failed: %s: %s", self.namespace, self.name, reason, message)
        conditions = self.status.get("conditions") or []
        await self.write(phase=Phase.FAILED.value, message=message, observedGeneration=self.generation,
                         conditions=[condition("Complete", False, reason, message, conditions),
                                     condition("Failed", True, reason, message, conditions)])
        self.event(reason, message, warning=True)
        self.op.metrics.observe_part(self.namespace, self.name, Phase.FAILED, None, self.status.get("retries", 0))

    # --- the part's life -----------------------------------------------------------------------

    async def follow(self) -> None:
        """Run until the operator stops or the object goes away; final parts wait for spec changes."""
        # This daemon's own event: one for the same name still stopping must not keep or drop it.
        change = self.op.changes[self.key] = asyncio.Event()
        try:
            while not self.stopped:
                change.clear()  # before reading the object: a change from here on wakes the wait below
                status = self.status
                if status.get("phase") in SETTLED and status.get("observedGeneration") == self.generation:
                    await self._observe_final()
                    await self._wait_for_change(change)
                    continue
                try:
                    await self.run_generation(self.generation)
                except (RuntimeError, OSError, kube.KubeError) as err:
                    # Ray or the API server unreachable for a while: say so, and try again.
                    log.warning("part %s/%s: %s; retrying in %ss", self.namespace, self.name, err,
                                self.op.config.poll_seconds)
                    try:
                        await self.write(message=f"retrying after: {str(err)[:500]}")
                    except kube.KubeError:
                        pass  # the API server refuses this write too: the next round tries again
                    await self.stopped.wait(self.op.config.poll_seconds)
        finally:
            if self.op.changes.get(self.key) is change:
                del self.op.changes[self.key]
            await self.op.slots.release(self.key)

    async def _wait_for_change(self, change: asyncio.Event) -> None:
        """Sleep until the object changes (a spec edit, suspend or resume), the operator stops, or
        SETTLED_RECHECK_SECONDS pass: a settled part never polls, so many finished parts cost an idle
        operator nothing."""
        waits = [asyncio.ensure_future(change.wait()), asyncio.ensure_future(self.stopped.wait())]
        try:
            await asyncio.wait(waits, timeout=SETTLED_RECHECK_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _observe_final(self) -> None:
        if self.key in self.op.metrics.parts():
            return
        try:  # after an operator restart, the counters come back from what the job persisted
            spec = PartSpec.from_dict(self.body["spec"])
            progress = await self.read_progress(spec, await self.read_secret(spec))
        except Exception:  # noqa: BLE001 - metrics of a finished part are best effort
            progress = None
        self.op.metrics.observe_part(self.namespace, self.name, self.status["phase"], progress,
                                     self.status.get("retries", 0))

    async def read_secret(self, spec: PartSpec) -> dict[str, str] | None:
        """The storage credentials, and the hub token of a part with spec.latents.hubTokenSecret: both
        go to the job as credentials do (see credentials.py), never into its spec or entrypoint."""
        token = spec.latents.hub_token_secret if spec.latents else None
        if not spec.output.credentials_secret and not token:
            return None
        secret: dict[str, str] = {}
        if spec.output.credentials_secret:
            secret.update(await asyncio.to_thread(kube.read_secret, self.namespace, spec.output.credentials_secret))
        if token:
            try:
                values = await asyncio.to_thread(kube.read_secret, self.namespace, token)
            except kube.KubeError as err:
                raise kube.KubeError(f"spec.latents.hubTokenSecret {token!r}: {err}") from err
            if values.get("HF_TOKEN"):
                secret["HF_TOKEN"] = values["HF_TOKEN"]
        return secret

    async def read_progress(self, spec: PartSpec, secret, strict: bool = False) -> Progress | None:
        """The job's persisted progress; None when there is none yet, or when it cannot be read (a damaged
        file or an unreachable store, which the job's next write repairs) unless `strict`, which raises."""
        def read():
            store = Store(spec.output, secret=secret or {})
            try:
                data = store.read_json(PROGRESS)
                return Progress.from_json(data) if data else None
            except Exception as err:  # noqa: BLE001 - any reason means the same: keep the status as it is
                message = f"cannot read {store.url(PROGRESS)}: {type(err).__name__}: {err}"
                if strict:
                    raise RuntimeError(message) from None
                log.warning("part %s/%s: %s", self.namespace, self.name, message)
                return None

        return await asyncio.to_thread(read)

    async def run_generation(self, generation: int) -> None:
        status = self.status
        try:
            spec = PartSpec.from_dict(self.body["spec"])
        except SpecError as err:
            await self.fail("InvalidSpec", str(err))
            return
        if spec.suspend:
            await self.suspend(generation)
            return
        try:
            secret = await self.read_secret(spec)
        except kube.KubeError as err:
            self.op.metrics.kube_api_errors.inc()
            await self.fail("CredentialsUnavailable", str(err) if str(err).startswith("spec.") else
                            f"spec.output.credentialsSecret {spec.output.credentials_secret!r}: {err}")
            return
        same_generation = status.get("observedGeneration") == generation
        attempt = int(status.get("retries") or 0) if same_generation else 0
        job_id = submission_id(self.uid, generation, attempt)

        job = await self.job_state(job_id)
        if job.state == "MISSING":
            acquired = await self.op.slots.acquire(
                self.key, self.body["metadata"].get("creationTimestamp", ""), on_queued=self._queued,
                priority=spec.priority, give_up=lambda: bool(self.stopped) or self.generation != generation)
            if not acquired or self.stopped or self.generation != generation:
                return
            if not await self.output_matches(spec, secret):
                return
            crash_at("before-submit")
            await self.submit(job_id, spec, secret, generation, attempt)
        else:
            self.op.slots.adopt(self.key)
            log.info("part %s/%s: following its running job %s", self.namespace, self.name, job_id)

        job = await self.watch(job_id, spec, secret, generation, attempt)
        if job is None:  # operator stopping, object deleted, or a new generation took over
            return
        if job.state == "SUCCEEDED":
            crash_at("annotating")
            # The final counts are the job's last word: an unreadable progress is retried (follow), not skipped.
            progress = await self.read_progress(spec, secret, strict=True)
            await self.publish(Phase.SUCCEEDED, progress, job_id, generation, attempt, finished=True)
            self.event("Succeeded", progress.message if progress and progress.message else f"job {job_id} succeeded")
            await self.op.slots.release(self.key)
            return
        retryable = job.state != "STOPPED" and job.exit_code != ExitCode.BAD_INPUT
        if retryable and attempt < spec.max_retries:
            delay = self.op.config.retry_backoff_seconds * 2 ** attempt
            message = f"job {job_id} {job.state.lower()}: {job.message[-300:]}; retry {attempt + 1} of " \
                      f"{spec.max_retries} in {delay:.0f}s, resuming from finished shards"
            log.warning("part %s/%s: %s", self.namespace, self.name, message)
            await self.write(retries=attempt + 1, message=message, observedGeneration=generation)
            self.event("Retrying", message, warning=True)
            await self.stopped.wait(delay)
            return
        reason = "RetriesExhausted" if retryable else "JobFailed"
        if job.exit_code == ExitCode.STORAGE_UNAVAILABLE:
            reason = "StorageUnavailable"  # the job's log, in the message, names the endpoint
        await self.fail(reason, f"job {job_id} {job.state.lower()}: {job.message[-1000:]}")
        await self.op.slots.release(self.key)

    async def suspend(self, generation: int) -> None:
        """Stop the job (if any) and wait in phase Suspended; a finished part stays Succeeded."""
        await self.op.slots.release(self.key)
        job_id = self.status.get("submissionId")
        if job_id:
            await asyncio.to_thread(self.op.backend.stop, self.owner, job_id)
            # Suspended means nothing writes into the output any more: a resume must not race the old job.
            for _ in range(120):
                job = await self.job_state(job_id)
                if self.stopped or job.terminal or job.state == "MISSING":  # kuberay: the RayJob is deleted
                    break
                await self.stopped.wait(1)
        if self.status.get("phase") == Phase.SUCCEEDED.value:
            await self.write(observedGeneration=generation)
            return
        message = f"suspended (spec.suspend); job {job_id} stopped, finished shards kept" if job_id else \
            "suspended (spec.suspend) before its job started"
        await self.write(phase=Phase.SUSPENDED.value, observedGeneration=generation, message=message,
                         activeSince=None)
        self.event("Suspended", message)
        self.op.metrics.observe_part(self.namespace, self.name, Phase.SUSPENDED, None, self.status.get("retries", 0))

    def deadline_passed(self, spec: PartSpec) -> bool:
        since = self.status.get("activeSince")
        if not spec.active_deadline_seconds or not since:
            return False
        started = calendar.timegm(time.strptime(since, "%Y-%m-%dT%H:%M:%SZ"))
        return time.time() - started > spec.active_deadline_seconds

    async def _queued(self) -> None:
        running = len(self.op.slots.running)
        message = (f"waiting for one of {running} running parts to finish "
                   f"(maxConcurrentParts {self.op.config.max_concurrent_parts})")
        await self.write(phase=Phase.QUEUED.value, observedGeneration=self.generation, message=message)
        self.event("Queued", message)

    async def output_matches(self, spec: PartSpec, secret) -> bool:
        """Refuse a filter change into an output that holds shards of another filter."""
        def manifest():
            return Store(spec.output, secret=secret or {}).read_json(MANIFEST)

        try:
            done = await asyncio.to_thread(manifest)
        except Exception as err:  # noqa: BLE001 - an unreachable output is the job's to report
            log.info("part %s/%s: output not readable yet: %s", self.namespace, self.name, err)
            return True
        if done and done.get("fingerprint") != fingerprint(spec):
            await self.op.slots.release(self.key)
            await self.fail("FilterChanged",
                            f"{spec.output.uri} holds shards filtered with another source, columns or filter; "
                            "set a new spec.output.uri (or remove the old output) to run the new filter")
            return False
        return True

    async def job_state(self, job_id: str) -> JobState:
        try:
            return await asyncio.to_thread(self.op.backend.state, self.owner, job_id)
        except Exception:
            self.op.metrics.ray_submission_errors.inc()
            raise

    async def submit(self, job_id: str, spec: PartSpec, secret, generation: int, attempt: int) -> None:
        try:
            await asyncio.to_thread(self.op.backend.submit, self.owner, job_id, spec, secret)
        except Exception:
            self.op.metrics.ray_submission_errors.inc()
            raise
        crash_at("after-submit")
        log.info("part %s/%s: submitted job %s (generation %d, attempt %d)",
                 self.namespace, self.name, job_id, generation, attempt)
        conditions = self.status.get("conditions") or []
        message = f"job {job_id} submitted (generation {generation}, attempt {attempt})"
        # The deadline counts from the generation's first submission: retries spend it, a resume resets it.
        since = {"activeSince": now()} if attempt == 0 else {}
        await self.write(phase=Phase.PENDING.value, submissionId=job_id, observedGeneration=generation,
                         retries=attempt, output=spec.output.uri, message=message, **since,
                         conditions=[condition("Submitted", True, "JobSubmitted", job_id, conditions),
                                     condition("Failed", False, "Running", "", conditions)])
        self.event("Submitted", message)

    async def watch(self, job_id: str, spec: PartSpec, secret, generation: int, attempt: int) -> JobState | None:
        """Follow the job until it ends; None when following must stop without an outcome."""
        while not self.stopped:
            if self.generation != generation:
                log.info("part %s/%s: spec changed to generation %d; stopping job %s to resume under it",
                         self.namespace, self.name, self.generation, job_id)
                await asyncio.to_thread(self.op.backend.stop, self.owner, job_id)
                return None
            job = await self.job_state(job_id)
            if job.terminal:
                return job
            if self.deadline_passed(spec):
                await asyncio.to_thread(self.op.backend.stop, self.owner, job_id)
                await self.op.slots.release(self.key)
                await self.fail("DeadlineExceeded",
                                f"ran longer than spec.activeDeadlineSeconds ({spec.active_deadline_seconds}s); "
                                f"job {job_id} stopped, its finished shards are kept")
                return None
            progress = await self.read_progress(spec, secret)
            phase = Phase(progress.phase) if progress and progress.phase in RUNNING else Phase.PENDING
            if progress and progress.phase == Phase.SUCCEEDED:  # the summary is written, the job not yet done
                phase = Phase.ANNOTATING
            if phase == Phase.ANNOTATING:
                crash_at("annotating")
            await self.publish(phase, progress, job_id, generation, attempt)
            await self.stopped.wait(self.op.config.poll_seconds)
        return None

    async def publish(self, phase: Phase, progress: Progress | None, job_id: str, generation: int, attempt: int,
                      finished: bool = False) -> None:
        fields = cr_status(progress) if progress else {}
        if fields:
            # A merge patch keeps keys it does not name: a reason no longer counted (after a heal) is removed.
            old = ((self.status.get("images") or {}).get("failedByReason") or {})
            gone = {reason: None for reason in old if reason not in fields["images"]["failedByReason"]}
            fields["images"]["failedByReason"].update(gone)
        conditions = self.status.get("conditions") or []
        message = progress.message if progress and progress.message else f"job {job_id} {phase.value.lower()}"
        extra: dict = {"conditions": []}
        if finished:
            extra["conditions"] = [condition("Complete", True, "Succeeded", message, conditions),
                                   condition("Failed", False, "Succeeded", "", conditions)]
        verified = verified_condition(progress, conditions)
        if verified:
            extra["conditions"].append(verified)
        await self.write(phase=phase.value, submissionId=job_id, observedGeneration=generation, retries=attempt,
                         message=message, **fields, **extra)
        self.op.metrics.observe_part(self.namespace, self.name, phase, progress, attempt)

    async def stop(self) -> None:
        """On delete: stop the running job; the output stays where it is."""
        job_id = self.status.get("submissionId")
        if not job_id:
            return
        if self.status.get("phase") not in TERMINAL:
            await self.write(phase=Phase.STOPPING.value, message=f"stopping job {job_id}; finished output is kept")
        await asyncio.to_thread(self.op.backend.stop, self.owner, job_id)
        log.info("part %s/%s: stopped job %s", self.namespace, self.name, job_id)
