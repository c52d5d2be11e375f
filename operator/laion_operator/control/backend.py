"""What the operator knows of a part's Ray job, whichever backend runs it: the job's state, the
backend's interface and the errors it raises.

Every state either backend can report maps onto one `JobState` (KubeRay's RayJob states through
`rayjobs.kuberay_state`), so that `lifecycle.transition` decides on one closed set, as KubeRay's own
controller switches over its `JobDeploymentStatus`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from ..spec import PartSpec


class JobState(str, enum.Enum):
    MISSING = "MISSING"  # the backend does not know the job: never submitted, deleted, or its Ray head lost
    PENDING = "PENDING"  # submitted; the driver has not started (a RayJob's cluster is being made)
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"  # a RayJob that Kueue (or its own spec.suspend) holds back: admitted later
    RETRYING = "RETRYING"  # a RayJob that KubeRay itself resubmits (its backoffLimit)
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED)

    @property
    def active(self) -> bool:
        """The job runs, or will without the operator doing anything: it may write into the output."""
        return self in (JobState.PENDING, JobState.RUNNING, JobState.SUSPENDED, JobState.RETRYING)

    @classmethod
    def of_ray(cls, status: str | None) -> JobState:
        """A Ray JobStatus (the Jobs API's `status`, a RayJob's `jobStatus`); unknown or empty: PENDING."""
        try:
            return cls(str(status or "PENDING").upper())
        except ValueError:
            return cls.PENDING


@dataclass(frozen=True)
class Job:
    id: str
    state: JobState
    message: str = ""
    exit_code: int | None = None  # the entrypoint's, where the backend knows it

    @property
    def terminal(self) -> bool:
        return self.state.terminal


def submission_prefix(uid: str) -> str:
    """What every job of one LaionPart's id starts with, whatever its generation or attempt."""
    return f"lp-{uid.replace('-', '')[:16]}-"


def submission_id(uid: str, generation: int, attempt: int) -> str:
    """The same object, generation and attempt always name the same job: resubmitting is a no-op."""
    return f"{submission_prefix(uid)}g{generation}-a{attempt}"


class BackendError(Exception):
    """The backend could not do what was asked; transient unless a subclass says otherwise."""


class BackendUnavailable(BackendError):
    """The Ray Jobs API (or the API server, for RayJobs) cannot be reached."""


class BackendRefused(BackendError):
    """The backend refused the operator (401/403): a missing or wrong token; fixed by configuration."""


class SubmissionFailed(BackendError):
    """The backend answered a submit, stop or status call with an error."""


class CredentialsRefused(BackendError):
    """Permanent for the part: the operator will not send credentials where anyone could read them."""


class Backend(Protocol):
    """Where a part's Ray jobs run (rayjobs.JobsAPIBackend, rayjobs.KubeRayBackend). `owner` is the
    LaionPart's namespace, name and uid. Every call is blocking (run in a thread) and raises BackendError."""

    def submit(self, owner: dict, job_id: str, spec: PartSpec, secret: dict[str, str] | None) -> None:
        """Start the job `job_id`; a no-op if it exists already."""

    def state(self, owner: dict, job_id: str) -> Job:
        """The job's state; JobState.MISSING if the backend does not know it."""

    def jobs(self, owner: dict) -> list[Job]:
        """Every job of the part the backend knows (ids starting with the part's submission_prefix)."""

    def stop(self, owner: dict, job_id: str) -> None:
        """Ask the job to stop (RayJobs: delete it); a no-op if it has ended or is gone."""
