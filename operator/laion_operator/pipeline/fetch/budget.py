"""A host budget shared by every shard task of every part on one Ray cluster (`hostBudget: cluster`):
`maxPerHost` connections to one host across the cluster, at most `maxPerHostPerTask` of them a task's,
and AIMD on a host that says slow down (429, or 503 with Retry-After): its cluster-wide limit halves
(never below 1), every task waits out its Retry-After, and the limit grows back by one for every
`RAISE_INTERVAL` of answers without a slow-down, up to `maxPerHost`.

The ledger (`Ledger`, plain: its rules are tested without Ray) lives in `ACTORS` named, detached Ray
actors in the namespace `NAMESPACE`, a host's state in the one its name hashes to, so that separate Ray
jobs (separate parts) find the same actors; they ask for no CPU, so they never take a shard task's.

A task leases slots (`Leases`): it holds them across many URLs of a host, asks for more as its queue
of that host grows and gives back what it no longer needs, so a URL costs no round-trip unless its
host is new to the task. Every ask of one sync goes to each actor in one call, and while a call is
out the next asks gather, so a task's calls stay few however many hosts it meets. Leases carry a
time-to-live the task renews every `RENEW` seconds: a killed task's slots come back by themselves.
Should the actors be unreachable, the task goes on under the per-task scheme (`TaskLimits`) and
says so in its log: politeness degrades, nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ... import __version__
from ...spec import Download

log = logging.getLogger(__name__)

NAMESPACE = "laion-operator"
# One: an actor is a process (about 140 MB and a second of CPU to start, which a 2-core node running one
# part pays in its stage: 4 of them cost the calm profile 2 s), and one answers thousands of syncs a
# second (a task syncs about once a second). A cluster of thousands of tasks raises it to spread them.
ACTORS = 1
LEASE_TTL = 15.0  # seconds a task's leases outlive its last sync (a killed task's come back then)
RENEW = 1.0  # seconds between a task's syncs while it holds anything: renewals, news of slowed hosts
CUT_INTERVAL = 1.0  # the 429s of one burst, seen by many tasks at once, halve the limit once
RAISE_INTERVAL = 1.0  # +1 to a slowed host's limit per this many seconds of answers without a slow-down
CALL_TIMEOUT = 60.0  # an actor's answer past this: the task falls back to the per-task scheme
DEFAULT_PORTS = {"http": 80, "https": 443}


def host_key(url: str) -> str | None:
    """`host:port` of a URL (the scheme's port when it names none), as the budget and the engine key a
    host; None for a URL without one."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        return f"{host}:{parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 0)}" if host else None
    except (ValueError, AttributeError, TypeError):
        return None


def per_task(opts: Download) -> int:
    """Connections one task opens to one host at most, in either scheme."""
    return min(opts.max_per_host, opts.max_per_host_per_task)


@dataclass(frozen=True)
class Ask:
    """What a task says of one host in a sync."""

    want: int  # slots it wants to hold (URLs of the host in flight and waiting, at most its share)
    in_use: int  # slots it uses now: never given back under it
    budget: int  # its part's maxPerHost
    answered: int = 0  # answers without a slow-down since its last ask
    slowed: float | None = None  # a slow-down answer's wait in seconds (0: none given)


@dataclass(frozen=True)
class Grant:
    """The ledger's answer for one host."""

    held: int  # slots the ledger counts as the task's
    allowed: int  # slots the task may use now (fewer than `held` while it must give some back)
    wait: float  # seconds before the host may be asked anything (its Retry-After, for every task)
    limit: int  # the host's cluster-wide limit now
    contended: bool  # other tasks wait for this host: give back what is not in use at once


@dataclass
class _Host:
    budget: int
    limit: int
    held: dict[str, int] = field(default_factory=dict)
    wanting: dict[str, int] = field(default_factory=dict)  # tasks holding less than they want
    not_before: float = 0.0
    changed: float = -1e18  # the limit's last cut or raise
    cut: float = -1e18
    slowdowns: int = 0


class Ledger:
    """Every host's limit and leases (the state of one actor). `now` is the caller's clock: the rules
    are tested without Ray or waiting."""

    def __init__(self, cut_interval: float = CUT_INTERVAL, raise_interval: float = RAISE_INTERVAL):
        self.cut_interval, self.raise_interval = cut_interval, raise_interval
        self.hosts: dict[str, _Host] = {}
        self.expiry: dict[str, float] = {}  # task -> when its leases lapse
        self.task_hosts: dict[str, set[str]] = {}
        self.notices: dict[str, set[str]] = {}  # task -> hosts it holds whose state changed under it

    def sync(self, task: str, asks: dict[str, Ask], ttl: float, now: float) -> dict[str, Grant]:
        """The task's asks answered, its leases renewed for `ttl`, and the hosts it holds that were
        slowed or became contended since its last sync answered too."""
        self.expire(now)
        self.expiry[task] = now + ttl
        grants = {key: self._ask(task, key, ask, now) for key, ask in asks.items()}
        for key in self.notices.pop(task, set()) - grants.keys():
            if key in self.hosts:
                grants[key] = self._grant(task, key, self.hosts[key], now)
        if not self.task_hosts.get(task):
            self._forget(task)
        return grants

    def expire(self, now: float) -> None:
        for task in [t for t, when in self.expiry.items() if when < now]:
            for key in self.task_hosts.get(task, set()):
                host = self.hosts[key]
                host.held.pop(task, None)
                host.wanting.pop(task, None)
                self._drop_if_idle(key, host, now)
            self._forget(task)

    def _forget(self, task: str) -> None:
        self.expiry.pop(task, None)
        self.task_hosts.pop(task, None)
        self.notices.pop(task, None)

    def _ask(self, task: str, key: str, ask: Ask, now: float) -> Grant:
        host = self.hosts.get(key)
        if host is None:
            host = self.hosts[key] = _Host(budget=ask.budget, limit=ask.budget)
        others = host.held.keys() - {task}
        host.budget = min(host.budget, ask.budget) if others else ask.budget
        host.limit = min(host.limit, host.budget)
        if ask.slowed is not None:
            host.not_before = max(host.not_before, now + ask.slowed)
            if now - host.cut >= self.cut_interval:
                host.limit = max(1, host.limit // 2)
                host.slowdowns += 1
                host.cut = host.changed = now
                self._notify(host, key, task)
        elif ask.answered and host.limit < host.budget and now - host.changed >= self.raise_interval:
            host.limit += 1
            host.changed = now
        held = host.held.get(task, 0)
        target = min(ask.want, self._share(host, task, ask.want))
        if target < held:
            held = max(ask.in_use, target)
        elif target > held:
            room = host.limit - sum(host.held.values())
            held += max(min(target - held, room), 0)
        if held < ask.want:
            if task not in host.wanting:
                self._notify(host, key, task)
            host.wanting[task] = ask.want
        else:
            host.wanting.pop(task, None)
        if held:
            host.held[task] = held
            self.task_hosts.setdefault(task, set()).add(key)
        else:
            host.held.pop(task, None)
            self.task_hosts.get(task, set()).discard(key)
        grant = self._grant(task, key, host, now)
        self._drop_if_idle(key, host, now)
        return grant

    def _share(self, host: _Host, task: str, want: int) -> int:
        """What a task may hold of the host: all of its limit unless others want some, then an even
        split (at least one)."""
        tasks = {t for t, n in host.held.items() if n} | host.wanting.keys() | ({task} if want else set())
        if not (host.wanting.keys() - {task}) and sum(host.held.values()) <= host.limit:
            return host.limit
        return max(host.limit // max(len(tasks), 1), 1)

    def _grant(self, task: str, key: str, host: _Host, now: float) -> Grant:
        held = host.held.get(task, 0)
        contended = bool(host.wanting.keys() - {task}) or sum(host.held.values()) > host.limit
        allowed = min(held, self._share(host, task, held)) if contended else held
        return Grant(held, allowed, max(host.not_before - now, 0.0), host.limit, contended)

    def _notify(self, host: _Host, key: str, task: str) -> None:
        for other in host.held.keys() - {task}:
            self.notices.setdefault(other, set()).add(key)

    def _drop_if_idle(self, key: str, host: _Host, now: float) -> None:
        """A host nobody holds or waits for, at its full budget and not waited out, is forgotten."""
        if not host.held and not host.wanting and host.limit >= host.budget and host.not_before <= now:
            del self.hosts[key]


def shard_of(key: str, actors: int = ACTORS) -> int:
    return zlib.crc32(key.encode()) % actors  # the same in every process, unlike hash()


class LedgerActor:
    """One shard of the cluster's ledger, as a Ray actor (`actors`): the ledger on its own clock."""

    def __init__(self, cut_interval: float = CUT_INTERVAL, raise_interval: float = RAISE_INTERVAL) -> None:
        self.ledger = Ledger(cut_interval, raise_interval)

    def sync(self, task: str, asks: dict[str, Ask], ttl: float) -> dict[str, Grant]:
        return self.ledger.sync(task, asks, ttl, time.monotonic())

    def state(self, key: str) -> tuple[int, int, int]:
        """Slots held of the host across the cluster, its limit now (0: not known) and how often it was
        slowed."""
        self.ledger.expire(time.monotonic())
        host = self.ledger.hosts.get(key)
        return (sum(host.held.values()), host.limit, host.slowdowns) if host else (0, 0, 0)


@dataclass(frozen=True)
class ClusterBudget:
    """The handle a shard task gets: the ledger's actors (picklable, as Ray passes handles)."""

    actors: tuple[Any, ...]

    def call(self, key: str) -> Any:
        return self.actors[shard_of(key, len(self.actors))]


def cluster_budget(opts: Download) -> ClusterBudget | None:
    """The cluster's budget when the part asks for it and this process is on a Ray cluster; None runs
    the per-task scheme (fetches outside Ray: unit tests, the benchmark's fetch-only runs)."""
    if opts.host_budget != "cluster":
        return None
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    actor: Any = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(LedgerActor)
    # Named with the version: a cluster that upgrades runs the new rules beside the old job's actors.
    names = (f"host-budget-{__version__}-{i}" for i in range(ACTORS))
    env = _own_runtime_env()
    return ClusterBudget(
        tuple(
            actor.options(
                name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, runtime_env=env
            ).remote()
            for name in names
        )
    )


def _own_runtime_env() -> dict:
    """The actors' runtime env: a working_dir package of their own, holding nothing. An actor would
    otherwise inherit the working_dir of the job that happened to create it, which holds that job's
    credentials (credentials.py), and a detached actor keeps its working_dir on the node for as long
    as it lives: long after the job. The package's name is its content's hash, so every task and job
    names the same one, and the first to need it uploads it."""
    import hashlib
    import io
    import zipfile

    from ray._private.runtime_env import packaging

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        # Fixed date: the same bytes, so the same name, in every process.
        zf.writestr(zipfile.ZipInfo("HOST-BUDGET", date_time=(1980, 1, 1, 0, 0, 0)), f"laion-operator {__version__}\n")
    data = buf.getvalue()
    uri = f"gcs://_ray_pkg_host_budget_{hashlib.sha256(data).hexdigest()[:16]}.zip"
    if not packaging.package_exists(uri):
        packaging.upload_package_to_gcs(uri, data)
    return {"working_dir": uri}


Wake = Callable[[Iterable[str]], Awaitable[None]]


class TaskLimits:
    """The per-task scheme (`hostBudget: task`, or no Ray): each task's own `maxPerHost` per host, and
    the Retry-Afters the engine keeps per task."""

    def __init__(self, opts: Download):
        self.per_task = per_task(opts)

    def allowed(self, key: str) -> int:
        return self.per_task

    def want(self, key: str, want: int, in_use: int) -> None:
        pass

    def not_before(self, key: str) -> float:
        return 0.0

    def slowed(self, key: str, wait: float) -> None:
        pass

    def answered(self, key: str) -> None:
        pass

    async def __aenter__(self) -> TaskLimits:
        return self

    async def __aexit__(self, *exc) -> None:
        pass


class Leases(TaskLimits):
    """A shard task's leases of the cluster's budget, on its event loop. The scheduler says what it
    wants (`want`) and uses what is `allowed`; `wake` is called with the hosts whose allowance grew."""

    def __init__(self, opts: Download, budget: ClusterBudget, ttl: float = LEASE_TTL, renew: float = RENEW):
        super().__init__(opts)
        self.budget, self.ttl, self.renew = budget, ttl, renew
        self.limit = opts.max_per_host
        self.task = uuid.uuid4().hex
        self.wake: Wake | None = None
        self.held: dict[str, int] = {}
        self.allowance: dict[str, int] = {}
        self.wants: dict[str, tuple[int, int]] = {}
        self.waits: dict[str, float] = {}  # host -> loop time before which it is not asked
        self.answers: Counter[str] = Counter()
        self.slows: dict[str, float] = {}
        self.dirty: set[str] = set()
        self.contended: set[str] = set()
        self.reduced: set[str] = set()  # hosts under their budget: their answers raise it
        self.broken = False
        self.closing = False
        self._event = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    def allowed(self, key: str) -> int:
        return self.per_task if self.broken else self.allowance.get(key, 0)

    def want(self, key: str, want: int, in_use: int) -> None:
        want = min(want, self.per_task)
        self.wants[key] = (want, in_use)
        held = self.held.get(key, 0)
        # Others wait for a contended host: slots this task holds and does not use go back at once.
        if want > held or (key in self.contended and min(want, in_use) < held):
            self._mark(key)

    def not_before(self, key: str) -> float:
        return self.waits.get(key, 0.0)

    def slowed(self, key: str, wait: float) -> None:
        self.slows[key] = max(self.slows.get(key, 0.0), wait)
        self._mark(key)

    def answered(self, key: str) -> None:
        if key in self.reduced:
            self.answers[key] += 1

    def _mark(self, key: str) -> None:
        self.dirty.add(key)
        self._event.set()

    async def __aenter__(self) -> Leases:
        self.loop = asyncio.get_running_loop()
        self._loop_task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._loop_task is not None:
            # Told to end rather than only cancelled: a cancel that lands as an actor's answer does is
            # swallowed by wait_for (Python 3.11), and the loop would renew the leases forever.
            self.closing = True
            self._event.set()
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self.broken or not self.held:
            return
        # Given back now rather than at the TTL: the next shard's tasks need them.
        asks = {key: Ask(0, 0, self.limit) for key in self.held}
        try:
            await asyncio.wait_for(self._send(asks, renew=False), 10)
        except Exception as err:  # noqa: BLE001 - their TTL gives them back anyway
            log.warning("host budget: leases not given back (%s); they lapse in %g s", err, self.ttl)

    async def _run(self) -> None:
        while not self.broken and not self.closing:
            try:
                await asyncio.wait_for(self._event.wait(), self.renew)
                periodic = False
            except asyncio.TimeoutError:
                periodic = True
            self._event.clear()
            if self.closing:
                return
            keys, self.dirty = self.dirty, set()
            if periodic:
                # Releases of hosts nobody waits for, and the answers that raise a slowed host's limit.
                keys |= {k for k, (w, _) in self.wants.items() if w != self.held.get(k, 0)}
                keys |= {k for k in self.contended if self.wants.get(k, (0, 0))[1] < self.held.get(k, 0)}
                keys |= self.answers.keys() & self.reduced
            asks = {k: self._ask(k) for k in keys}
            try:
                await asyncio.wait_for(self._send(asks, renew=periodic), CALL_TIMEOUT)
            except Exception as err:  # noqa: BLE001 - whatever failed, the shard goes on without the budget
                log.warning("host budget unreachable (%s): this task limits each host by itself", err)
                self.broken = True
                if self.wake is not None:
                    await self.wake(list(self.wants))

    def _ask(self, key: str) -> Ask:
        want, in_use = self.wants.get(key, (0, 0))
        return Ask(want, in_use, self.limit, self.answers.pop(key, 0), self.slows.pop(key, None))

    async def _send(self, asks: dict[str, Ask], renew: bool) -> None:
        """One call per actor with asks (and, to renew, per actor this task holds anything of)."""
        by_actor: dict[int, dict[str, Ask]] = {}
        for key, ask in asks.items():
            by_actor.setdefault(shard_of(key, len(self.budget.actors)), {})[key] = ask
        if renew:
            for key in self.held:
                by_actor.setdefault(shard_of(key, len(self.budget.actors)), {})
        if not by_actor:
            return
        replies = await asyncio.gather(
            *(self.budget.actors[i].sync.remote(self.task, a, self.ttl) for i, a in by_actor.items())
        )
        grown = []
        now = self.loop.time()
        for grants in replies:
            for key, grant in grants.items():
                if grant.allowed > self.allowance.get(key, 0):
                    grown.append(key)
                self._apply(key, grant, now)
        if grown and self.wake is not None:
            await self.wake(grown)

    def _apply(self, key: str, grant: Grant, now: float) -> None:
        for flag, into in ((grant.contended, self.contended), (grant.limit < self.limit, self.reduced)):
            if flag:
                into.add(key)
            else:
                into.discard(key)
        if grant.wait > 0:
            self.waits[key] = max(self.waits.get(key, 0.0), now + grant.wait)
        if grant.held:
            self.held[key], self.allowance[key] = grant.held, grant.allowed
        else:
            self.held.pop(key, None)
            self.allowance.pop(key, None)
        want = self.wants.get(key)
        if want is not None and want[0] == 0 and not grant.held:
            del self.wants[key]  # nothing more to say of this host
