"""The part's state machine (control/lifecycle.py) over every input, the slots, and the backends' state
mapping: no cluster, no Ray. The operator's four promises are checked here as properties of the one
transition function every path goes through."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from laion_operator.contract import Phase
from laion_operator.control import kube
from laion_operator.control.backend import JobState, submission_id, submission_prefix
from laion_operator.control.config import ConfigError, OperatorConfig
from laion_operator.control.datasets import dropped_fields
from laion_operator.control.lifecycle import SUBMITTED, Action, Change, Facts, Slot, change_of, output_hash, transition
from laion_operator.control.rayjobs import kuberay_state
from laion_operator.control.slots import Slots
from laion_operator.spec import apply_defaults
from tests.support.kuberay_states import KUBERAY_STATES

PHASES = [None, *Phase]
ALL = [
    Facts(phase, job, change, retries_left, retryable, deadline)
    for phase, job, change, retries_left, retryable, deadline in itertools.product(
        PHASES, JobState, Change, (True, False), (True, False), (True, False)
    )
]


def test_every_input_has_one_step_and_the_slot_follows_the_action():
    for facts in ALL:
        step = transition(facts)
        assert isinstance(step.action, Action), facts
        assert step.slot is {Action.SUBMIT: Slot.TAKE, Action.FOLLOW: Slot.HOLD}.get(step.action, Slot.RELEASE)


def test_finished_work_stays_finished():
    """A Succeeded part runs again only for a change of what its output depends on."""
    for facts in ALL:
        if facts.phase is Phase.SUCCEEDED and facts.change in (Change.NONE, Change.POLICY):
            assert transition(facts).action is Action.WAIT, facts
        if facts.phase is Phase.SUCCEEDED and facts.change is Change.OUTPUT:
            assert transition(facts).action is Action.SUBMIT and transition(facts).new_run, facts


def test_a_vanished_job_is_never_followed():
    for facts in ALL:
        if facts.phase in SUBMITTED and facts.job is JobState.MISSING and facts.change in (Change.NONE, Change.POLICY):
            step = transition(facts)
            assert step.action is (Action.RETRY if facts.retries_left else Action.FAIL), facts
            assert step.reason == "JobVanished"


def test_follow_only_an_active_job_and_submit_only_over_a_stoppable_one():
    for facts in ALL:
        step = transition(facts)
        if step.action is Action.FOLLOW:
            assert facts.job.active and facts.change in (Change.NONE, Change.POLICY), facts
            assert not (facts.deadline_passed and facts.phase in SUBMITTED)
        if step.action is Action.SUBMIT and facts.job.active:
            # Only a change of output or a re-run replaces a running job (its executor stops it first).
            assert facts.change is Change.OUTPUT or facts.phase in (Phase.FAILED, Phase.SUSPENDED), facts


def test_retries_are_bounded_and_suspend_wins_over_all_but_a_success_already_made():
    for facts in ALL:
        step = transition(facts)
        if step.action is Action.RETRY:
            assert facts.retries_left and (facts.job is JobState.MISSING or facts.retryable), facts
        if facts.change is Change.SUSPEND:
            succeeded = facts.phase in SUBMITTED and facts.job is JobState.SUCCEEDED
            assert step.action is (Action.SUCCEED if succeeded else Action.SUSPEND), facts
        if facts.change is Change.INVALID:
            assert step.action is Action.FAIL and step.reason == "InvalidSpec"


@pytest.mark.parametrize(
    "phase, job, change, expected",
    [
        (None, JobState.MISSING, Change.NONE, Action.SUBMIT),
        (Phase.QUEUED, JobState.FAILED, Change.NONE, Action.SUBMIT),  # a retry whose backoff ended
        (Phase.QUEUED, JobState.RUNNING, Change.NONE, Action.FOLLOW),  # submitted, then the operator died
        (Phase.DOWNLOADING, JobState.RUNNING, Change.POLICY, Action.FOLLOW),  # priority: no restart
        (Phase.DOWNLOADING, JobState.RUNNING, Change.OUTPUT, Action.SUBMIT),
        (Phase.DOWNLOADING, JobState.SUSPENDED, Change.NONE, Action.FOLLOW),  # a RayJob Kueue holds back
        (Phase.DOWNLOADING, JobState.SUCCEEDED, Change.NONE, Action.SUCCEED),
        (Phase.DOWNLOADING, JobState.FAILED, Change.NONE, Action.RETRY),
        (Phase.SUSPENDED, JobState.STOPPED, Change.POLICY, Action.SUBMIT),  # resume
        (Phase.SUSPENDED, JobState.STOPPED, Change.NONE, Action.WAIT),
        (Phase.FAILED, JobState.FAILED, Change.POLICY, Action.SUBMIT),  # e.g. maxRetries raised
        (Phase.SUCCEEDED, JobState.SUCCEEDED, Change.POLICY, Action.WAIT),  # resume of a finished part
    ],
)
def test_named_transitions(phase, job, change, expected):
    assert transition(Facts(phase, job, change)).action is expected


def test_deadline_and_exhausted_retries_name_their_reason():
    waiting = Facts(Phase.QUEUED, JobState.FAILED, Change.NONE, deadline_passed=True)  # a retry's backoff
    assert (transition(waiting).action, transition(waiting).reason) == (Action.FAIL, "DeadlineExceeded")
    assert (
        transition(Facts(Phase.DOWNLOADING, JobState.RUNNING, Change.NONE, deadline_passed=True)).reason
        == "DeadlineExceeded"
    )
    assert (
        transition(Facts(Phase.DOWNLOADING, JobState.FAILED, Change.NONE, retries_left=False)).reason
        == "RetriesExhausted"
    )
    assert transition(Facts(Phase.DOWNLOADING, JobState.STOPPED, Change.NONE, retryable=False)).reason == "JobFailed"


def spec(**extra) -> dict:
    return apply_defaults({"partId": "p", "source": {"urls": ["s.parquet"]}, "output": {"uri": "/o"}, **extra})


def test_only_output_fields_make_an_output_change():
    base = spec()
    status = {"observedGeneration": 1, "specHash": output_hash(base)}
    assert change_of(base, False, 1, status) is Change.NONE
    for policy in (
        {"priority": 5},
        {"maxRetries": 9},
        {"activeDeadlineSeconds": 60},
        {"stallSeconds": 30},
        {"suspend": False},
    ):
        assert change_of(spec(**policy), False, 2, status) is Change.POLICY, policy
    for output in (
        {"download": {"timeout": 3}},
        {"filter": {"minWidth": 10}},
        {"verify": False},
        {"heal": {"reasons": ["timeout"]}},
    ):
        assert change_of(spec(**output), False, 2, status) is Change.OUTPUT, output
    assert change_of(spec(suspend=True), True, 2, status) is Change.SUSPEND
    assert change_of(spec(priority=5), False, 2, {"observedGeneration": 1}) is Change.OUTPUT  # no hash: re-run


def test_job_ids_share_the_parts_prefix():
    uid = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
    assert submission_id(uid, 3, 2) == "lp-0a1b2c3d4e5f6789-g3-a2"
    assert submission_id(uid, 3, 2).startswith(submission_prefix(uid))


@pytest.mark.parametrize("status, state", KUBERAY_STATES)
def test_every_rayjob_state_maps(status, state):
    job = kuberay_state("j", status)
    assert job.state is state
    if status.get("reason"):
        assert status["reason"] in job.message


def test_a_template_backoff_limit_is_refused():
    with pytest.raises(ConfigError, match="rayJobTemplate.backoffLimit"):
        OperatorConfig(mode="kuberay", ray_job_template={"backoffLimit": 2}).check()


def test_long_names_make_valid_label_values():
    name = "d" * 70
    value = kube.label_value(name)
    assert len(value) <= 63 and value != kube.label_value("d" * 71)
    assert kube.label_value("short") == "short"


def test_dropped_fields_name_what_a_stale_crd_pruned():
    assert dropped_fields({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 2}}) == ["spec.b.d"]


def test_slots_run_higher_priority_first_then_oldest_and_let_a_waiter_give_up():
    async def scenario() -> tuple[list[str], list[str]]:
        slots, order, queued = Slots(1), [], []
        await slots.acquire("running", "2026-01-01T00:00:00Z", on_queued=None)
        gone = asyncio.Event()

        async def part(name: str, created: str, priority: int, give_up=lambda: False):
            async def on_queued():
                queued.append(name)

            if await slots.acquire(name, created, on_queued, priority=priority, give_up=give_up):
                order.append(name)
                await asyncio.sleep(0.05)
                slots.release(name)

        waiters = [
            asyncio.create_task(part("old-low", "2026-01-01T00:00:01Z", 0)),
            asyncio.create_task(part("new-low", "2026-01-01T00:00:03Z", 0)),
            asyncio.create_task(part("new-high", "2026-01-01T00:00:04Z", 5)),
            asyncio.create_task(part("top-but-suspended", "2026-01-01T00:00:00Z", 9, gone.is_set)),
        ]
        while len(queued) < 4:
            await asyncio.sleep(0.01)
        gone.set()  # e.g. suspended while queued: it leaves the queue without a slot
        await asyncio.sleep(1.5)
        slots.release("running")
        await asyncio.gather(*waiters)
        return order, sorted(slots.waiting)

    order, left = asyncio.run(scenario())
    assert order == ["new-high", "old-low", "new-low"]
    assert left == []


def test_slots_count_the_parts_the_api_server_lists_and_list_again_after_a_pause():
    """A part the listing shows running holds a slot this process never gave. A listing is trusted
    for max_age only, and not at all once a daemon stopped (a pause, a failover): a part deleted
    meanwhile frees its slot at the next decision, not at the next restart."""
    held = {("ns", "elsewhere")}
    listings = []

    async def lister():
        listings.append(set(held))
        return set(held)

    async def scenario():
        now = [0.0]
        slots = Slots(1, lister=lister, max_age=10, clock=lambda: now[0])
        assert not await asyncio.wait_for(
            slots.acquire(("ns", "queued"), "2026-01-01T00:00:00Z", give_up=lambda: True), 5
        )
        held.clear()  # deleted while this replica was paused: no watch event told it
        now[0] += 1
        assert not slots.take(("ns", "queued"), "2026-01-01T00:00:00Z")  # the listing is young
        slots.forget_listing()  # the daemons stopped and started again (kopf's pause and resume)
        assert await asyncio.wait_for(slots.acquire(("ns", "queued"), "2026-01-01T00:00:00Z"), 5)
        assert slots.running == {("ns", "queued")} and len(listings) == 2
        slots.release(("ns", "queued"))
        assert slots.running == set()
        held.add(("ns", "other"))  # a part another replica runs: this one resumes after a pause
        slots.forget_listing()
        late = ("ns", "late"), "2026-01-01T00:00:00Z"
        assert not await asyncio.wait_for(slots.acquire(*late, give_up=lambda: True), 5)
        held.clear()  # ... and it ends, unseen by this one
        now[0] += 9
        assert not await asyncio.wait_for(slots.acquire(*late, give_up=lambda: True), 5)
        now[0] += 1  # a listing that names a part of another's is trusted for max_age only
        assert await asyncio.wait_for(slots.acquire(*late), 5)
        assert len(listings) == 4
        now[0] += 100  # this process's own holders alone: nothing to list again for
        assert slots.take(("ns", "late"), "2026-01-01T00:00:00Z") and not slots.stale()

    asyncio.run(scenario())


def test_a_listing_leaves_out_a_part_released_after_it_started():
    """Its status write (leaving the running phases) may have reached the API server after the list."""
    slots = Slots(1, lister=lambda: None, clock=lambda: 5.0)
    slots.release(("ns", "done"))
    slots.note_listing({("ns", "done")}, started=4.0)
    assert slots.running == set()
    slots.note_listing({("ns", "done")}, started=6.0)
    assert slots.running == {("ns", "done")}


class Recorded:
    """The API server's side of status writes: what the operator patched."""

    def __init__(self, monkeypatch):
        import kopf

        self.patches: list[dict] = []
        self.events: list[str] = []
        monkeypatch.setattr(
            kube, "patch_status", lambda ns, name, patch, plural=kube.PLURAL: self.patches.append(patch)
        )
        monkeypatch.setattr(kopf, "event", lambda body, reason, message, **_: self.events.append(reason))


def running_part(status: dict):
    from laion_operator.control.metrics import Metrics
    from laion_operator.control.parts import Operator, Part

    op = Operator(OperatorConfig(), None, Slots(1), Metrics())
    body = {"metadata": {"namespace": "ns", "name": "p", "uid": "u", "generation": 1}, "spec": spec(), "status": status}
    return Part(op, body, None)


def test_counts_never_go_backwards_while_a_new_attempt_filters(monkeypatch):
    from laion_operator.contract import Progress
    from laion_operator.spec import PartSpec

    api = Recorded(monkeypatch)
    part = running_part(
        {
            "phase": "Downloading",
            "output": "/o",
            "rowsRead": 100,
            "rowsKept": 90,
            "images": {"ok": 40, "failed": 5, "failedByReason": {"timeout": 5}},
            "shards": {"total": 9, "done": 4, "failed": 0},
            "bytesWritten": 1000,
        }
    )
    fresh = Progress(part_id="p", phase=Phase.FILTERING, rows_read=10)  # attempt 2 has read 10 rows so far
    asyncio.run(part.publish(Phase.FILTERING, fresh, "job", stalled=False))
    written = api.patches[-1]
    assert (
        written["rowsRead"],
        written["rowsKept"],
        written["images"]["ok"],
        written["shards"]["done"],
        written["bytesWritten"],
    ) == (100, 90, 40, 4, 1000)
    assert written["shardsProgress"] == "4/9"
    assert (written["images"]["failed"], written["images"]["failedByReason"]) == (5, {"timeout": 5})
    final = Progress(
        part_id="p", phase=Phase.SUCCEEDED, rows_read=100, rows_kept=90, images_ok=38, shards_total=9, shards_done=9
    )
    asyncio.run(part.publish(Phase.SUCCEEDED, final, "job", finished=True))
    assert api.patches[-1]["images"]["ok"] == 38  # the finished part's count is its shards' own
    assert PartSpec.from_dict(spec()).stall_seconds == 900


def test_a_part_whose_counts_stand_still_is_stalled_once(monkeypatch):
    from laion_operator.contract import Progress
    from laion_operator.spec import PartSpec

    api = Recorded(monkeypatch)
    part = running_part({"phase": "Downloading", "output": "/o"})
    still = Progress(part_id="p", phase=Phase.DOWNLOADING, rows_read=10)
    quick = PartSpec.from_dict(spec(stallSeconds=1))
    assert not part.stalled(quick, still)
    part.moved_at -= 5  # five seconds without a count moving
    for _ in range(2):
        asyncio.run(part.publish(Phase.DOWNLOADING, still, "job", stalled=part.stalled(quick, still)))
    stalled = [c for c in api.patches[-1]["conditions"] if c["type"] == "Stalled"]
    assert stalled and stalled[0]["status"] == "True" and stalled[0]["reason"] == "NoProgress"
    assert api.events.count("Stalled") == 1
    assert 'laion_part_stalled{namespace="ns",part="p"} 1.0' in prometheus_text(part.op.metrics)
    moved = Progress(part_id="p", phase=Phase.DOWNLOADING, rows_read=20)
    asyncio.run(part.publish(Phase.DOWNLOADING, moved, "job", stalled=part.stalled(quick, moved)))
    assert [c["status"] for c in api.patches[-1]["conditions"] if c["type"] == "Stalled"] == ["False"]


def prometheus_text(metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_the_progress_of_another_run_is_not_this_jobs(monkeypatch, tmp_path):
    """A re-run's job has not written its progress yet: the last run's (Annotating, say) is not shown
    as the new job's phase, and a success is recorded only with the counts of the job that made it."""
    from laion_operator.contract import PROGRESS, Progress
    from laion_operator.spec import PartSpec
    from laion_operator.storage import Store

    Recorded(monkeypatch)
    part = running_part({"phase": "Downloading", "output": str(tmp_path)})
    out = PartSpec.from_dict(spec(output={"uri": str(tmp_path)}))
    Store(out.output).write_json(Progress(part_id="p", phase=Phase.ANNOTATING, job="lp-old-g1-a0").to_json(), PROGRESS)
    assert asyncio.run(part.read_progress(out, None, job="lp-new-g2-a0")) is None
    with pytest.raises(OSError, match="lp-old-g1-a0"):
        asyncio.run(part.read_progress(out, None, strict=True, job="lp-new-g2-a0"))
    assert asyncio.run(part.read_progress(out, None, job="lp-old-g1-a0")).phase == "Annotating"
    Store(out.output).write_json(Progress(part_id="p", phase=Phase.ANNOTATING).to_json(), PROGRESS)  # an older job's
    assert asyncio.run(part.read_progress(out, None, job="lp-new-g2-a0")).phase == "Annotating"
