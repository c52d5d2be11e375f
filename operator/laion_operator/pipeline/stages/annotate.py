"""The annotate stage: the annotation files trainers read and the part's summary (pipeline/annotate.py)."""

from __future__ import annotations

from ...contract import Phase
from ...summary import Summary
from ..annotate import annotate
from .base import Run


def wanted(run: Run) -> bool:
    return True


def run(run: Run) -> Summary:
    tracker = run.tracker
    tracker.phase(Phase.ANNOTATING)
    tracker.end()
    run.summary = tracker.store.retrying(
        "writing the annotations",
        lambda: annotate(run.spec, tracker.store, list(tracker.finished.values()), tracker.progress),
    )
    return run.summary
