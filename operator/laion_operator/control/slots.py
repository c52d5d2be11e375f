"""The operator-wide limit on running parts (config maxConcurrentParts); the others wait, higher
spec.priority first, then oldest first (phase Queued).

The parts that hold a slot are counted from what the cluster says, not only from what this process
remembers: `held` reads the kopf index of the parts whose status is in a running phase (controller.py),
so that a part deleted while the operator was down, one that a previous leader ran, or one whose
daemon ended without saying so never keeps a slot that nobody gives back. `claims` covers the
moment between a part taking a slot and its status saying so. Nothing here waits on I/O under a
lock: taking is one synchronous step of the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable


class Slots:
    def __init__(
        self, limit: int, on_change: Callable[[int], None] = lambda n: None, held: Callable[[], Iterable] = tuple
    ):
        self.limit = limit
        self.claims: set = set()
        self.waiting: dict = {}
        self.on_change = on_change
        self.held = held  # keys of the parts whose status holds a slot (controller: the kopf index)
        self._wake = asyncio.Event()

    @property
    def running(self) -> set:
        return self.claims | set(self.held())

    def adopt(self, key) -> None:
        """A part whose job already runs holds a slot without queueing."""
        self.claims.add(key)
        self._leave(key)

    def take(self, key, created: str, priority: int = 0) -> bool:
        """Take a slot if one is free and `key` is first in line; else wait in line (False)."""
        running = self.running
        if key in running:
            self.claims.add(key)
            self._leave(key)
            return True
        self.waiting[key] = (-priority, created, key)  # a priority changed while waiting counts at once
        self.on_change(len(self.waiting))
        if len(running) < self.limit and min(self.waiting.values())[-1] == key:
            self.claims.add(key)
            self._leave(key)
            self._notify()  # the next in line may be another part now
            return True
        return False

    async def acquire(
        self,
        key,
        created: str,
        on_queued: Callable[[], Awaitable[None]] | None = None,
        priority: int | Callable[[], int] = 0,
        give_up: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Take a slot, waiting in line; False if `give_up()` turned true meanwhile (a spec change, suspend,
        shutdown). `on_queued` runs once, outside any lock, when the part has to wait."""
        queued = False
        while not self.take(key, created, priority() if callable(priority) else priority):
            if give_up():
                self._leave(key)
                return False
            if not queued and on_queued is not None:
                queued = True
                await on_queued()
                continue  # the write took a while: look again before sleeping
            wake = self._wake
            try:  # woken by a release, or after a while to look at give_up() and the index again
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
        return True

    def release(self, key) -> None:
        self.claims.discard(key)
        self._leave(key)
        self._notify()

    def _leave(self, key) -> None:
        if self.waiting.pop(key, None) is not None:
            self.on_change(len(self.waiting))

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()
