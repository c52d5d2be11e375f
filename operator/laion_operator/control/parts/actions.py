"""Carrying out the step `lifecycle.transition` decided: one case per action, each a helper named for
what it changes. Which action a phase, a job state and a spec change lead to is `transition`'s alone."""

from __future__ import annotations

import logging

from ...contract import RUNNING, ExitCode, Phase, Progress
from ...spec import PartSpec
from ..backend import CredentialsRefused, Job, JobState, submission_id
from ..crash import crash_at
from ..lifecycle import Action, Change, Reason, Slot, Step, output_hash
from ..resource import condition, now
from .facts import Deciding, Decision
from .publish import Publishing
from .reads import Reading

log = logging.getLogger(__name__)


class Actions(Deciding, Reading, Publishing):
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
        match step.action:
            case Action.WAIT:
                await self.settle(d)
            case Action.SUBMIT:
                await self.submit(d)
            case Action.FOLLOW:
                await self.follow_job(d)
            case Action.SUCCEED:
                await self.succeed(d.valid_spec, d.job)
            case Action.RETRY:
                await self.retry(d)
            case Action.SUSPEND:
                await self.suspend(d)
            case Action.FAIL:
                await self.fail_step(d)
        return step

    async def settle(self, d: Decision) -> None:
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

    async def submit(self, d: Decision) -> None:
        """Wait for a slot, stop every other job of the part, check the output, submit, say so."""
        spec, generation = d.valid_spec, d.generation
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
            on_queued=lambda: self.queued(run),
            priority=lambda: int(self.body["spec"].get("priority") or 0),
            give_up=give_up,
        )
        if not acquired:
            return
        try:
            await self.stop_others(keep=job_id)
            if give_up() or await self.refuse_other_filter(spec, secret, generation) or give_up():
                self.op.slots.release(self.key)
                return
            crash_at("before-submit")
            await self.op.submitted(self.key, self.op.backend.submit, self.owner, job_id, spec, secret)
        except CredentialsRefused as err:
            self.op.slots.release(self.key)
            await self.fail(Reason.CREDENTIALS_REFUSED, str(err), generation)
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
        await self.record_submission(spec, job_id, attempt, run)

    async def refuse_other_filter(self, spec: PartSpec, secret: dict[str, str] | None, generation: int) -> bool:
        """Fail the part (FilterChanged) if its output holds shards of another filter: they cannot be resumed."""
        if not await self.holds_other_filter(spec, secret):
            return False
        await self.fail(
            Reason.FILTER_CHANGED,
            f"{spec.output.uri} holds shards filtered with another source, columns or filter; "
            "set a new spec.output.uri (or remove the old output) to run the new filter",
            generation,
        )
        return True

    async def record_submission(self, spec: PartSpec, job_id: str, attempt: int, run: dict) -> None:
        generation = run["observedGeneration"]
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
        self.moved()

    async def queued(self, run: dict) -> None:
        running = len(self.op.slots.running)
        message = (
            f"waiting for one of {running} running parts to finish "
            f"(maxConcurrentParts {self.op.config.max_concurrent_parts})"
        )
        await self.write(phase=Phase.QUEUED.value, message=message, **run)
        self.event("Queued", message)

    async def follow_job(self, d: Decision) -> None:
        """The job runs: publish its progress, taking in a spec change it does not depend on."""
        spec, job = d.valid_spec, d.job
        if not self.adopted:  # an operator restart or failover: a job of another generation may still run
            await self.stop_others(keep=job.id)
            self.adopted = True
            log.info("part %s/%s: following its running job %s", self.namespace, self.name, job.id)
        await self.take_in_while_running(d)
        secret = await self.credentials(spec, quiet=True)
        progress = await self.read_progress(spec, secret, job=job.id)
        phase = running_phase(progress)
        if phase == Phase.ANNOTATING:
            crash_at("annotating")
        if job.state is JobState.SUSPENDED:
            progress_message = f"job {job.id} suspended: {job.message}"
        else:
            progress_message = None
        await self.publish(phase, progress, job.id, stalled=self.stalled(spec, progress), message=progress_message)

    async def take_in_while_running(self, d: Decision) -> None:
        generation, job = d.generation, d.job
        if d.facts.change is Change.POLICY:  # priority, maxRetries, deadline: applied without restarting the job
            await self.write(
                observedGeneration=generation, message=f"generation {generation} taken in; job {job.id} keeps running"
            )
            self.event("SpecApplied", f"generation {generation} applies to the running job {job.id}")
        elif not self.status.get("specHash"):  # a run submitted before the operator kept it
            await self.write(specHash=output_hash(d.document))

    async def succeed(self, spec: PartSpec, job: Job) -> None:
        crash_at("annotating")
        # The final counts are the job's last word: an unreadable progress is retried (follow), not skipped.
        progress = await self.read_progress(spec, await self.credentials(spec, quiet=True), strict=True, job=job.id)
        await self.publish(Phase.SUCCEEDED, progress, job.id, finished=True, stalled=False)
        self.event("Succeeded", progress.message if progress and progress.message else f"job {job.id} succeeded")

    async def succeeded_meanwhile(self, d: Decision) -> bool:
        """The job the decision saw running may have succeeded before it was stopped: its success is
        the truth, recorded as such (the edit that asked for the stop is the next poll's)."""
        if not d.job.id or d.job.terminal or d.spec is None:
            return False
        job = await self.job_state(d.job.id)
        if job.state is not JobState.SUCCEEDED:
            return False
        await self.succeed(d.spec, job)
        return True

    async def retry(self, d: Decision) -> None:
        spec, job, attempt = d.valid_spec, d.job, d.attempt
        backoff = self.retry_backoff(attempt)
        what = (
            "vanished: the backend no longer knows it"
            if d.step.reason is Reason.JOB_VANISHED
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
            conditions=[condition("Retrying", True, d.step.reason.value, message, conditions)],
        )
        self.event("Retrying", message, warning=True)

    async def suspend(self, d: Decision) -> None:
        """Stop every job of the part and wait in phase Suspended; a finished part stays Succeeded."""
        job_id = d.job.id
        # Suspended means nothing writes into the output any more: a resume must not race the old job.
        await self.stop_others(keep=None)
        if d.facts.stays_succeeded or (await self.succeeded_meanwhile(d) and d.facts.output_current):
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

    async def fail_step(self, d: Decision) -> None:
        await self.stop_others(keep=None)  # a deadline, an invalid spec: the job must not go on writing
        if d.step.reason is Reason.DEADLINE_EXCEEDED and await self.succeeded_meanwhile(d):
            return  # it finished before it was stopped: not failed
        reason, message = failure(d)
        await self.fail(reason, message, d.generation)


def running_phase(progress: Progress | None) -> Phase:
    """The phase a running job's persisted progress shows (Pending until it says)."""
    if progress and progress.phase == Phase.SUCCEEDED:  # the summary is written, the job not yet done
        return Phase.ANNOTATING
    return Phase(progress.phase) if progress and progress.phase in RUNNING else Phase.PENDING


def failure(d: Decision) -> tuple[Reason, str]:
    """The reason and message a FAIL step records."""
    job = d.job
    match d.step.reason:
        case Reason.INVALID_SPEC:
            return Reason.INVALID_SPEC, d.invalid
        case Reason.DEADLINE_EXCEEDED:
            return Reason.DEADLINE_EXCEEDED, (
                f"ran longer than spec.activeDeadlineSeconds ({d.valid_spec.active_deadline_seconds}s); "
                f"job {job.id} stopped, its finished shards are kept"
            )
        case Reason.JOB_VANISHED:
            return Reason.JOB_VANISHED, (
                f"job {job.id} vanished: the backend no longer knows it (a Ray head restarted without "
                f"GCS persistence, or its RayJob deleted); no retries left (spec.maxRetries "
                f"{d.valid_spec.max_retries})"
            )
        case reason:
            if job.exit_code == ExitCode.STORAGE_UNAVAILABLE:
                reason = Reason.STORAGE_UNAVAILABLE  # the job's log, in the message, names the endpoint
            return reason, f"job {job.id} {job.state.value.lower()}: {job.message[-1000:]}"
