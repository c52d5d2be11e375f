"""Crash points for the fault tests: the operator dies at a chosen step of a part's life, as it would
on a node failure, so that a test can prove a restarted operator picks the part up exactly once.

LAION_OPERATOR_CRASH_AT names the step; unset (as in every deployment) nothing happens.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "LAION_OPERATOR_CRASH_AT"
# The job's submission is decided, the Jobs API not called yet; the job is submitted, its id not yet
# in the status; the job annotates (or has just ended) and the final status is not written yet.
POINTS = ("before-submit", "after-submit", "annotating")
EXIT_CODE = 70  # distinct from kopf's own exits, so that a test tells the crash from a failure

log = logging.getLogger(__name__)


def crash_at(point: str) -> None:
    if os.environ.get(ENV) != point:
        return
    log.critical("%s=%s: the operator exits here, as a test asked", ENV, point)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_CODE)  # no cleanup, no finalizers: what a killed process leaves behind
