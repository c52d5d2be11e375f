"""What the operator does for one LaionPart, from apply to a final phase; kopf only calls into here.

A part moves through: validate → wait for a slot (Queued) → check its output → submit its job
(idempotent id from uid, generation and attempt) → follow the job and the progress it persists
(Pending, Filtering, Downloading, Annotating) → Succeeded, or retry with backoff and resume, or Failed.
Each poll reads the facts (phase, job state, spec change) and lets `lifecycle.transition` decide;
the methods here only carry the step out.

A spec change (new generation) of what the output depends on stops the part's job and starts the new
generation's job, which resumes from the shards already finished; a change of source, columns or filter
into the same output cannot resume and is refused (phase Failed, reason FilterChanged) without touching
it. Any other change (priority, maxRetries, activeDeadlineSeconds, stallSeconds, suspend: false) takes
effect without restarting the job, and never re-runs a Succeeded part.

`spec.suspend: true` stops the job and the part waits in phase Suspended until `false` resumes it from
its finished shards. `spec.activeDeadlineSeconds` bounds a run (from its first submission, retries
included, reset by a new run); past it the job is stopped and the part fails with reason
DeadlineExceeded.
"""

from __future__ import annotations

import asyncio
import calendar
import copy
import logging
import time
from dataclasses import dataclass, field

from ..contract import MANIFEST, PHASES, PROGRESS, RUNNING, ExitCode, Phase, Progress, Verification, fingerprint
from ..spec import PartSpec, SpecError
from ..storage import Store
from . import kube
from .backend import Backend, BackendError, CredentialsRefused, Job, JobState, submission_id
from .config import OperatorConfig
from .crash import crash_at
from .lifecycle import (
    SETTLED,
    Action,
    Change,
    Facts,
    Slot,
    Step,
    change_of,
    delete_needs_backend,
    output_hash,
    transition,
)
from .metrics import Metrics
from .resource import Resource, condition, now
from .slots import Slots
from .status import cr_status

log = logging.getLogger(__name__)
# A settled part also looks again this often, should a watch event ever be missed.
SETTLED_RECHECK_SECONDS = 60.0
# How long a stopped job may take to be seen stopped before the operator says so and tries again later.
STOP_WAIT_SECONDS = 120.0
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

__all__ = ["Operator", "Part", "Slots", "condition", "now", "verified_condition"]


@dataclass
class Operator:
    """What every part shares: configuration, the job backend, the slots and the metrics.
    Made once at start-up and handed to every handler through kopf's memo."""

    config: OperatorConfig
    backend: Backend
    slots: Slots
    metrics: Metrics
    # Settled parts sleep until their object changes: a watch event sets the part's event.
    changes: dict = field(default_factory=dict)
    # Each part's backend submission in flight (a thread that a cancelled daemon cannot stop).
    submitting: dict = field(default_factory=dict)

    async def submitted(self, key, submit, *args) -> None:
        """Run the blocking `submit(*args)` in a thread, known to `submissions_done` until it returns."""
        task = asyncio.ensure_future(asyncio.to_thread(submit, *args))
        self.submitting.setdefault(key, set()).add(task)

        def done(_) -> None:
            if not task.cancelled():
                task.exception()  # seen here: the caller, cancelled meanwhile, may never look
            left = self.submitting.get(key, set())
            left.discard(task)
            if not left:
                self.submitting.pop(key, None)

        task.add_done_callback(done)
        await asyncio.shield(task)

    async def submissions_done(self, key) -> None:
        """Wait for the part's submissions in flight: a delete lists its jobs only after them."""
        pending = self.submitting.get(key)
        if pending:
            await asyncio.wait(list(pending))

    def changed(self, key) -> None:
        """A watch event for the part `key` (controller.wake): a sleeping part looks again."""
        event = self.changes.get(key)
        if event is not None:
            event.set()


def verified_condition(progress: Progress | None, previous: list[dict]) -> dict | None:
    """The `Verified` condition once the job's verify stage has read every shard back (None before)."""
    if not progress or not progress.verified:
        return None
    verified = Verification.from_json(progress.verified)
    return condition(
        "Verified", verified.ok, "ShardsReadBack" if verified.ok else "ShardMismatch", verified.message, previous
    )


@dataclass(frozen=True)
class Decision:
    """One poll's decision and every fact it was made on, read together (Part.decide): the step is
    carried out from these, and records `generation`, never the object as it is by then."""

    facts: Facts
    step: Step
    document: dict  # the spec of that generation as the API server stores it (its output_hash)
    spec: PartSpec | None  # parsed; None when invalid
    job: Job  # the status' job, as the backend reported it
    attempt: int  # status.retries
    invalid: str = ""  # why the spec does not validate

    @property
    def generation(self) -> int:
        return self.facts.generation


class WaitingForCredentials(Exception):
    """The part's Secret is not there (yet) or not readable: the part waits, as a Pod waits for its Secret."""


def _epoch(timestamp: str) -> float:
    """A status timestamp (resource.now) in seconds since the epoch."""
    return calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ"))


def _get(data: dict, path: tuple[str, ...]):
    for key in path:
        data = (data or {}).get(key)
    return data


def _set(data: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value


class Part(Resource):
    """One LaionPart followed by one kopf daemon."""

    def __init__(self, op: Operator, body, stopped):
        super().__init__(op, body, stopped)
        self.uid = body["metadata"]["uid"]
        self.owner = {"namespace": self.namespace, "name": self.name, "uid": self.uid}
        self.adopted = False  # stray jobs looked for since this daemon started following
        self.credentials_backoff = 0.0
        self.moved_at = time.monotonic()  # when the counts last moved (spec.stallSeconds)
        self.last_counts: tuple | None = None

    # --- the part's life -----------------------------------------------------------------------

    async def follow(self) -> None:
        """Run until the operator stops or the object goes away; settled parts wait for spec changes."""
        # This daemon's own event: one for the same name still stopping must not keep or drop it.
        change = self.op.changes[self.key] = asyncio.Event()
        try:
            while not self.stopped:
                change.clear()  # before reading the object: a change from here on wakes the sleeps below
                generation = self.generation
                wait = self.retry_wait()
                if wait > 0:  # suspend, a spec change or delete end it; the deadline bounds it
                    await self.sleep(change, wait, generation)
                    continue
                try:
                    step = await self.reconcile()
                except WaitingForCredentials:
                    self.credentials_backoff = self._capped(2 * self.credentials_backoff or self.op.config.poll_seconds)
                    await self.sleep(change, self.credentials_backoff, generation)
                    continue
                except (BackendError, OSError, kube.KubeError) as err:
                    # Ray or the API server unreachable for a while: say so, and try again.
                    log.warning(
                        "part %s/%s: %s; retrying in %ss", self.namespace, self.name, err, self.op.config.poll_seconds
                    )
                    try:
                        await self.write(message=f"retrying after: {str(err)[:500]}")
                    except kube.KubeError:
                        pass  # the API server refuses this write too: the next round tries again
                    await self.sleep(change, self.op.config.poll_seconds, generation)
                    continue
                self.credentials_backoff = 0.0
                if step.action is Action.WAIT:
                    await self._observe_final()
                    await self.sleep(change, SETTLED_RECHECK_SECONDS, generation, any_change=True)
                elif step.action in (Action.SUBMIT, Action.FOLLOW):
                    await self.sleep(change, self.op.config.poll_seconds, generation)
                # SUCCEED, FAIL, SUSPEND: the next round finds the part settled and waits there; RETRY:
                # it waits out the backoff (retry_wait)
        finally:
            if self.op.changes.get(self.key) is change:
                del self.op.changes[self.key]
            self.op.slots.release(self.key)
            # A pause, a failover or a delete: what other replicas did meanwhile is listed again.
            self.op.slots.forget_listing()

    async def sleep(self, change: asyncio.Event, seconds: float, generation: int, any_change: bool = False) -> None:
        """Sleep `seconds`, less if the operator stops, the object goes, or its spec changes from
        `generation` (any watch event at all with `any_change`): a settled part never polls, so many
        finished parts cost an idle operator nothing, and a backoff ends when its reason does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.stopped and self.generation == generation:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            waits = [asyncio.ensure_future(change.wait()), asyncio.ensure_future(self.stopped.wait())]
            try:
                await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            if change.is_set():
                if any_change:
                    return
                change.clear()  # our own status write coming back, most likely: the generation tells

    def _capped(self, seconds: float) -> float:
        return min(seconds, self.op.config.retry_backoff_max_seconds)

    async def reconcile(self) -> Step:
        """One poll: read the facts, decide with lifecycle.transition, carry the step out."""
        d = await self.decide()
        step = d.step
        if step.slot is Slot.RELEASE:  # given back in the same step that leaves the running phases
            self.op.slots.release(self.key)
        elif step.slot is Slot.HOLD:
            self.op.slots.adopt(self.key)
        if step.action is not Action.WAIT:
            log.debug("part %s/%s: %s -> %s", self.namespace, self.name, d.facts, step)

        if step.action is Action.WAIT:
            await self._settle(d)
        elif step.action is Action.SUBMIT:
            await self._submit(d)
        elif step.action is Action.FOLLOW:
            await self._follow(d)
        elif step.action is Action.SUCCEED:
            await self._succeed(d.spec, d.job)
        elif step.action is Action.RETRY:
            await self._retry(d)
        elif step.action is Action.SUSPEND:
            await self._suspend(d)
        else:
            await self._fail_step(d)
        return step

    async def decide(self) -> Decision:
        # The object as one snapshot, read with no await in between: kopf's body is live, and an edit
        # made while the step is carried out is the next poll's to decide, never this step's to record.
        status, generation = dict(self.status), self.generation
        document = copy.deepcopy(dict(self.body["spec"]))
        phase = Phase(status["phase"]) if status.get("phase") in PHASES else None
        spec: PartSpec | None = None
        invalid = ""
        try:
            spec = PartSpec.from_dict(document)
        except SpecError as err:
            invalid = str(err)
        if spec is None:
            change = Change.NONE if status.get("observedGeneration") == generation else Change.INVALID
        else:
            change = change_of(document, spec.suspend, generation, status)
        job = Job(status.get("submissionId") or "", JobState.MISSING)
        if job.id and phase not in SETTLED:  # settled: the job is done
            job = await self.job_state(job.id)
        facts = Facts(
            phase,
            job.state,
            change,
            retries_left=spec is not None and int(status.get("retries") or 0) < spec.max_retries,
            retryable=job.state is not JobState.STOPPED and job.exit_code != ExitCode.BAD_INPUT,
            deadline_passed=spec is not None and self.deadline_passed(spec),
            generation=generation,
            output_current=status.get("specHash") == output_hash(document),
        )
        return Decision(facts, transition(facts), document, spec, job, int(status.get("retries") or 0), invalid)

    # --- the actions ---------------------------------------------------------------------------

    async def _settle(self, d: Decision) -> None:
        """Nothing to run: take in a spec change the output does not depend on (a resume of a
        Succeeded part, a new priority), and record the spec hash of a run made before it was kept."""
        status = self.status
        fields: dict = {}
        if d.facts.change is Change.POLICY:
            fields["observedGeneration"] = d.generation
        if not status.get("specHash") and status.get("observedGeneration") == d.generation:
            fields["specHash"] = output_hash(d.document)
        if fields:
            await self.write(**fields)

    async def _submit(self, d: Decision) -> None:
        spec, generation = d.spec, d.generation
        assert spec is not None  # transition submits only a valid spec
        attempt = 0 if d.step.new_run else d.attempt
        job_id = submission_id(self.uid, generation, attempt)
        secret = await self.credentials(spec)
        # What the run is, written with its first status (Queued or Pending): an operator restarted
        # meanwhile goes on with the same run, never with the last generation's retries or clock.
        run = {"observedGeneration": generation, "specHash": output_hash(d.document), "retries": attempt}
        if d.step.new_run:
            run["activeSince"] = None

        def give_up() -> bool:
            return bool(self.stopped) or self.generation != generation

        acquired = await self.op.slots.acquire(
            self.key,
            self.body["metadata"].get("creationTimestamp", ""),
            on_queued=lambda: self._queued(run),
            priority=lambda: int(self.body["spec"].get("priority") or 0),
            give_up=give_up,
        )
        if not acquired:
            return
        try:
            await self.stop_others(keep=job_id)
            if give_up() or not await self.output_matches(d, secret) or give_up():
                self.op.slots.release(self.key)
                return
            crash_at("before-submit")
            await self.op.submitted(self.key, self.op.backend.submit, self.owner, job_id, spec, secret)
        except CredentialsRefused as err:
            self.op.slots.release(self.key)
            await self.fail("CredentialsRefused", str(err), generation)
            return
        except BaseException as err:
            # No job runs: the slot goes back while the part tries again, or a submission the backend
            # refuses for good (a 403 or 422 of the API server, a 400 of Ray) would hold it for ever.
            self.op.slots.release(self.key)
            if isinstance(err, Exception):
                self.op.metrics.ray_submission_errors.inc()
            raise
        crash_at("after-submit")
        self.adopted = True  # every other job is stopped: nothing stray to look for
        log.info(
            "part %s/%s: submitted job %s (generation %d, attempt %d)",
            self.namespace,
            self.name,
            job_id,
            generation,
            attempt,
        )
        conditions = self.status.get("conditions") or []
        message = f"job {job_id} submitted (generation {generation}, attempt {attempt})"
        # The deadline counts from the run's first submission: retries spend it, a new run resets it.
        since = {"activeSince": now()} if attempt == 0 else {}
        await self.write(
            phase=Phase.PENDING.value,
            submissionId=job_id,
            output=spec.output.uri,
            message=message,
            **{**run, **since},
            conditions=[
                condition("Submitted", True, "JobSubmitted", job_id, conditions),
                condition("Failed", False, "Running", "", conditions),
                condition("Retrying", False, "JobSubmitted", "", conditions),
            ],
        )
        self.event("Submitted", message)
        self._moved()

    async def _queued(self, run: dict) -> None:
        running = len(self.op.slots.running)
        message = (
            f"waiting for one of {running} running parts to finish "
            f"(maxConcurrentParts {self.op.config.max_concurrent_parts})"
        )
        await self.write(phase=Phase.QUEUED.value, message=message, **run)
        self.event("Queued", message)

    async def _follow(self, d: Decision) -> None:
        spec, job, generation = d.spec, d.job, d.generation
        assert spec is not None  # transition follows only a valid spec
        if not self.adopted:  # an operator restart or failover: a job of another generation may still run
            await self.stop_others(keep=job.id)
            self.adopted = True
            log.info("part %s/%s: following its running job %s", self.namespace, self.name, job.id)
        if d.facts.change is Change.POLICY:  # priority, maxRetries, deadline: applied without restarting the job
            await self.write(
                observedGeneration=generation, message=f"generation {generation} taken in; job {job.id} keeps running"
            )
            self.event("SpecApplied", f"generation {generation} applies to the running job {job.id}")
        elif not self.status.get("specHash"):  # a run submitted before the operator kept it
            await self.write(specHash=output_hash(d.document))
        secret = await self.credentials(spec, quiet=True)
        progress = await self.read_progress(spec, secret, job=job.id)
        phase = Phase(progress.phase) if progress and progress.phase in RUNNING else Phase.PENDING
        if progress and progress.phase == Phase.SUCCEEDED:  # the summary is written, the job not yet done
            phase = Phase.ANNOTATING
        if phase == Phase.ANNOTATING:
            crash_at("annotating")
        if job.state is JobState.SUSPENDED:
            progress_message = f"job {job.id} suspended: {job.message}"
        else:
            progress_message = None
        await self.publish(phase, progress, job.id, stalled=self.stalled(spec, progress), message=progress_message)

    async def _succeed(self, spec: PartSpec | None, job: Job) -> None:
        assert spec is not None  # transition records a success only with a valid spec
        crash_at("annotating")
        # The final counts are the job's last word: an unreadable progress is retried (follow), not skipped.
        progress = await self.read_progress(spec, await self.credentials(spec, quiet=True), strict=True, job=job.id)
        await self.publish(Phase.SUCCEEDED, progress, job.id, finished=True, stalled=False)
        self.event("Succeeded", progress.message if progress and progress.message else f"job {job.id} succeeded")

    async def _succeeded_meanwhile(self, d: Decision) -> bool:
        """The job the decision saw running may have succeeded before it was stopped: its success is
        the truth, recorded as such (the edit that asked for the stop is the next poll's)."""
        if not d.job.id or d.job.terminal or d.spec is None:
            return False
        job = await self.job_state(d.job.id)
        if job.state is not JobState.SUCCEEDED:
            return False
        await self._succeed(d.spec, job)
        return True

    async def _retry(self, d: Decision) -> None:
        spec, job, attempt = d.spec, d.job, d.attempt
        assert spec is not None  # transition retries only a valid spec
        backoff = self.retry_backoff(attempt)
        what = (
            "vanished: the backend no longer knows it"
            if d.step.reason == "JobVanished"
            else f"{job.state.value.lower()}: {job.message[-300:]}"
        )
        message = (
            f"job {job.id} {what}; retry {attempt + 1} of {spec.max_retries} in {backoff:.0f}s, "
            "resuming from finished shards"
        )
        log.warning("part %s/%s: %s", self.namespace, self.name, message)
        # Queued: no job runs and the slot is free for others until the backoff ends. The backoff is
        # kept in the status (Retrying's lastTransitionTime), so that a restarted operator keeps to it.
        conditions = self.status.get("conditions") or []
        await self.write(
            phase=Phase.QUEUED.value,
            retries=attempt + 1,
            message=message,
            observedGeneration=d.generation,
            conditions=[condition("Retrying", True, d.step.reason, message, conditions)],
        )
        self.event("Retrying", message, warning=True)

    async def _suspend(self, d: Decision) -> None:
        """Stop every job of the part and wait in phase Suspended; a finished part stays Succeeded."""
        job_id = d.job.id
        # Suspended means nothing writes into the output any more: a resume must not race the old job.
        await self.stop_others(keep=None)
        if d.facts.stays_succeeded or (await self._succeeded_meanwhile(d) and d.facts.output_current):
            await self.write(observedGeneration=d.generation)
            return
        message = (
            f"suspended (spec.suspend); job {job_id} stopped, finished shards kept"
            if job_id
            else "suspended (spec.suspend) before its job started"
        )
        await self.write(
            phase=Phase.SUSPENDED.value, observedGeneration=d.generation, message=message, activeSince=None
        )
        self.event("Suspended", message)
        self.op.metrics.observe_part(self.namespace, self.name, Phase.SUSPENDED, None, self.status.get("retries", 0))

    async def _fail_step(self, d: Decision) -> None:
        spec, job, reason = d.spec, d.job, d.step.reason
        await self.stop_others(keep=None)  # a deadline, an invalid spec: the job must not go on writing
        if reason == "DeadlineExceeded" and await self._succeeded_meanwhile(d):
            return  # it finished before it was stopped: not failed
        if reason == "InvalidSpec":
            message = d.invalid
        elif reason == "DeadlineExceeded":
            assert spec is not None
            message = (
                f"ran longer than spec.activeDeadlineSeconds ({spec.active_deadline_seconds}s); "
                f"job {job.id} stopped, its finished shards are kept"
            )
        elif reason == "JobVanished":
            assert spec is not None
            message = (
                f"job {job.id} vanished: the backend no longer knows it (a Ray head restarted without "
                f"GCS persistence, or its RayJob deleted); no retries left (spec.maxRetries "
                f"{spec.max_retries})"
            )
        else:
            if job.exit_code == ExitCode.STORAGE_UNAVAILABLE:
                reason = "StorageUnavailable"  # the job's log, in the message, names the endpoint
            message = f"job {job.id} {job.state.value.lower()}: {job.message[-1000:]}"
        await self.fail(reason, message, d.generation)

    async def fail(self, reason: str, message: str, generation: int) -> None:
        """Failed for `generation`, the one the failure was decided on: an edit made while the part was
        being failed (its job stopping) is another generation, which the next poll runs or refuses."""
        log.warning("part %s/%s failed: %s: %s", self.namespace, self.name, reason, message)
        conditions = self.status.get("conditions") or []
        await self.write(
            phase=Phase.FAILED.value,
            message=message,
            observedGeneration=generation,
            conditions=[
                condition("Complete", False, reason, message, conditions),
                condition("Failed", True, reason, message, conditions),
            ],
        )
        self.event(reason, message, warning=True)
        self.op.metrics.observe_part(self.namespace, self.name, Phase.FAILED, None, self.status.get("retries", 0))

    # --- jobs ------------------------------------------------------------------------------------

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
        return self._capped(self.op.config.retry_backoff_seconds * 2**attempt)

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

    # --- what the part reads -------------------------------------------------------------------

    async def credentials(self, spec: PartSpec, quiet: bool = False) -> dict[str, str] | None:
        """The part's Secrets (read_secret). A Secret that is missing or forbidden may appear later
        (an external-secrets controller): the part waits for it, saying so, and never fails for it;
        any other API error is transient and retried. `quiet`: None instead (the job has them already)."""
        try:
            return await self.read_secret(spec)
        except kube.KubeError as err:
            self.op.metrics.kube_api_errors.inc()
            if quiet:
                return None
            if err.status not in (403, 404):
                raise
            message = (
                str(err)
                if str(err).startswith("spec.")
                else f"spec.output.credentialsSecret {spec.output.credentials_secret!r}: {err}"
            )
            conditions = self.status.get("conditions") or []
            was: dict = next((c for c in conditions if c.get("type") == "CredentialsAvailable"), {})
            await self.write(
                message=f"waiting for credentials: {message}",
                conditions=[condition("CredentialsAvailable", False, "CredentialsUnavailable", message, conditions)],
            )
            if was.get("status") != "False":
                self.event("CredentialsUnavailable", message, warning=True)
            raise WaitingForCredentials(message) from None

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
                raise kube.KubeError(f"spec.latents.hubTokenSecret {token!r}: {err}", err.status) from err
            if values.get("HF_TOKEN"):
                secret["HF_TOKEN"] = values["HF_TOKEN"]
        return secret

    async def read_progress(self, spec: PartSpec, secret, strict: bool = False, job: str = "") -> Progress | None:
        """The job's persisted progress; None when there is none yet, when it is another run's than
        `job`'s (a re-run not started yet: its phase would be the last run's), or when it cannot be
        read (a damaged file or an unreachable store, which the job's next write repairs) unless
        `strict`, which raises."""

        def read():
            store = Store(spec.output, secret=secret or {})
            try:
                data = store.read_json(PROGRESS)
                progress = Progress.from_json(data) if data else None
            except Exception as err:  # noqa: BLE001 - any reason means the same: keep the status as it is
                message = f"cannot read {store.url(PROGRESS)}: {type(err).__name__}: {err}"
                if strict:
                    raise OSError(message) from None
                log.warning("part %s/%s: %s", self.namespace, self.name, message)
                return None
            if progress and job and progress.job and progress.job != job:
                if strict:
                    raise OSError(f"{store.url(PROGRESS)} is job {progress.job}'s, not yet job {job}'s")
                return None
            return progress

        return await asyncio.to_thread(read)

    async def output_matches(self, d: Decision, secret) -> bool:
        """Refuse a filter change into an output that holds shards of another filter."""
        spec = d.spec
        assert spec is not None

        def manifest():
            return Store(spec.output, secret=secret or {}).read_json(MANIFEST)

        try:
            done = await asyncio.to_thread(manifest)
        except Exception as err:  # noqa: BLE001 - an unreachable output is the job's to report
            log.info("part %s/%s: output not readable yet: %s", self.namespace, self.name, err)
            return True
        if done and done.get("fingerprint") != fingerprint(spec):
            await self.fail(
                "FilterChanged",
                f"{spec.output.uri} holds shards filtered with another source, columns or filter; "
                "set a new spec.output.uri (or remove the old output) to run the new filter",
                d.generation,
            )
            return False
        return True

    # --- the status ----------------------------------------------------------------------------

    def _moved(self) -> None:
        self.moved_at = time.monotonic()

    def stalled(self, spec: PartSpec, progress: Progress | None) -> bool:
        """Whether the counts have stood still for spec.stallSeconds (measured by this process)."""
        counts = (
            None
            if progress is None
            else (
                progress.phase,
                progress.rows_read,
                progress.images_ok,
                progress.images_failed,
                progress.shards_done,
                progress.latents_written,
            )
        )
        if counts != self.last_counts:
            self.last_counts = counts
            self._moved()
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
            stall = (
                f"no count has moved for {time.monotonic() - self.moved_at:.0f}s "
                f"(spec.stallSeconds); job {job_id} keeps running"
            )
            extra.append(
                condition(
                    "Stalled", stalled, "NoProgress" if stalled else "Progressing", stall if stalled else "", conditions
                )
            )
            if stalled and not was_stalled:
                log.warning("part %s/%s: %s", self.namespace, self.name, stall)
                self.event("Stalled", stall, warning=True)
        await self.write(phase=phase.value, submissionId=job_id, message=message, **fields, conditions=extra)
        self.op.metrics.observe_part(
            self.namespace, self.name, phase, progress, self.status.get("retries", 0), stalled=stalled
        )

    async def _observe_final(self) -> None:
        if self.key in self.op.metrics.parts():
            return
        try:  # after an operator restart, the counters come back from what the job persisted
            spec = PartSpec.from_dict(self.body["spec"])
            progress = await self.read_progress(spec, await self.read_secret(spec))
        except Exception:  # noqa: BLE001 - metrics of a finished part are best effort
            progress = None
        self.op.metrics.observe_part(
            self.namespace,
            self.name,
            self.status.get("phase") or Phase.PENDING,
            progress,
            self.status.get("retries", 0),
        )
