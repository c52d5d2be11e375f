"""The operator-wide limit on running parts (config maxConcurrentParts); the others wait, higher
spec.priority first, then oldest first (phase Queued).

The parts that hold a slot are counted from what the cluster says, not only from what this process
remembers: `listed` is a listing of the parts whose status is in a running phase, taken from the API
server itself (controller.py), so that a part deleted while the operator was down or paused, one that
a previous leader ran, or one whose daemon ended without saying so never keeps a slot that nobody
gives back. A watch-fed index cannot promise that: it drops an entry only on a DELETED event it saw,
and a paused replica's watches are closed. A listing is taken when a part is let in or has to wait
and the last one is older than `max_age` and names a part this process does not run itself, and at
once after a daemon stopped (a pause, a failover, a delete), when this process may have missed what
others did meanwhile. `claims` covers the moment
between a part taking a slot and its status saying so. Nothing here waits on I/O under a lock:
taking is one synchronous step of the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable


class Slots:
    def __init__(
        self,
        limit: int,
        on_change: Callable[[int], None] = lambda n: None,
        lister: Callable[[], Awaitable[Iterable]] | None = None,
        max_age: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limit = limit
        self.claims: set = set()
        self.waiting: dict = {}
        self.on_change = on_change
        self.lister = lister  # keys of the parts whose status holds a slot, from the API server
        self.max_age = max_age
        self.clock = clock
        self.listed: set = set()
        self.listed_at: float | None = None  # None: never listed, or a listing this process cannot trust
        self.released: dict = {}  # key -> when this process last gave its slot back
        self._listing: asyncio.Future | None = None
        self._wake = asyncio.Event()

    @property
    def running(self) -> set:
        return self.claims | self.listed

    # --- the listing -----------------------------------------------------------------------------

    def stale(self) -> bool:
        if self.lister is None:
            return False
        if self.listed_at is None:
            return True
        # Only a holder this process does not run itself can have ended unseen (its own it releases),
        # and none appears without a daemon stopping first: a listing of those alone stays good.
        return self.clock() - self.listed_at >= self.max_age and bool(self.listed - self.claims)

    def note_listing(self, holders: Iterable, started: float) -> None:
        """A listing started at `started` replaces the last one. A part this process released after it
        started is left out: its status write may have reached the API server after the listing."""
        self.listed = {k for k in holders if self.released.get(k, float("-inf")) <= started}
        self.listed_at = started
        self.released = {k: t for k, t in self.released.items() if t > started}
        self._notify()

    def forget_listing(self) -> None:
        """A daemon stopped without its part settling (a pause, a failover, the part deleted): other
        replicas may have started or ended parts meanwhile, so the next decision lists again."""
        self.listed_at = None

    async def refresh(self) -> None:
        """List again if the listing is stale; concurrent callers share one listing."""
        if not self.stale():
            return
        if self._listing is None:
            self._listing = asyncio.ensure_future(self._list())
        listing = self._listing
        try:
            await asyncio.shield(listing)
        finally:
            if self._listing is listing and listing.done():
                self._listing = None

    async def _list(self) -> None:
        assert self.lister is not None
        started = self.clock()
        self.note_listing(await self.lister(), started)

    # --- taking and giving back ------------------------------------------------------------------

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
        shutdown). `on_queued` runs once, outside any lock, when the part has to wait. A listing error
        propagates: the part says so and tries again (parts.Part.follow)."""
        queued = False
        while True:
            try:
                await self.refresh()
            except BaseException:
                self._leave(key)
                raise
            if self.take(key, created, priority() if callable(priority) else priority):
                return True
            if give_up():
                self._leave(key)
                return False
            if not queued and on_queued is not None:
                queued = True
                await on_queued()
                continue  # the write took a while: look again before sleeping
            wake = self._wake
            try:  # woken by a release, or after a while to look at give_up() and the listing again
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass

    def release(self, key) -> None:
        self.claims.discard(key)
        self.listed.discard(key)  # its status has left the running phases, or is about to
        self.released[key] = self.clock()
        self._leave(key)
        self._notify()

    def _leave(self, key) -> None:
        if self.waiting.pop(key, None) is not None:
            self.on_change(len(self.waiting))

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()
