"""A shard's fetch: its URLs handed out in row order within each host's allowance (the scheduler: the
task's own `maxPerHost`, or its leases of the cluster's host budget, budget.py), many
in flight on one event loop, and the fetched bodies queued for the decode threads up to a bound in
bytes (the backlog), so that the network runs ahead of the CPU."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ...spec import DECODE_BACKLOG_BYTES, Download
from .budget import ClusterBudget, Leases, TaskLimits, host_key
from .engine import Engine
from .errors import FetchError


class Scheduler:
    """Hands out URLs in row order, except that a host at its allowance waits and the next URL of
    another host goes first; a waiting URL goes as soon as its host has room. The allowance is the
    limits' (`budget`: the task's own maxPerHost, or its leases of the cluster's budget), told what
    each host's URLs want; at most `lookahead` hosts wait for a first lease at once."""

    def __init__(self, keys: list, limits: TaskLimits, lookahead: int):
        self.keys = keys
        self.limits = limits
        self.lookahead = lookahead
        self.queue = deque(range(len(keys)))
        self.parked: dict = {}
        self.parked_total = 0
        self.unleased: set = set()  # hosts whose URLs wait for a first lease
        self.ready: deque = deque()
        self.active: Counter = Counter()
        self.changed = asyncio.Condition()

    def _room(self, key) -> bool:
        return self.active[key] < self.limits.allowed(key)

    def _want(self, key) -> None:
        self.limits.want(key, self.active[key] + len(self.parked.get(key, ())), self.active[key])

    def _next(self) -> int | None:
        while self.ready:
            key = self.ready[0]
            waiting = self.parked.get(key)
            if waiting and self._room(key):
                index = waiting.popleft()
                self.parked_total -= 1
                if not waiting:
                    del self.parked[key]
                    self.unleased.discard(key)
                    self.ready.popleft()
                self.active[key] += 1
                return index
            self.ready.popleft()
        while self.queue and len(self.unleased) < self.lookahead:
            index = self.queue.popleft()
            key = self.keys[index]
            if key is None:
                return index
            if self._room(key):
                self.active[key] += 1
                return index
            self.parked.setdefault(key, deque()).append(index)
            self.parked_total += 1
            if not self.limits.allowed(key):
                self.unleased.add(key)
            self._want(key)
        return None

    async def take(self) -> int | None:
        """The next URL's index; None when every URL has been handed out."""
        async with self.changed:
            while True:
                index = self._next()
                if not self.parked_total and not self.queue:
                    self.changed.notify_all()  # nothing left to wait for: the idle workers end
                if index is not None or (not self.parked_total and not self.queue):
                    return index
                await self.changed.wait()

    async def done(self, index: int) -> None:
        key = self.keys[index]
        if key is None:
            return
        async with self.changed:
            self.active[key] -= 1
            self._want(key)
            if key in self.parked:
                self.ready.append(key)
                self.changed.notify()

    async def wake(self, keys) -> None:
        """Hosts whose allowance grew: their waiting URLs may go."""
        async with self.changed:
            for key in keys:
                self.unleased.discard(key)
                if key in self.parked:
                    self.ready.append(key)
            self.changed.notify_all()


Handler = Callable[[int, "bytes | None", "FetchError | None"], None]


class Backlog:
    """Fetched bodies handed to the decode threads and not yet handled, bounded in bytes: a fetch slot
    with a body waits here while the queue is full (one body always fits, however large). The first
    handler error is kept, and ends the shard."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.space = asyncio.Event()
        self.handlers: set[asyncio.Future] = set()
        self.error: BaseException | None = None

    async def hand_over(self, size: int, run: Callable[[], asyncio.Future]) -> None:
        while self.held and self.held + size > self.limit and self.error is None:
            self.space.clear()
            await self.space.wait()
        if self.error is not None:
            raise self.error
        self.held += size
        handler = run()
        self.handlers.add(handler)
        handler.add_done_callback(lambda done: self._handled(done, size))

    def _handled(self, handler: asyncio.Future, size: int) -> None:
        self.handlers.discard(handler)
        self.held -= size
        if not handler.cancelled() and handler.exception() is not None and self.error is None:
            self.error = handler.exception()
        self.space.set()

    async def drain(self) -> None:
        """Wait for every handler; raise the first error (say, the writer's)."""
        if self.handlers:
            await asyncio.wait(list(self.handlers))
        if self.error is not None:
            raise self.error


async def fetch_all(
    urls: list[str], opts: Download, handle: Handler, threads: int, budget: ClusterBudget | None = None
) -> Engine:
    """Fetch every URL; `handle(index, body, error)` runs on one of `threads` threads, in completion
    order. Returns the engine, closed. `budget`: the cluster's host budget (None: the per-task scheme)."""
    loop = asyncio.get_running_loop()
    # getaddrinfo runs on the loop's default executor: enough threads for the lookups in flight.
    loop.set_default_executor(ThreadPoolExecutor(min(max(opts.max_in_flight, 4), 64), thread_name_prefix="dns"))
    limits = Leases(opts, budget) if budget is not None else TaskLimits(opts)
    scheduler = Scheduler([host_key(u) for u in urls], limits, lookahead=opts.max_in_flight)
    if isinstance(limits, Leases):
        limits.wake = scheduler.wake
    backlog = Backlog(DECODE_BACKLOG_BYTES)
    with ThreadPoolExecutor(max(threads, 1), thread_name_prefix="decode") as pool:
        async with limits, Engine(opts, limits) as engine:

            async def worker():
                while (index := await scheduler.take()) is not None:
                    if backlog.error is not None:
                        raise backlog.error
                    try:
                        data, error = await engine.fetch(urls[index]), None
                    except FetchError as err:
                        data, error = None, err
                    await scheduler.done(index)
                    await backlog.hand_over(
                        len(data or b""), functools.partial(loop.run_in_executor, pool, handle, index, data, error)
                    )

            tasks = [asyncio.ensure_future(worker()) for _ in range(min(opts.max_in_flight, len(urls)))]
            try:
                if tasks:
                    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    for task in done:
                        task.result()
                await backlog.drain()
            finally:
                for handler in backlog.handlers:  # an error: the queued bodies are not handled
                    handler.cancel()
    return engine


def run(urls: list[str], opts: Download, handle: Handler, threads: int, budget: ClusterBudget | None = None) -> Engine:
    """`fetch_all` on a new event loop in this thread (a shard task's)."""
    return asyncio.run(fetch_all(urls, opts, handle, threads, budget))
