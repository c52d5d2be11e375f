"""The pipeline's runtime on Ray: joining or starting the cluster, and a pool that keeps a stage's
shard tasks running, each returning a typed `Outcome`, while a board actor collects the running
shards' counts so that progress moves between shard completions.

A stage gives the pool a shard's work, `work(spec, shard, report, *args) -> Outcome`, a module-level
function that runs in a Ray task; the stage's own bookkeeping stays in the driver process, in the
pool's `on_value` and `tick` callbacks (`stages/`).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .. import credentials
from ..contract import ExitCode
from ..errors import InputError
from ..spec import PartSpec
from ..storage import StorageUnavailable, Store

log = logging.getLogger(__name__)


class PartFailed(RuntimeError):
    """The part ended with shards that failed after all their retries."""


# The errors a part ends with on purpose, and what each tells the operator (the job's exit code).
ENDINGS: dict[type[Exception], ExitCode] = {
    PartFailed: ExitCode.SHARDS_FAILED,
    StorageUnavailable: ExitCode.STORAGE_UNAVAILABLE,
    InputError: ExitCode.BAD_INPUT,
}
ENDED = tuple(ENDINGS)  # `except ENDED`: a part that ended on purpose


def ending(part_id: str, err: Exception) -> tuple[ExitCode, str]:
    """The exit code and the line in words of a part that ended with `err`, one of ENDINGS."""
    code = next(code for kind, code in ENDINGS.items() if isinstance(err, kind))
    if code is ExitCode.STORAGE_UNAVAILABLE:
        return code, f"part {part_id} failed: StorageUnavailable: {err}; run it again to resume"
    if code is ExitCode.BAD_INPUT:
        return code, f"part {part_id} cannot run: {err}"
    return code, f"part {part_id} failed: {err}"


class _Start:
    """Ray joined or started on a thread of its own (`start_ray`), while the driver imports the
    pipeline and filters the metadata, which need no Ray: the start-up is off the whole command's path.

    The thread stays parked until the process exits: a local cluster's processes are started with
    PR_SET_PDEATHSIG, which Linux ties to the thread that forked them, so they would die with a thread
    that returned (and the driver then waits a minute for a GCS that is gone)."""

    def __init__(self, address: str | None, warm: tuple[str, ...], prepare: Callable[[], Any] | None):
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(address, warm, prepare), name="ray-start", daemon=True)
        self.thread.start()

    def _run(self, address: str | None, warm: tuple[str, ...], prepare: Callable[[], Any] | None) -> None:
        try:
            _init_ray(address)
            if prepare is not None:
                prepare()
            _warm_workers(warm)
        except Exception as err:  # noqa: BLE001 - raised again in the thread that waits (ensure_ray)
            self.error = err
        finally:
            self.ready.set()
        threading.Event().wait()  # parked: see the class's docstring

    def wait(self) -> None:
        self.ready.wait()
        if self.error is not None:
            raise self.error


_start: _Start | None = None


def _not_main_thread_notice(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


def start_ray(address: str | None = None, warm: tuple[str, ...] = (), prepare: Callable[[], Any] | None = None) -> None:
    """Begin `ensure_ray(address)` in the background, then run `prepare` (say, start the actors the
    shard tasks will call) and have each worker import the modules `warm` names (the shard task's,
    given by the caller: they sit above this module); the first `ensure_ray` waits for it. Called from
    the main thread, which takes over what ray.init does only there: SIGTERM exits through atexit (and
    so ray.shutdown), and Ray's notice that it could not is dropped."""
    global _start
    if _start is None and not ray.is_initialized():
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))
        logging.getLogger("ray._private.worker").addFilter(_not_main_thread_notice)
        _start = _Start(address, warm, prepare)


def settle_ray_start() -> None:
    """Wait until a background start has ended, either way: a process that exits while Ray is still
    starting (a part refused before it needed Ray) has Ray's teardown fail under it, and its own
    error replaces the part's exit code; then stop the private cluster this command started.

    Stopped here rather than by Ray's atexit hook, which first sleeps half a second for log lines
    that a run with `log_to_driver=False` never prints: the command ends that much sooner."""
    if _start is not None:
        _start.ready.wait()
    if _private_cluster and ray.is_initialized():
        ray.shutdown()


@ray.remote
def _imports(modules: tuple[str, ...]) -> None:
    for name in modules:
        importlib.import_module(name)


def _warm_workers(modules: tuple[str, ...]) -> None:
    """The shard tasks' imports (Arrow, OpenCV, aiohttp) done by the workers Ray started, one task a
    CPU, while the filter runs: the first shards start at once instead of after them."""
    if not modules:
        return
    cpus = int(ray.available_resources().get("CPU", 1))
    ray.get([_imports.remote(modules) for _ in range(max(cpus, 1))])


def ensure_ray(address: str | None = None) -> None:
    """Join the Ray cluster of a Ray job, or the given address, or start a local one on loopback."""
    if _start is not None:
        _start.wait()
    if ray.is_initialized():
        return
    _init_ray(address)


# Whether this process started its own cluster on loopback (`_init_ray`): only that one is stopped
# when the command ends; a cluster joined is left as found.
_private_cluster = False


@contextmanager
def _without_api_server() -> Iterator[None]:
    """Ray starts its API server (the dashboard's process, with only usage stats when the dashboard
    is off) for every head node and waits for it to come up: a second or more on the start's path.
    A private cluster for one command serves no Jobs API, state API or dashboard, so it starts none.
    Where Ray's node no longer has that step under that name, the start is Ray's own."""
    from ray._private import node

    original = getattr(node.Node, "start_api_server", None)
    if original is None:
        yield
        return

    def no_api_server(self, *, include_dashboard=None, raise_on_failure=False):
        self._webui_url = None

    node.Node.start_api_server = no_api_server  # type: ignore[method-assign]
    try:
        yield
    finally:
        node.Node.start_api_server = original  # type: ignore[method-assign]


def _init_ray(address: str | None) -> None:
    global _private_cluster
    if os.environ.get("RAY_JOB_ID") or (not address and os.environ.get("RAY_ADDRESS")):
        ray.init(log_to_driver=False)  # inside a Ray job: the job's runtime env already carries everything
    elif address:
        # Workers of an existing cluster do not share this process's environment: ship the credentials.
        # This driver's own package: another driver's job must never unpack over its workers' folder.
        folder = credentials.working_dir(credentials.from_environment(), job=uuid.uuid4().hex)
        try:
            ray.init(address=address, log_to_driver=False, runtime_env={"working_dir": folder})
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # uploaded to the cluster; no copy stays behind
    else:
        # A private cluster on loopback for this run: Ray's notice that it turned token authentication
        # on would be the first thing the user reads, about a cluster they never see.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        with _without_api_server():
            ray.init(
                include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1", configure_logging=False
            )
        _private_cluster = True


@dataclass(frozen=True)
class Outcome:
    """What a shard task returns: its work's value, or why it stopped without raising. A raised error
    is Ray's to retry (`shardRetries`); these are not, as no retry can help."""

    value: Any = None
    # The storage stayed away through the shard's own retries: the stage starts no more shards and,
    # once the running ones end, the part fails with StorageUnavailable.
    unavailable: str = ""
    # Input no retry can read (a model that does not load): the part fails as bad input at once.
    bad_input: str = ""


Work = Callable[..., Outcome]


def store_work(spec: PartSpec, what: str, work: Callable[[], Any]) -> Outcome:
    """`work()`'s value, the whole of it again while the storage is away (a shard's work starts by
    removing what a try left); a store still away after `output.retrySeconds` is the outcome."""
    try:
        return Outcome(Store(spec.output).retrying(what, work))
    except StorageUnavailable as err:
        return Outcome(unavailable=str(err))  # not raised: Ray's shard retries would only wait longer


def cpus() -> int:
    """The cluster's CPUs: a shard stage's parallelism when its spec leaves it unset."""
    return max(int(ray.cluster_resources().get("CPU", 1)), 1)


@ray.remote(num_cpus=1)
def shard_task(work: Work, spec_data: dict, shard: int, board, *args) -> Outcome:
    """One shard of a stage: `work(spec, shard, report, *args)`, its running counts sent to the board."""
    enter_working_dir()
    spec = PartSpec.from_dict(spec_data)
    return work(spec, shard, lambda stats: board.report.remote(shard, stats.to_json()), *args)


def enter_working_dir() -> None:
    """Enter the job's folder again when Ray has unpacked it afresh under this worker.

    Ray starts a worker as `cd <working_dir> && python ...` and unpacks a working_dir over its old
    folder when its cache has lost it (a restarted runtime env agent, two envs naming one package set
    up at once): the worker is left in a deleted folder, where os.getcwd() raises and every local
    delete of fsspec's fails. The shell's PWD still names the path, which holds the new copy.
    """
    try:
        os.getcwd()
    except FileNotFoundError:
        folder = os.environ.get("PWD", "")
        os.chdir(folder if os.path.isdir(folder) else tempfile.gettempdir())
        log.warning("this worker's folder was unpacked again by Ray; now in %s", os.getcwd())


@ray.remote(num_cpus=0)
class Board:
    """Counts of the shards still running, so that progress moves between shard completions."""

    def __init__(self):
        self.partial: dict[int, dict] = {}

    def report(self, shard: int, stats: dict) -> None:
        self.partial[shard] = stats

    def forget(self, shard: int) -> None:
        self.partial.pop(shard, None)

    def snapshot(self) -> dict[int, dict]:
        return dict(self.partial)


class Pool:
    """A stage's shard tasks, `parallelism` at a time. `on_value(shard, value)` takes each finished
    shard's value; `tick(partial, moved)` sees the running shards' counts after every wait. A shard
    that failed after its retries is recorded in `failed` and `errors` (its last error), and the
    stage goes on."""

    def __init__(
        self,
        stage: str,
        work: Work,
        spec: PartSpec,
        retries: int,
        parallelism: int,
        on_value: Callable[[int, Any], None],
        tick: Callable[[dict[int, dict], bool], None],
        args: tuple = (),
        **resources: Any,
    ):
        self.stage, self.retries, self.parallelism = stage, retries, parallelism
        self.on_value, self.tick = on_value, tick
        self.failed: list[int] = []
        self.errors: dict[int, BaseException] = {}
        # Named after the work: its worker's process reads ray::_write_shard, ray::_heal_shard, …
        task = shard_task.options(name=work.__name__, max_retries=retries, retry_exceptions=True, **resources)
        spec_data = spec.to_dict()
        self._submit = lambda shard, board: task.remote(work, spec_data, shard, board, *args)

    def _settle(self, shard: int, outcome: Outcome | BaseException) -> bool:
        """Record one shard's end, its outcome or its error; False: start no more shards."""
        if isinstance(outcome, BaseException):  # a shard's failure is recorded, the part goes on
            log.error("%sshard %d failed after %d retries: %s", self.stage, shard, self.retries, outcome)
            self.failed.append(shard)
            self.errors[shard] = outcome
            return True
        if outcome.bad_input:
            raise InputError(outcome.bad_input)
        if outcome.unavailable:
            self.unavailable = outcome.unavailable
            log.error("%sshard %d: %s", self.stage, shard, outcome.unavailable)
            self.failed.append(shard)
            return False  # no point starting more shards against an unreachable store
        self.on_value(shard, outcome.value)
        return True

    def failure(self, total: int, again: str) -> str:
        """The stage's failure in words: how many shards of `total` failed, which, the first one's error."""
        first = min(self.failed)
        return (
            f"{self.stage}{len(self.failed)} of {total} shards failed after {self.retries} retries: "
            f"{sorted(self.failed)[:10]}; shard {first}: {str(self.errors.get(first, 'unknown error'))[:500]}; "
            f"{again}"
        )

    def run(self, todo: list[int]) -> None:
        """Run every shard in `todo`. However it ends (an unreachable store, bad input, an interrupt),
        the tasks still running are cancelled — none may write on behind the next attempt's back —
        and the board goes. Raises StorageUnavailable once the running shards ended, when one said
        the store was away."""
        self.unavailable = ""
        todo = list(todo)
        # On the driver's node where it can be; should its node go anyway, it starts again elsewhere and
        # the running shards report to it again (their finished counts come from the tasks' results).
        # (`options`: @ray.remote made the class an actor class, which mypy does not see)
        board = Board.options(  # type: ignore[attr-defined]
            max_restarts=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
        ).remote()
        running: dict = {}
        partial: dict[int, dict] = {}
        try:
            while todo or running:
                while todo and len(running) < self.parallelism:
                    shard = todo.pop(0)
                    running[self._submit(shard, board)] = shard
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in ready:
                    shard = running.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as raised:  # noqa: BLE001 - the task's failure, after its retries
                        outcome = getattr(raised, "cause", None) or raised  # Ray wraps the task's exception
                    if not self._settle(shard, outcome):
                        todo.clear()
                    board.forget.remote(shard)
                    partial.pop(shard, None)
                try:
                    partial = ray.get(board.snapshot.remote(), timeout=30)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                    # The board is restarting (its node was lost) or slow: the last counts stand a while.
                    log.warning("running shards' counts unavailable for now: %s", type(err).__name__)
                self.tick(partial, bool(ready))
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
            ray.kill(board)
        if self.unavailable:
            raise StorageUnavailable(self.unavailable)
