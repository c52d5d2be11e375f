"""A model checker for a part's life (issue 30): Hypothesis drives random interleavings of spec edits,
suspends, deletes, job outcomes seen late or never, Ray going away, operator restarts and failovers
between replicas, through the operator's own decision logic — `lifecycle.transition`, `change_of`,
`delete_needs_backend`, `slots.Slots` with its listing of slot holders, and a dataset's
`decided`/`summarize`/`dataset_phase` over a lagging index — and checks the operator's promises
after every step.

What is modelled, not run: the executor (parts.Part's actions, written here as the same few status
writes) and the world (Ray's jobs, the API server's objects, a watch-fed index that lags). A poll
is split into its decision and its execution, so that anything may happen in between, as it does
while a step waits on Ray. Pure logic only: it runs in `make test-fast`.
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from laion_operator.contract import Phase
from laion_operator.control.backend import JobState
from laion_operator.control.datasets import DatasetPhase, dataset_phase, decided, summarize, undecided
from laion_operator.control.lifecycle import (
    SETTLED,
    SUBMITTED,
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
from laion_operator.control.slots import Slots

NAMES = ("a", "b", "c")
MAX_RETRIES = 1
LISTING_AGE = 1.0  # seconds a listing of slot holders is trusted (the operator's pollSeconds)


async def _never_listed():  # the model lists itself (Model.list_holders), on the clock it keeps
    raise AssertionError


@dataclasses.dataclass
class Part:
    name: str
    created: str
    generation: int = 1
    output: int = 0  # the version of what the output depends on: every output edit makes a new one
    policy: int = 0
    suspend: bool = False
    deleting: bool = False
    deadline_passed: bool = False
    status: dict = dataclasses.field(default_factory=dict)
    decided_generations: set = dataclasses.field(default_factory=set)
    stored_generation: int = 1  # the generation the dataset's last spec change produced

    def document(self) -> dict:
        return {
            "partId": self.name,
            "download": {"timeout": 10 + self.output},
            "maxRetries": MAX_RETRIES,
            "priority": self.policy,
            "suspend": self.suspend,
        }

    def as_object(self) -> dict:
        """The part as the API server (and a watch event) has it now."""
        return {
            "metadata": {"name": self.name, "generation": self.generation},
            "spec": self.document(),
            "status": dict(self.status),
        }


@dataclasses.dataclass
class Pending:
    """A decision made, not carried out yet: the facts it was made on, and the step."""

    facts: Facts
    step: Step
    document: dict
    job: str
    attempt: int


class Replica:
    def __init__(self, clock):
        self.slots = Slots(2, lister=_never_listed, max_age=LISTING_AGE, clock=clock)
        self.adopted: set[str] = set()

    def pause(self) -> None:
        """kopf stops every daemon of a paused or dying replica: each gives its slot back."""
        for name in NAMES:
            self.slots.release(name)
        self.slots.forget_listing()
        self.adopted.clear()


class LifecycleModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = 0.0
        self.parts: dict[str, Part] = {name: Part(name, f"2026-01-01T00:00:0{i}Z") for i, name in enumerate(NAMES)}
        self.jobs: dict[str, JobState] = {}  # what Ray knows
        self.job_output: dict[str, str] = {}  # job id -> the output hash it was submitted for
        self.done_outputs: dict[str, set[str]] = {name: set() for name in NAMES}  # by jobs that succeeded
        self.ray_up = True
        self.operator_up = True
        self.replicas = [Replica(lambda: self.clock), Replica(lambda: self.clock)]
        self.active = 0
        self.pending: dict[str, Pending] = {}
        self.index: dict[str, dict] = {}  # the dataset's watch-fed view of its parts, lagging
        self.limit = 2
        self.members = NAMES

    @initialize(limit=st.integers(1, 2), members=st.integers(1, len(NAMES)))
    def set_limit(self, limit, members):
        self.limit = limit
        self.members = NAMES[:members]  # the parts a LaionDataset made
        for replica in self.replicas:
            replica.slots.limit = limit

    # --- the world ---------------------------------------------------------------------------

    @property
    def replica(self) -> Replica:
        return self.replicas[self.active]

    def jobs_of(self, name: str) -> list[str]:
        return [j for j in self.jobs if j.startswith(f"{name}-")]

    def active_jobs(self, name: str) -> list[str]:
        return [j for j in self.jobs_of(name) if self.jobs[j].active]

    def list_holders(self) -> set[str]:
        return {p.name for p in self.parts.values() if p.status.get("phase") in {s.value for s in SUBMITTED}}

    def edit(self, part: Part) -> None:
        part.generation += 1
        part.stored_generation = part.generation

    @rule(name=st.sampled_from(NAMES), kind=st.sampled_from(["output", "policy", "suspend", "resume"]))
    def spec_edited(self, name, kind):
        part = self.parts.get(name)
        if part is None:
            return
        if kind == "output":
            part.output += 1
        elif kind == "policy":
            part.policy += 1
        else:
            part.suspend = kind == "suspend"
        self.edit(part)

    @rule(name=st.sampled_from(NAMES))
    def deleted(self, name):
        part = self.parts.get(name)
        if part is not None and not part.deleting:
            part.deleting = True
            self.pending.pop(name, None)  # kopf stops the part's daemon mid-step
            self.replica.slots.release(name)
            self.replica.slots.forget_listing()

    @rule(
        name=st.sampled_from(NAMES),
        outcome=st.sampled_from([JobState.SUCCEEDED, JobState.SUCCEEDED, JobState.FAILED, "vanish", "late"]),
    )
    def job_ended(self, name, outcome):
        """A job succeeds or fails, vanishes (a Ray head restarted without its GCS), or runs past its
        part's activeDeadlineSeconds; the operator sees it at some later poll, or never."""
        if outcome == "late" and name in self.parts:
            self.parts[name].deadline_passed = True
            return
        for job in self.active_jobs(name):
            if outcome == "vanish":
                del self.jobs[job]
            else:
                self.jobs[job] = outcome
                if outcome is JobState.SUCCEEDED:
                    self.done_outputs[name].add(self.job_output[job])

    @rule(kind=st.sampled_from(["ray", "restart", "down-or-up", "failover", "time"]))
    def world_moved(self, kind):
        """Ray goes away or comes back; the operator is killed and started again (nothing in memory),
        or down for a while; a standby of higher priority arrives, or the leader goes, and the other
        replica works with whatever it remembered from before it paused; time passes."""
        if kind == "ray":
            self.ray_up = not self.ray_up
        elif kind == "failover":
            self.pending.clear()
            self.replica.pause()
            self.active = 1 - self.active
        elif kind == "time":
            self.clock += LISTING_AGE / 2
        else:
            if kind == "down-or-up":
                self.operator_up = not self.operator_up
            self.pending.clear()
            self.replicas[self.active] = Replica(lambda: self.clock)
            self.replica.slots.limit = self.limit

    @rule(name=st.sampled_from(NAMES))
    def index_catches_up(self, name):
        part = self.parts.get(name)
        if part is None:
            self.index.pop(name, None)
        else:
            self.index[name] = part.as_object()

    # --- the operator ------------------------------------------------------------------------

    def job_state(self, job: str) -> JobState:
        return self.jobs.get(job, JobState.MISSING)

    def stop_others(self, name: str, keep: str | None) -> None:
        for job in self.active_jobs(name):
            if job != keep:
                self.jobs[job] = JobState.STOPPED

    def decide(self, part: Part) -> Pending | None:
        """parts.Part.decide: every fact read at once. None: Ray cannot be asked (the poll fails)."""
        status = part.status
        phase = Phase(status["phase"]) if status.get("phase") else None
        job = status.get("submissionId") or ""
        state = JobState.MISSING
        if job and phase not in SETTLED:
            if not self.ray_up:
                return None
            state = self.job_state(job)
        document = part.document()
        facts = Facts(
            phase,
            state,
            change_of(document, part.suspend, part.generation, status),
            retries_left=int(status.get("retries") or 0) < MAX_RETRIES,
            retryable=state is not JobState.STOPPED,
            deadline_passed=part.deadline_passed,
            generation=part.generation,
            output_current=status.get("specHash") == output_hash(document),
        )
        part.decided_generations.add(part.generation)
        return Pending(facts, transition(facts), document, job, int(status.get("retries") or 0))

    def carry_out(self, part: Part, d: Pending) -> None:
        """parts.Part's actions, as the status writes and backend calls they make."""
        slots, step, name = self.replica.slots, d.step, part.name
        status = part.status
        if step.slot is Slot.RELEASE:
            slots.release(name)
        elif step.slot is Slot.HOLD:
            slots.adopt(name)
        generation = d.facts.generation
        if step.action is Action.WAIT:
            if d.facts.change is Change.POLICY:
                status["observedGeneration"] = generation
        elif step.action is Action.SUBMIT:
            self.submit(part, d)
        elif step.action is Action.FOLLOW:
            if not self.ray_up:
                return
            if name not in self.replica.adopted:
                self.stop_others(name, keep=d.job)
                self.replica.adopted.add(name)
            if d.facts.change is Change.POLICY:
                status["observedGeneration"] = generation
            status["phase"] = Phase.DOWNLOADING.value
        elif step.action is Action.SUCCEED:
            status["phase"] = Phase.SUCCEEDED.value
        elif step.action is Action.RETRY:
            status.update(phase=Phase.QUEUED.value, retries=d.attempt + 1, observedGeneration=generation)
        elif step.action is Action.SUSPEND:
            if not self.ray_up and (status.get("submissionId")):
                return  # stop_others raises: the next poll tries again
            self.stop_others(name, keep=None)
            if d.facts.stays_succeeded or (self.succeeded_meanwhile(part, d) and d.facts.output_current):
                status["observedGeneration"] = generation
            else:
                status.update(phase=Phase.SUSPENDED.value, observedGeneration=generation)
        else:  # FAIL
            if not self.ray_up and status.get("submissionId"):
                return
            self.stop_others(name, keep=None)
            if step.reason == "DeadlineExceeded" and self.succeeded_meanwhile(part, d):
                return
            status.update(phase=Phase.FAILED.value, observedGeneration=generation)

    def succeeded_meanwhile(self, part: Part, d: Pending) -> bool:
        if not d.job or d.facts.job.terminal or self.job_state(d.job) is not JobState.SUCCEEDED:
            return False
        part.status["phase"] = Phase.SUCCEEDED.value
        return True

    def submit(self, part: Part, d: Pending) -> None:
        name, generation, slots = part.name, d.facts.generation, self.replica.slots
        attempt = 0 if d.step.new_run else d.attempt
        job = f"{name}-g{generation}-a{attempt}"
        run = {"observedGeneration": generation, "specHash": output_hash(d.document), "retries": attempt}
        if slots.stale():  # Slots.acquire: the listing is taken again before a part is let in or waits
            slots.note_listing(self.list_holders(), self.clock)
        if not slots.take(name, part.created, part.policy):
            if part.generation != generation:  # give_up: the next poll decides on the new generation
                slots.release(name)
                return
            part.status.update(phase=Phase.QUEUED.value, **run)
            return
        if not self.ray_up:
            return  # stop_others raises; the slot stays claimed until the next poll decides
        self.stop_others(name, keep=job)
        if part.generation != generation:
            slots.release(name)
            return
        output = output_hash(d.document)
        assert output not in self.done_outputs[name], f"{name}: finished work submitted again ({job})"
        if job not in self.jobs:
            self.jobs[job] = JobState.RUNNING
            self.job_output[job] = output
        part.deadline_passed = part.deadline_passed and attempt != 0
        part.status.update(phase=Phase.PENDING.value, submissionId=job, **run)

    def delete_handler(self, part: Part) -> None:
        """parts.Part.stop, then kopf removes the finalizer."""
        self.replica.slots.release(part.name)
        phase = Phase(part.status["phase"]) if part.status.get("phase") else None
        job = part.status.get("submissionId")
        if delete_needs_backend(phase, job):
            if phase is not None:
                part.status["phase"] = Phase.STOPPING.value
            if not self.ray_up:
                return  # kopf retries the handler
        if self.ray_up:
            self.stop_others(part.name, keep=None)
        del self.parts[part.name]

    def poll(self, name: str) -> None:
        """One whole poll, decided and carried out with nothing in between."""
        part = self.parts.get(name)
        if part is None or not self.operator_up:
            return
        if part.deleting:
            self.delete_handler(part)
            return
        d = self.decide(part)
        if d is not None:
            self.carry_out(part, d)

    @rule(name=st.sampled_from(NAMES))
    def polled(self, name):
        if name not in self.pending:
            self.poll(name)

    @rule(name=st.sampled_from(NAMES))
    def decided_only(self, name):
        """A poll decides, and its step waits (a stop, a submission): the world moves on meanwhile."""
        part = self.parts.get(name)
        if part is None or part.deleting or not self.operator_up or name in self.pending:
            return
        d = self.decide(part)
        if d is not None:
            self.pending[name] = d

    @rule(name=st.sampled_from(NAMES))
    def carried_out(self, name):
        d = self.pending.pop(name, None)
        part = self.parts.get(name)
        if d is not None and part is not None and not part.deleting:
            self.carry_out(part, d)

    # --- the promises ------------------------------------------------------------------------

    @invariant()
    def at_most_one_job_per_part(self):
        for name in NAMES:
            assert len(self.active_jobs(name)) <= 1, (name, self.active_jobs(name))

    @invariant()
    def observed_only_what_was_decided(self):
        for part in self.parts.values():
            observed = part.status.get("observedGeneration")
            assert observed is None or observed in part.decided_generations, (part.name, observed)

    @invariant()
    def at_most_limit_parts_run(self):
        running = [n for n in NAMES if self.active_jobs(n) and n in self.parts and not self.parts[n].deleting]
        assert len(running) <= self.limit, (running, self.limit)

    @invariant()
    def a_dataset_succeeds_only_on_its_parts_current_generations(self):
        wanted = {
            name: part.document() for name, part in self.parts.items() if name in self.members and not part.deleting
        }
        stored = {
            name: {"metadata": {"generation": part.stored_generation}, "spec": part.document()}
            for name, part in self.parts.items()
        }
        seen = [
            self.index[name]
            if name in self.index and decided(self.index[name], want, stored[name])
            else undecided(name, self.index.get(name))
            for name, want in wanted.items()
        ]
        fields = summarize(seen)
        if dataset_phase(fields["partsByPhase"], fields["partsTotal"], False) is not DatasetPhase.SUCCEEDED:
            return
        for name in wanted:
            part = self.parts[name]
            assert part.status.get("phase") == Phase.SUCCEEDED.value, (name, part.status)
            assert part.status.get("specHash") == output_hash(part.document()), (name, part.status)

    @rule()
    def settled(self):
        """With the operator and Ray up and the clock moving, every poll runs until nothing changes:
        then every edit is taken in, the queue has moved, and each status tells the truth."""
        if not (self.operator_up and self.ray_up):
            return
        self.pending.clear()  # the steps in flight end (their daemons went on)
        before = None
        for _ in range(12):
            self.clock += LISTING_AGE
            for name in NAMES:
                self.poll(name)
            now = {n: dict(p.status) for n, p in self.parts.items()}
            if now == before:
                break
            before = now
        self.index = {name: part.as_object() for name, part in self.parts.items()}  # the watch caught up
        assert not any(p.deleting for p in self.parts.values()), "a delete never ends"
        holding = [n for n, p in self.parts.items() if self.active_jobs(n)]
        for part in self.parts.values():
            status = part.status
            assert status.get("observedGeneration") == part.generation, ("edit swallowed", part.name, status)
            phase = status.get("phase")
            if phase in {s.value for s in SUBMITTED}:
                assert self.job_state(status["submissionId"]).active, ("status lies", part.name, status)
            if phase == Phase.QUEUED.value:
                assert len(holding) >= self.limit, ("the queue does not move", part.name, holding)
            if output_hash(part.document()) in self.done_outputs[part.name]:
                assert phase == Phase.SUCCEEDED.value, ("finished work not recorded", part.name, status)


LifecycleModel.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLifecycleModel = LifecycleModel.TestCase


# --- the scenarios, each one interleaving through the same model ---------------------------


def interleave(*steps, limit: int = 1, members: int = 1) -> LifecycleModel:
    """Run `steps` (rule names with their arguments) through the model, checking every promise after
    each, as the state machine does."""
    model = LifecycleModel()
    model.set_limit(limit, members)
    checks = [
        model.at_most_one_job_per_part,
        model.observed_only_what_was_decided,
        model.at_most_limit_parts_run,
        model.a_dataset_succeeds_only_on_its_parts_current_generations,
    ]
    for name, *args in steps:
        getattr(model, name)(*args)
        for check in checks:
            check()
    return model


def test_model_a_failover_leaves_no_slot_taken_by_a_part_deleted_meanwhile():
    model = interleave(
        ("polled", "a"),  # replica 0 runs a; b waits
        ("polled", "b"),
        ("world_moved", "failover"),  # a standby takes over...
        ("deleted", "a"),
        ("polled", "a"),  # ... and deletes a
        ("world_moved", "failover"),  # the standby goes: replica 0 resumes
        ("settled",),
    )
    assert model.active_jobs("b") == ["b-g1-a0"]


def test_model_an_edit_made_while_a_part_is_failed_runs():
    model = interleave(
        ("polled", "a"),
        ("job_ended", "a", "late"),
        ("decided_only", "a"),  # DeadlineExceeded decided; the stop takes a while...
        ("spec_edited", "a", "policy"),  # ... and the deadline is raised meanwhile
        ("carried_out", "a"),
    )
    assert model.parts["a"].status == {**model.parts["a"].status, "phase": "Failed", "observedGeneration": 1}
    model.settled()
    assert model.parts["a"].status["submissionId"] == "a-g2-a0"


def test_model_a_dataset_is_not_succeeded_for_a_generation_its_part_has_not_run():
    model = interleave(
        ("settled",), ("job_ended", "a", JobState.SUCCEEDED), ("settled",), ("spec_edited", "a", "output")
    )
    model.polled("a")
    model.a_dataset_succeeds_only_on_its_parts_current_generations()
    assert model.parts["a"].status["phase"] == Phase.QUEUED.value  # behind b, which ran meanwhile


def test_model_a_success_not_seen_before_a_suspend_stays_succeeded_and_is_never_redone():
    model = interleave(
        ("polled", "a"),
        ("job_ended", "a", JobState.SUCCEEDED),
        ("spec_edited", "a", "suspend"),
        ("settled",),
        ("spec_edited", "a", "resume"),
        ("settled",),
    )
    assert model.parts["a"].status["phase"] == Phase.SUCCEEDED.value
    assert model.jobs_of("a") == ["a-g1-a0"]


def test_model_a_suspend_with_an_output_edit_not_run_is_not_succeeded():
    model = interleave(
        ("polled", "a"),
        ("job_ended", "a", JobState.SUCCEEDED),
        ("spec_edited", "a", "output"),
        ("spec_edited", "a", "suspend"),
        ("settled",),
    )
    assert model.parts["a"].status["phase"] == Phase.SUSPENDED.value


def test_model_a_finished_part_is_deleted_while_ray_is_down():
    model = interleave(
        ("polled", "a"),
        ("job_ended", "a", JobState.SUCCEEDED),
        ("polled", "a"),
        ("world_moved", "ray"),
        ("deleted", "a"),
        ("polled", "a"),
    )
    assert "a" not in model.parts
