"""The facts of one poll, read together: the part's phase, its job's state, how its spec changed."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ...contract import PHASES, ExitCode, Phase
from ...spec import PartSpec, SpecError
from ..backend import Job, JobState
from ..lifecycle import SETTLED, Change, Facts, Step, change_of, output_hash, transition
from .jobs import Jobs


@dataclass(frozen=True)
class Decision:
    """One poll's decision and every fact it was made on, read together (Deciding.decide): the step is
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

    @property
    def valid_spec(self) -> PartSpec:
        """The parsed spec, for every step but a failure for an invalid one: `transition` submits,
        follows, retries and records a success only with a spec that validates."""
        if self.spec is None:
            raise RuntimeError(f"{self.step.action.value} decided on an invalid spec: {self.invalid}")
        return self.spec


class Deciding(Jobs):
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
