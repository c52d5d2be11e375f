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
from .lifecycle import Action, Change, Facts, Slot, Step, change_of, output_hash, transition
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


class WaitingForCredentials(Exception):
    """The part's Secret is not there (yet) or not readable: the part waits, as a Pod waits for its Secret."""


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
        self.backoff = 0.0  # seconds until the next attempt (Action.RETRY)
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
                elif step.action is Action.RETRY:
                    await self.sleep(change, self.backoff, generation)  # suspend, a spec change or delete end it
                elif step.action in (Action.SUBMIT, Action.FOLLOW):
                    await self.sleep(change, self.op.config.poll_seconds, generation)
                # SUCCEED, FAIL, SUSPEND: the next round finds the part settled and waits there
        finally:
            if self.op.changes.get(self.key) is change:
                del self.op.changes[self.key]
            self.op.slots.release(self.key)

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
        status, generation = self.status, self.generation
        phase = Phase(status["phase"]) if status.get("phase") in PHASES else None
        spec: PartSpec | None = None
        invalid = ""
        try:
            spec = PartSpec.from_dict(self.body["spec"])
        except SpecError as err:
            invalid = str(err)
        if spec is None:
            change = Change.NONE if status.get("observedGeneration") == generation else Change.INVALID
        else:
            change = change_of(self.body["spec"], spec.suspend, generation, status)
        job = Job(status.get("submissionId") or "", JobState.MISSING)
        if job.id and phase not in (Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED):  # settled: the job is done
            job = await self.job_state(job.id)
        attempt = int(status.get("retries") or 0)
        facts = Facts(
            phase,
            job.state,
            change,
            retries_left=spec is not None and attempt < spec.max_retries,
            retryable=job.state is not JobState.STOPPED and job.exit_code != ExitCode.BAD_INPUT,
            deadline_passed=spec is not None and self.deadline_passed(spec),
        )
        step = transition(facts)
        if step.slot is Slot.RELEASE:  # given back in the same step that leaves the running phases
            self.op.slots.release(self.key)
        elif step.slot is Slot.HOLD:
            self.op.slots.adopt(self.key)
        if step.action is not Action.WAIT:
            log.debug("part %s/%s: %s -> %s", self.namespace, self.name, facts, step)

        if step.action is Action.WAIT:
            await self._settle(change, generation)
        elif step.action is Action.SUBMIT:
            await self._submit(spec, step, generation)
        elif step.action is Action.FOLLOW:
            await self._follow(spec, job, change, generation)
        elif step.action is Action.SUCCEED:
            await self._succeed(spec, job)
        elif step.action is Action.RETRY:
            await self._retry(spec, job, step, attempt, generation)
        elif step.action is Action.SUSPEND:
            await self._suspend(generation)
        else:
            await self._fail_step(step, spec, job, invalid)
        return step

    # --- the actions ---------------------------------------------------------------------------

    async def _settle(self, change: Change, generation: int) -> None:
        """Nothing to run: take in a spec change the output does not depend on (a resume of a
        Succeeded part, a new priority), and record the spec hash of a run made before it was kept."""
        status = self.status
        fields: dict = {}
        if change is Change.POLICY:
            fields["observedGeneration"] = generation
        if not status.get("specHash") and status.get("observedGeneration") == generation:
            fields["specHash"] = output_hash(self.body["spec"])
        if fields:
            await self.write(**fields)

    async def _submit(self, spec: PartSpec, step: Step, generation: int) -> None:
        attempt = 0 if step.new_run else int(self.status.get("retries") or 0)
        job_id = submission_id(self.uid, generation, attempt)
        secret = await self.credentials(spec)
        # What the run is, written with its first status (Queued or Pending): an operator restarted
        # meanwhile goes on with the same run, never with the last generation's retries or clock.
        run = {"observedGeneration": generation, "specHash": output_hash(self.body["spec"]), "retries": attempt}
        if step.new_run:
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
        await self.stop_others(keep=job_id)
        if give_up() or not await self.output_matches(spec, secret) or give_up():
            self.op.slots.release(self.key)
            return
        crash_at("before-submit")
        try:
            await asyncio.to_thread(self.op.backend.submit, self.owner, job_id, spec, secret)
        except CredentialsRefused as err:
            self.op.slots.release(self.key)
            await self.fail("CredentialsRefused", str(err))
            return
        except Exception:
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

    async def _follow(self, spec: PartSpec, job: Job, change: Change, generation: int) -> None:
        if not self.adopted:  # an operator restart or failover: a job of another generation may still run
            await self.stop_others(keep=job.id)
            self.adopted = True
            log.info("part %s/%s: following its running job %s", self.namespace, self.name, job.id)
        if change is Change.POLICY:  # priority, maxRetries, deadline: applied without restarting the job
            await self.write(
                observedGeneration=generation, message=f"generation {generation} taken in; job {job.id} keeps running"
            )
            self.event("SpecApplied", f"generation {generation} applies to the running job {job.id}")
        elif not self.status.get("specHash"):  # a run submitted before the operator kept it
            await self.write(specHash=output_hash(self.body["spec"]))
        secret = await self.credentials(spec, quiet=True)
        progress = await self.read_progress(spec, secret)
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

    async def _succeed(self, spec: PartSpec, job: Job) -> None:
        crash_at("annotating")
        # The final counts are the job's last word: an unreadable progress is retried (follow), not skipped.
        progress = await self.read_progress(spec, await self.credentials(spec, quiet=True), strict=True)
        await self.publish(Phase.SUCCEEDED, progress, job.id, finished=True, stalled=False)
        self.event("Succeeded", progress.message if progress and progress.message else f"job {job.id} succeeded")

    async def _retry(self, spec: PartSpec, job: Job, step: Step, attempt: int, generation: int) -> None:
        self.backoff = self._capped(self.op.config.retry_backoff_seconds * 2**attempt)
        what = (
            "vanished: the backend no longer knows it"
            if step.reason == "JobVanished"
            else f"{job.state.value.lower()}: {job.message[-300:]}"
        )
        message = (
            f"job {job.id} {what}; retry {attempt + 1} of {spec.max_retries} in {self.backoff:.0f}s, "
            "resuming from finished shards"
        )
        log.warning("part %s/%s: %s", self.namespace, self.name, message)
        # Queued: no job runs and the slot is free for others until the backoff ends.
        await self.write(phase=Phase.QUEUED.value, retries=attempt + 1, message=message, observedGeneration=generation)
        self.event("Retrying", message, warning=True)

    async def _suspend(self, generation: int) -> None:
        """Stop every job of the part and wait in phase Suspended; a finished part stays Succeeded."""
        job_id = self.status.get("submissionId")
        # Suspended means nothing writes into the output any more: a resume must not race the old job.
        await self.stop_others(keep=None)
        if self.status.get("phase") == Phase.SUCCEEDED.value:
            await self.write(observedGeneration=generation)
            return
        message = (
            f"suspended (spec.suspend); job {job_id} stopped, finished shards kept"
            if job_id
            else "suspended (spec.suspend) before its job started"
        )
        await self.write(phase=Phase.SUSPENDED.value, observedGeneration=generation, message=message, activeSince=None)
        self.event("Suspended", message)
        self.op.metrics.observe_part(self.namespace, self.name, Phase.SUSPENDED, None, self.status.get("retries", 0))

    async def _fail_step(self, step: Step, spec: PartSpec | None, job: Job, invalid: str) -> None:
        await self.stop_others(keep=None)  # a deadline, an invalid spec: the job must not go on writing
        reason = step.reason
        if reason == "InvalidSpec":
            message = invalid
        elif reason == "DeadlineExceeded":
            message = (
                f"ran longer than spec.activeDeadlineSeconds ({spec.active_deadline_seconds}s); "
                f"job {job.id} stopped, its finished shards are kept"
            )
        elif reason == "JobVanished":
            message = (
                f"job {job.id} vanished: the backend no longer knows it (a Ray head restarted without "
                f"GCS persistence, or its RayJob deleted); no retries left (spec.maxRetries "
                f"{spec.max_retries})"
            )
        else:
            if job.exit_code == ExitCode.STORAGE_UNAVAILABLE:
                reason = "StorageUnavailable"  # the job's log, in the message, names the endpoint
            message = f"job {job.id} {job.state.value.lower()}: {job.message[-1000:]}"
        await self.fail(reason, message)

    async def fail(self, reason: str, message: str) -> None:
        log.warning("part %s/%s failed: %s: %s", self.namespace, self.name, reason, message)
        conditions = self.status.get("conditions") or []
        await self.write(
            phase=Phase.FAILED.value,
            message=message,
            observedGeneration=self.generation,
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
        and give its slot back; the output stays."""
        self.op.slots.release(self.key)
        job_id = self.status.get("submissionId")
        if self.status.get("phase") not in (Phase.SUCCEEDED.value, Phase.FAILED.value, None) and job_id:
            await self.write(phase=Phase.STOPPING.value, message=f"stopping job {job_id}; finished output is kept")
        await self.stop_others(keep=None)

    def deadline_passed(self, spec: PartSpec) -> bool:
        since = self.status.get("activeSince")
        if not spec.active_deadline_seconds or not since:
            return False
        started = calendar.timegm(time.strptime(since, "%Y-%m-%dT%H:%M:%SZ"))
        return time.time() - started > spec.active_deadline_seconds

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
                    raise OSError(message) from None
                log.warning("part %s/%s: %s", self.namespace, self.name, message)
                return None

        return await asyncio.to_thread(read)

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
            await self.fail(
                "FilterChanged",
                f"{spec.output.uri} holds shards filtered with another source, columns or filter; "
                "set a new spec.output.uri (or remove the old output) to run the new filter",
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
