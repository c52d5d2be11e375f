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

The part's handling, one idea a module, each adding to the one before:
`base` (the object and what its daemon remembers) ← `publish` (the status), `reads` (Secrets,
progress, the output's manifest), `jobs` (the backend's jobs, stopping them, the clocks) ←
`facts` (one poll's Decision) ← `actions` (the switch over the decided step) ← `part` (the loop).
The operator's shared context is `control.context`.
"""

from __future__ import annotations

from ..context import Operator
from ..resource import condition, now
from ..slots import Slots
from .part import Part
from .publish import verified_condition

__all__ = ["Operator", "Part", "Slots", "condition", "now", "verified_condition"]
