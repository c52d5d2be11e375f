"""One LaionPart as the operator holds it; the modules beside this one each add one idea to it."""

from __future__ import annotations

import time

from ..context import Operator
from ..resource import Resource


class PartObject(Resource):
    """kopf's live view of one LaionPart, and what its daemon remembers of it between polls."""

    op: Operator

    def __init__(self, op: Operator, body, stopped):
        super().__init__(op, body, stopped)
        self.uid: str = body["metadata"]["uid"]
        self.owner = {"namespace": self.namespace, "name": self.name, "uid": self.uid}
        self.adopted = False  # stray jobs looked for since this daemon started following
        self.credentials_backoff = 0.0
        self.moved_at = time.monotonic()  # when the counts last moved (spec.stallSeconds)
        self.last_counts: tuple | None = None

    def capped(self, seconds: float) -> float:
        """`seconds`, at most the operator's retryBackoffMaxSeconds."""
        return min(seconds, self.op.config.retry_backoff_max_seconds)
