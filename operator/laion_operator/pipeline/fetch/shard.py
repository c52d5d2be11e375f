"""A shard's fetch: its URLs handed out in row order within `maxPerHost` per host (the scheduler), many
in flight on one event loop, and the fetched bodies queued for the decode threads up to a bound in
bytes (the backlog), so that the network runs ahead of the CPU."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from ...spec import DECODE_BACKLOG_BYTES, Download
from .engine import Engine
from .errors import FetchError


class Scheduler:
    """Hands out URLs in row order, except that a host already at maxPerHost waits and the next URL of
    another host goes first; a waiting URL goes as soon as its host has room."""

    def __init__(self, keys: list, per_host: int):
        self.keys = keys
        self.per_host = per_host
        self.queue = deque(range(len(keys)))
        self.parked: dict = {}
        self.parked_total = 0
        self.ready: deque = deque()
        self.active: Counter = Counter()
        self.changed = asyncio.Condition()

    def _next(self) -> int | None:
        while self.ready:
            key = self.ready.popleft()
            waiting = self.parked.get(key)
            if waiting and self.active[key] < self.per_host:
                index = waiting.popleft()
                self.parked_total -= 1
                if not waiting:
                    del self.parked[key]
                self.active[key] += 1
                return index
        while self.queue:
            index = self.queue.popleft()
            key = self.keys[index]
            if key is None:
                return index
            if self.active[key] < self.per_host:
                self.active[key] += 1
                return index
            self.parked.setdefault(key, deque()).append(index)
            self.parked_total += 1
        return None

    async def take(self) -> int | None:
        """The next URL's index; None when every URL has been handed out."""
        async with self.changed:
            while True:
                index = self._next()
                if not self.parked_total and not self.queue:
                    self.changed.notify_all()  # nothing left to wait for: the idle workers end
                if index is not None or not self.parked_total:
                    return index
                await self.changed.wait()

    async def done(self, index: int) -> None:
        key = self.keys[index]
        if key is None:
            return
        async with self.changed:
            self.active[key] -= 1
            if key in self.parked:
                self.ready.append(key)
                self.changed.notify()


def host_key(url: str):
    try:
        parts = urlsplit(url)
        return (parts.hostname or "").lower(), parts.port
    except (ValueError, AttributeError, TypeError):
        return None


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


async def fetch_all(urls: list[str], opts: Download, handle: Handler, threads: int) -> Engine:
    """Fetch every URL; `handle(index, body, error)` runs on one of `threads` threads, in completion
    order. Returns the engine, closed."""
    loop = asyncio.get_running_loop()
    # getaddrinfo runs on the loop's default executor: enough threads for the lookups in flight.
    loop.set_default_executor(ThreadPoolExecutor(min(max(opts.max_in_flight, 4), 64), thread_name_prefix="dns"))
    scheduler = Scheduler([host_key(u) for u in urls], opts.max_per_host)
    backlog = Backlog(DECODE_BACKLOG_BYTES)
    with ThreadPoolExecutor(max(threads, 1), thread_name_prefix="decode") as pool:
        async with Engine(opts) as engine:

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


def run(urls: list[str], opts: Download, handle: Handler, threads: int) -> Engine:
    """`fetch_all` on a new event loop in this thread (a shard task's)."""
    return asyncio.run(fetch_all(urls, opts, handle, threads))
