"""What each RayJob status KubeRay writes means to a part (control/rayjobs.kuberay_state): the table
test_lifecycle checks the mapping against, and the end-to-end tests check against the states KubeRay
itself reached in real pods (each row marked `seen` was written by KubeRay v1.5.0 on the test bed's
node: a part's job succeeding, and one failing)."""

from __future__ import annotations

from laion_operator.control.backend import JobState

KUBERAY_STATES: list[tuple[dict, JobState]] = [
    ({}, JobState.PENDING),
    ({"jobDeploymentStatus": "Initializing"}, JobState.PENDING),  # seen
    ({"jobDeploymentStatus": "Running"}, JobState.PENDING),  # seen: the submitter has not submitted yet
    ({"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, JobState.PENDING),  # seen
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, JobState.RUNNING),  # seen
    # seen: the Ray job's end comes before KubeRay's (its submitter Job still finishing)
    ({"jobDeploymentStatus": "Running", "jobStatus": "SUCCEEDED"}, JobState.SUCCEEDED),
    ({"jobDeploymentStatus": "Running", "jobStatus": "FAILED"}, JobState.FAILED),  # seen
    ({"jobDeploymentStatus": "Waiting"}, JobState.PENDING),
    ({"jobDeploymentStatus": "Suspended"}, JobState.SUSPENDED),  # Kueue holds it: not Pending forever
    ({"jobDeploymentStatus": "Suspending", "jobStatus": "RUNNING"}, JobState.SUSPENDED),
    ({"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED"}, JobState.RETRYING),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, JobState.SUCCEEDED),  # seen
    ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}, JobState.FAILED),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, JobState.STOPPED),
    ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, JobState.FAILED),
    ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}, JobState.FAILED),
    ({"jobDeploymentStatus": "ValidationFailed", "message": "bad"}, JobState.FAILED),
    ({"jobDeploymentStatus": "Running", "jobStatus": "SOMETHING_NEW"}, JobState.PENDING),
]


def expected_state(deployment: str, job: str) -> JobState | None:
    """The table's state for a (jobDeploymentStatus, jobStatus) pair; None if the table lacks it."""
    for status, state in KUBERAY_STATES:
        if (status.get("jobDeploymentStatus") or "", status.get("jobStatus") or "") == (deployment, job):
            return state
    return None
