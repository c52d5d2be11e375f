"""A part's life as one transition function: what to do next, from the phase its status says, the
state of its job and how its spec changed. Every path of parts.Part goes through `transition`, once a
poll, so that the operator's promises are properties of this one function (tests/control/test_lifecycle.py
checks them over every input):

- at most one job per part: SUBMIT is the only action that starts a job, and its executor stops and
  sees stopped every other job of the part first;
- the status tells the truth: a running part whose job the backend no longer knows is never followed;
- the queue moves: every action but SUBMIT and FOLLOW gives the slot back, in the same step;
- finished work stays finished: a Succeeded part runs again only for a change of what its output
  depends on (Change.OUTPUT), and a job that succeeded is recorded as such before any edit made
  meanwhile is taken in (a suspend that came after the success must not stop and redo it).

Every fact a step uses is read once, before `transition` decides, and the step records the
generation it decided on (`Facts.generation`), never one read later: an edit made while a step is
carried out (a stop can take minutes) is a new generation the next poll decides on.

No I/O here: parts.Part reads the facts and carries out the step.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass

from ..contract import RUNNING, Phase
from .backend import JobState


class Change(str, enum.Enum):
    """How the spec differs from the one the status last observed."""

    NONE = "None"  # the generation the status observed
    POLICY = "Policy"  # only fields the output does not depend on (priority, maxRetries, deadline, suspend: false…)
    OUTPUT = "Output"  # a field the output depends on (OUTPUT_FIELDS): the part must run again
    SUSPEND = "Suspend"  # spec.suspend turned true
    INVALID = "Invalid"  # the spec does not validate


class Action(str, enum.Enum):
    WAIT = "Wait"  # settled: nothing runs until the spec changes
    SUBMIT = "Submit"  # take a slot, stop every other job of the part, check the output, submit
    FOLLOW = "Follow"  # the job runs: publish its progress
    SUCCEED = "Succeed"  # the job succeeded: publish the final counts
    RETRY = "Retry"  # a new attempt of the same run, after a backoff
    FAIL = "Fail"  # stop every job of the part; final until the spec changes
    SUSPEND = "Suspend"  # stop every job of the part; phase Suspended (a Succeeded part stays Succeeded)


class Reason(str, enum.Enum):
    """Why a part fails or retries: the reason of its Failed or Retrying condition and of its Event.
    str-valued, so that the status and the Events read as the bare strings they always were."""

    NONE = ""  # no reason to give: the step neither fails nor retries
    INVALID_SPEC = "InvalidSpec"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    JOB_VANISHED = "JobVanished"  # the backend no longer knows the status' job
    JOB_FAILED = "JobFailed"
    RETRIES_EXHAUSTED = "RetriesExhausted"
    # Decided while the step is carried out, never by `transition`:
    STORAGE_UNAVAILABLE = "StorageUnavailable"  # the job's exit code says so (ExitCode.STORAGE_UNAVAILABLE)
    FILTER_CHANGED = "FilterChanged"  # the output holds shards of another source, columns or filter
    CREDENTIALS_REFUSED = "CredentialsRefused"  # the backend refused the job's credentials


class Slot(str, enum.Enum):
    TAKE = "Take"  # queue for a slot (a part that holds one keeps it)
    HOLD = "Hold"  # keep it, taking it without queueing if the operator just (re)started
    RELEASE = "Release"


SLOT = {Action.SUBMIT: Slot.TAKE, Action.FOLLOW: Slot.HOLD}  # every other action releases


@dataclass(frozen=True)
class Facts:
    phase: Phase | None  # the status' phase; None for a part never looked at
    job: JobState  # of the status' submissionId; MISSING when there is none
    change: Change
    retries_left: bool = True  # status.retries < spec.maxRetries
    retryable: bool = True  # the job's failure is one a retry can mend (not stopped, not bad input)
    deadline_passed: bool = False  # the run is older than spec.activeDeadlineSeconds
    generation: int = 1  # the spec's generation these facts were read with: the one a step records
    output_current: bool = True  # the status' specHash is the spec's: its output is what the spec makes

    @property
    def stays_succeeded(self) -> bool:
        """SUSPEND: a Succeeded part stays Succeeded only if its output is what the spec makes now
        (suspended with an output edit not yet run, it is Suspended: that edit's output is not there)."""
        return self.phase is Phase.SUCCEEDED and self.output_current


@dataclass(frozen=True)
class Step:
    action: Action
    reason: Reason = Reason.NONE  # a Failed condition's reason, or why a retry happens
    new_run: bool = False  # SUBMIT: attempt 0 of the current generation, retries and deadline clock fresh

    @property
    def slot(self) -> Slot:
        return SLOT.get(self.action, Slot.RELEASE)


SETTLED = (Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED)
# Phases in which the status names a submitted job (Stopping: being deleted, its job still stopping).
SUBMITTED = frozenset(RUNNING) | {Phase.STOPPING}


def transition(facts: Facts) -> Step:
    phase, job, change = facts.phase, facts.job, facts.change
    if change is Change.INVALID:
        return Step(Action.FAIL, Reason.INVALID_SPEC)
    if phase in SUBMITTED and job is JobState.SUCCEEDED:
        return Step(Action.SUCCEED)  # done before the edit was seen: recorded first, the edit next poll
    if change is Change.SUSPEND:
        return Step(Action.SUSPEND)
    if phase in SETTLED:
        if change is Change.NONE or (phase is Phase.SUCCEEDED and change is Change.POLICY):
            return Step(Action.WAIT)  # finished work stays finished
        return Step(Action.SUBMIT, new_run=True)  # a resume, or a re-run of a failed or changed part
    if change is Change.OUTPUT:
        return Step(Action.SUBMIT, new_run=True)  # the running job (if any) is stopped first
    if phase not in SUBMITTED:  # new, or Queued: a first submission or a retry that is due
        if job.active:
            return Step(Action.FOLLOW)  # submitted, and the operator died before the status said so
        if facts.deadline_passed:
            return Step(Action.FAIL, Reason.DEADLINE_EXCEEDED)  # a retry that waits (its backoff, a slot)
        return Step(Action.SUBMIT, new_run=phase is None)
    # The status names a submitted job.
    if job.active:
        if facts.deadline_passed:
            return Step(Action.FAIL, Reason.DEADLINE_EXCEEDED)
        return Step(Action.FOLLOW)
    vanished = job is JobState.MISSING
    if (vanished or facts.retryable) and facts.retries_left:
        return Step(Action.RETRY, Reason.JOB_VANISHED if vanished else Reason.JOB_FAILED)
    if vanished:
        return Step(Action.FAIL, Reason.JOB_VANISHED)
    return Step(Action.FAIL, Reason.RETRIES_EXHAUSTED if facts.retryable else Reason.JOB_FAILED)


def delete_needs_backend(phase: Phase | None, job_id: str | None) -> bool:
    """Whether deleting a part must see its jobs stopped by the backend before the object may go.
    Every way into a settled phase stops and sees stopped every job of the part first, and a part
    whose status names no job has none unless a crash came between a submission and its status
    write: neither needs Ray to be reachable to be deleted (Ray gone or decommissioned)."""
    return bool(job_id) and phase not in SETTLED


# The spec fields a part's output depends on: a change of any of them runs a Succeeded part again
# (heal: setting or raising it is the request to fetch again). The others (suspend, priority,
# maxRetries, activeDeadlineSeconds, stallSeconds) change how the operator runs the part, never what it makes.
OUTPUT_FIELDS = ("partId", "source", "columns", "filter", "download", "output", "latents", "verify", "heal")


def output_hash(spec: dict) -> str:
    """A digest of the spec's OUTPUT_FIELDS (as the API server stores the spec, defaults applied)."""
    data = json.dumps({k: spec.get(k) for k in OUTPUT_FIELDS}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def change_of(spec: dict, suspend: bool, generation: int, status: dict) -> Change:
    """How `spec` (of `generation`) differs from what the status observed. A status without
    specHash (written before the operator recorded it) counts any new generation as OUTPUT."""
    if status.get("observedGeneration") == generation:
        return Change.NONE
    if suspend:
        return Change.SUSPEND
    if status.get("specHash") and status["specHash"] == output_hash(spec):
        return Change.POLICY
    return Change.OUTPUT
