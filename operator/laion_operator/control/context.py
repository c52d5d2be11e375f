"""The operator's context: what every part and dataset shares, made once at start-up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .backend import Backend
from .config import OperatorConfig
from .metrics import Metrics
from .slots import Slots

Key = tuple[str, str]  # a part's namespace and name


@dataclass
class Operator:
    """What every part shares: configuration, the job backend, the slots and the metrics.
    Made once at start-up and handed to every handler through kopf's memo."""

    config: OperatorConfig
    backend: Backend
    slots: Slots
    metrics: Metrics
    # Settled parts sleep until their object changes: a watch event sets the part's event.
    changes: dict[Key, asyncio.Event] = field(default_factory=dict)
    # Each part's backend submission in flight (a thread that a cancelled daemon cannot stop).
    submitting: dict[Key, set[asyncio.Future]] = field(default_factory=dict)

    async def submitted(self, key: Key, submit: Callable[..., Any], *args: Any) -> None:
        """Run the blocking `submit(*args)` in a thread, known to `submissions_done` until it returns."""
        task = asyncio.ensure_future(asyncio.to_thread(submit, *args))
        self.submitting.setdefault(key, set()).add(task)

        def done(_) -> None:
            if not task.cancelled():
                task.exception()  # seen here: the caller, cancelled meanwhile, may never look
            left = self.submitting.get(key, set())
            left.discard(task)
            if not left:
                self.submitting.pop(key, None)

        task.add_done_callback(done)
        await asyncio.shield(task)

    async def submissions_done(self, key: Key) -> None:
        """Wait for the part's submissions in flight: a delete lists its jobs only after them."""
        pending = self.submitting.get(key)
        if pending:
            await asyncio.wait(list(pending))

    def changed(self, key: Key) -> None:
        """A watch event for the part `key` (controller.wake): a sleeping part looks again."""
        event = self.changes.get(key)
        if event is not None:
            event.set()
