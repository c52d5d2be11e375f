"""One part, end to end on Ray: filter → download (a Ray task per shard) → annotate → verify → with
`spec.latents`, encode (a Ray task per shard, on a GPU where the cluster has them).

A part whose source is a dataset (`source.dataset`) lists its input shards instead of filtering and
converts them, one Ray task per shard, through the same loop, progress and annotations.

The CLI calls `run_part` in-process on a local Ray; the operator's Ray job calls the same function
on a cluster. Progress is persisted to `contract.PROGRESS` in the output as it changes, which is
what the operator, its metrics and a resumed run read.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from typing import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .. import credentials
from .. import contract
from ..contract import PROGRESS, LatentStats, Phase, Progress, ShardStats
from ..errors import InputError
from ..spec import PartSpec
from ..storage import Store, StorageUnavailable
from .annotate import annotate
from .columns import ColumnError
from .convert import ConvertError, convert_shard
from .convert import plan as plan_conversion
from .download import download_shard
from .filter import FilterResult, MetadataError, run_filter
from .verify import verify

log = logging.getLogger(__name__)


class PartFailed(RuntimeError):
    """The part ended with shards that failed after all their retries."""


def ensure_ray(address: str | None = None) -> None:
    """Join the Ray cluster of a Ray job, or the given address, or start a local one on loopback."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_JOB_ID") or (not address and os.environ.get("RAY_ADDRESS")):
        ray.init(log_to_driver=False)  # inside a Ray job: the job's runtime env already carries everything
    elif address:
        # Workers of an existing cluster do not share this process's environment: ship the credentials.
        folder = credentials.working_dir(credentials.from_environment())
        try:
            ray.init(address=address, log_to_driver=False, runtime_env={"working_dir": folder})
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # uploaded to the cluster; no copy stays behind
    else:
        # A private cluster on loopback for this run: Ray's notice that it turned token authentication
        # on would be the first thing the user reads, about a cluster they never see.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 configure_logging=False)


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


class DamagedOutput(InputError):
    """The output holds files this part did not write and cannot account for; the message names them."""


@ray.remote(num_cpus=1)
def _shard(spec_data: dict, shard: int, board) -> dict:
    """One shard's work: download its filtered rows, or convert its input shard."""
    spec = PartSpec.from_dict(spec_data)
    work = convert_shard if spec.dataset else download_shard
    store = Store(spec.output)
    try:
        # The whole shard again while the storage is away: it starts by removing what a try left.
        stats = store.retrying(f"writing shard {shard}", lambda: work(
            spec, shard, report=lambda s: board.report.remote(shard, s.to_json())))
    except StorageUnavailable as err:
        return {STORAGE_UNAVAILABLE: str(err)}  # not raised: Ray's shard retries would only wait longer
    return stats.to_json()


@ray.remote(num_cpus=1)
def _check(spec_data: dict, shard: int) -> dict:
    from .verify import check_shard

    spec = PartSpec.from_dict(spec_data)
    return check_shard(Store(spec.output), spec.download.output_format, shard).to_json()


@ray.remote
def _encode(spec_data: dict, shard: int, board) -> dict:
    from .latents import encode_shard
    from .models import ModelError

    spec = PartSpec.from_dict(spec_data)
    try:
        stats = encode_shard(spec, shard, report=lambda s: board.report.remote(shard, s.to_json()))
    except ModelError as err:  # a retry cannot load it either: the driver ends the part as bad input
        return {"bad_input": str(err)}
    return stats.to_json()


STORAGE_UNAVAILABLE = "storageUnavailable"
# A shard's files, whatever the format: 00042, 00042.tar, 00042.parquet, 00042_stats.json, …
_SHARD_FILE = re.compile(r"^(\d{%d})(_stats\.json|\.tar|\.parquet|\.tfrecord)?$" % contract.SHARD_DIGITS)


def finished_shard(store: Store, shard: int, output_format: str) -> ShardStats | None:
    """The stats of a finished shard, or None when it must be (re)done: a `_stats.json` that cannot be
    read, or whose shard files are gone, is a damaged shard and is redone whole, never counted."""
    name = contract.shard_stats(shard)
    try:
        data = store.read_json(name)
        if data is None:
            return None
        stats = ShardStats.from_json(data)
    except (ValueError, KeyError, TypeError) as err:
        log.warning("%s: unreadable (%s); shard %d is redone", store.url(name), err, shard)
        return None
    for needed in (contract.shard_metadata(shard), contract.shard_data(shard, output_format)):
        if not store.exists(needed):
            log.warning("%s is missing beside %s; shard %d is redone", store.url(needed), name, shard)
            return None
    return stats


def check_no_stray_shards(store: Store, shards: int) -> None:
    """Refuse shard files numbered beyond this part's shards: they would be read as part of the dataset."""
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.root, detail=False)]
    except FileNotFoundError:
        return
    stray = sorted(n for n in names if (m := _SHARD_FILE.match(n)) and int(m.group(1)) >= shards)
    if stray:
        raise DamagedOutput(
            f"output {store.uri} holds {', '.join(store.url(n) for n in stray[:5])}"
            f"{' and more' if len(stray) > 5 else ''}, which {'is' if len(stray) == 1 else 'are'} not a shard of "
            f"this part (it has {shards} shards, {contract.shard_name(0)} to {contract.shard_name(shards - 1)}): "
            f"remove {'it' if len(stray) == 1 else 'them'}, or choose another output.uri")


class Tracker:
    """Keeps a Progress current from finished and running shards, and publishes it (throttled)."""

    def __init__(self, store: Store, progress: Progress, on_progress: Callable[[Progress], None] | None,
                 every: float = 2.0):
        self.store, self.progress, self.on_progress, self.every = store, progress, on_progress, every
        self.finished: dict[int, ShardStats] = {}
        self.errors: dict[int, BaseException] = {}  # the last error of each failed shard
        self._last = 0.0

    def phase(self, phase: Phase, message: str = "") -> None:
        self.progress.phase = phase.value
        self.progress.message = message
        self.publish(force=True)

    def filtered(self, result: FilterResult) -> None:
        self.progress.rows_read = result.rows_read
        self.progress.rows_kept = result.rows_kept
        self.progress.dropped_by = dict(result.dropped_by)
        self.progress.shards_total = result.shards
        self.publish()

    def count(self, running: dict[int, dict] | None = None) -> None:
        live = [ShardStats.from_json(s) for k, s in (running or {}).items() if k not in self.finished]
        self.progress.shards_done = len(self.finished)
        self.progress.count_images(list(self.finished.values()), live)

    def publish(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.every:
            return
        self._last = now
        self.progress.updated_at = now
        self.store.retrying("writing the progress", lambda: self.store.write_json(self.progress.to_json(), PROGRESS))
        if self.on_progress:
            self.on_progress(self.progress)


def _download_all(spec: PartSpec, tracker: Tracker, shards: int) -> list[int]:
    """Run the unfinished shards as Ray tasks; returns the shards that failed after their retries."""
    store, fmt = tracker.store, spec.download.output_format
    store.retrying("checking the output for stray shards", lambda: check_no_stray_shards(store, shards))
    for shard in range(shards):
        stats = store.retrying(f"reading shard {shard}'s stats",
                               lambda shard=shard: finished_shard(store, shard, fmt))
        if stats is not None:
            tracker.finished[shard] = stats
    todo = [s for s in range(shards) if s not in tracker.finished]
    if tracker.finished:
        log.info("resuming: %d of %d shards already finished", len(tracker.finished), shards)
    tracker.count()
    tracker.publish(force=True)
    parallelism = spec.download.parallelism or max(int(ray.cluster_resources().get("CPU", 1)), 1)
    task = _shard.options(max_retries=spec.download.shard_retries, retry_exceptions=True)
    spec_data = spec.to_dict()
    failed: list[int] = []
    errors: dict[int, BaseException] = {}
    unavailable = ""

    def settle(shard: int, result: dict | None, err: BaseException | None) -> bool:
        nonlocal unavailable
        if err is not None:  # a shard's failure is recorded, the part goes on
            log.error("shard %d failed after %d retries: %s", shard, spec.download.shard_retries, err)
            failed.append(shard)
            errors[shard] = err
            return True
        if STORAGE_UNAVAILABLE in result:
            unavailable = result[STORAGE_UNAVAILABLE]
            log.error("shard %d: %s", shard, unavailable)
            failed.append(shard)
            return False  # no point starting more shards against an unreachable store
        tracker.finished[shard] = ShardStats.from_json(result)
        return True

    def tick(partial: dict[int, dict], moved: bool) -> None:
        tracker.progress.shards_failed = len(failed)
        tracker.count(partial)
        tracker.publish(force=moved)

    try:
        _run_tasks(lambda shard, board: task.remote(spec_data, shard, board), todo, parallelism, settle, tick)
    finally:
        tracker.errors = errors
    if unavailable:
        raise StorageUnavailable(unavailable)
    return failed


def _run_tasks(submit: Callable, todo: list[int], parallelism: int, settle: Callable, tick: Callable) -> None:
    """Keep `parallelism` shard tasks running until `todo` is done. `submit(shard, board)` starts one,
    which reports its counts to the board as it goes; `settle(shard, result, error)` takes each outcome
    and returns False to start no more; `tick(partial, moved)` sees the running shards' counts after
    every wait. However it ends (an unreachable store, bad input, an interrupt), the tasks still
    running are cancelled — none may write on behind the next attempt's back — and the board goes."""
    # On the driver's node where it can be; should its node go anyway, it starts again elsewhere and
    # the running shards report to it again (their finished counts come from the tasks' results).
    board = Board.options(max_restarts=-1, scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=True)).remote()
    running: dict = {}
    partial: dict[int, dict] = {}
    try:
        while todo or running:
            while todo and len(running) < parallelism:
                shard = todo.pop(0)
                running[submit(shard, board)] = shard
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                shard = running.pop(ref)
                try:
                    result, err = ray.get(ref), None
                except Exception as raised:  # noqa: BLE001 - the task's failure, after its retries
                    result, err = None, getattr(raised, "cause", None) or raised  # Ray wraps the task's exception
                if not settle(shard, result, err):
                    todo.clear()
                board.forget.remote(shard)
                partial.pop(shard, None)
            try:
                partial = ray.get(board.snapshot.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                # The board is restarting (its node was lost) or slow: the last counts stand a while.
                log.warning("running shards' counts unavailable for now: %s", type(err).__name__)
            tick(partial, bool(ready))
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        ray.kill(board)


def _encode_all(spec: PartSpec, tracker: Tracker, shards: list[int]) -> tuple[list[LatentStats], list[int]]:
    """Encode the shards not encoded yet as Ray tasks, a GPU each when the cluster has GPUs;
    returns every encoded shard's stats and the shards that failed after their retries."""
    from .latents import load_stats

    settings = spec.latents
    p = tracker.progress
    finished: dict[int, LatentStats] = {}
    for shard in shards:
        stats = load_stats(tracker.store, shard)
        if stats is not None:
            finished[shard] = stats
    todo = [s for s in shards if s not in finished]
    if finished:
        log.info("latents: resuming, %d of %d shards already encoded", len(finished), len(shards))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
    parallelism = settings.parallelism or gpus or cpus
    # One CPU a task besides the GPU: the decode thread and the host side of the model.
    task = _encode.options(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=settings.shard_retries,
                           retry_exceptions=True)
    log.info("latents: %d shards on %s, %d at once", len(todo), f"{gpus} GPUs" if gpus else "CPUs", parallelism)
    spec_data = spec.to_dict()
    failed: list[int] = []
    started, base = time.time(), sum(s.written for s in finished.values())

    def count(partial: dict[int, dict]) -> None:
        live = [LatentStats.from_json(v) for k, v in partial.items() if k not in finished]
        p.latents_shards_done = len(finished)
        p.latents_shards_failed = len(failed)
        p.latents_written = sum(s.written for s in finished.values()) + sum(s.written for s in live)
        p.latents_skipped = sum(s.skipped for s in finished.values()) + sum(s.skipped for s in live)
        p.latents_per_second = round((p.latents_written - base) / max(time.time() - started, 1e-6), 2)

    def settle(shard: int, result: dict | None, err: BaseException | None) -> bool:
        if err is not None:  # a shard's failure is recorded, the part goes on
            log.error("latents: shard %d failed after %d retries: %s", shard, settings.shard_retries, err)
            failed.append(shard)
        elif "bad_input" in result:
            raise InputError(result["bad_input"])
        else:
            finished[shard] = LatentStats.from_json(result)
        return True

    def tick(partial: dict[int, dict], moved: bool) -> None:
        count(partial)
        tracker.publish(force=moved)

    p.latents_shards_total = len(shards)
    count({})
    tracker.publish(force=True)
    _run_tasks(lambda shard, board: task.remote(spec_data, shard, board), todo, parallelism, settle, tick)
    return list(finished.values()), failed


def run_latents(spec: PartSpec, tracker: Tracker, shards: list[int]) -> dict:
    """The latents stage over a part's finished shards; returns its summary section."""
    from .latents import merge_indexes, write_manifest

    tracker.phase(Phase.ENCODING)
    try:
        encoded, failed = _encode_all(spec, tracker, shards)
    except InputError as err:
        tracker.progress.finished_at = time.time()
        tracker.phase(Phase.FAILED, str(err))
        raise
    if failed:
        tracker.progress.finished_at = time.time()
        tracker.phase(Phase.FAILED, f"latents: {len(failed)} of {len(shards)} shards failed after "
                                    f"{spec.latents.shard_retries} retries: {sorted(failed)[:10]}; "
                                    "run the part again to retry them")
        raise PartFailed(tracker.progress.message)
    samples = merge_indexes(tracker.store, encoded)
    manifest = write_manifest(tracker.store, spec.latents, encoded)
    p = tracker.progress
    return {
        "index": tracker.store.url(contract.LATENTS_INDEX),
        "samples": samples,
        "skipped": sum(s.skipped for s in encoded),
        "shards": len(encoded),
        "latentsPerSecond": p.latents_per_second,
        "shardSecondsSum": round(sum(s.end_time - s.start_time for s in encoded), 3),
        "devices": sorted({s.device for s in encoded if s.device}),
        "imageShape": manifest["imageShape"],
        "captionShape": manifest["captionShape"],
        "dtype": manifest["dtype"],
    }


def finished_shards(store: Store) -> list[int]:
    """The shards of an output whose stats file exists (a download or a conversion)."""
    found = (contract.shard_of_stats(path.rsplit("/", 1)[-1])
             for path in store.fs.glob(store.path(contract.SHARD_STATS_GLOB)))
    return sorted(shard for shard in found if shard is not None)


def encode_part(spec: PartSpec, on_progress: Callable[[Progress], None] | None = None,
                ray_address: str | None = None) -> dict:
    """The latents stage alone, over an output already downloaded or converted with this spec:
    `laion-operator latents`. Returns the part's summary with its `latents` section."""
    if not spec.latents:
        raise InputError("spec.latents: required field is missing (the models and settings of the stage)")
    store = Store(spec.output)
    store.check_writable()
    shards = finished_shards(store)
    if not shards:
        raise InputError(f"output {store.uri} holds no finished shard ({contract.shard_stats(0)}, …) to encode")
    previous = store.read_json(PROGRESS) or {}
    progress = Progress.from_json({**previous, "part_id": spec.part_id, "finished_at": None})
    tracker = Tracker(store, progress, on_progress)
    ensure_ray(ray_address)  # after the checks: a bad input fails without starting Ray
    section = run_latents(spec, tracker, shards)
    summary = store.read_json(contract.summary(spec.part_id)) or {"partId": spec.part_id, "output": store.uri}
    summary["latents"] = section
    store.write_json(summary, contract.summary(spec.part_id))
    tracker.progress.finished_at = time.time()
    tracker.phase(Phase.SUCCEEDED, f"{section['samples']} latents in {store.url(contract.LATENTS_DIR)}")
    return summary


def run_part(spec: PartSpec, on_progress: Callable[[Progress], None] | None = None) -> dict:
    """Filter, download and annotate one part; returns the summary written beside the dataset."""
    store = Store(spec.output)
    store.check_writable()
    tracker = Tracker(store, Progress(part_id=spec.part_id), on_progress)
    tracker.phase(Phase.CONVERTING if spec.dataset else Phase.FILTERING)
    try:
        if spec.dataset:
            shards = plan_conversion(spec, store)["shards"]
            tracker.progress.shards_total = shards
        else:
            result = store.retrying("filtering", lambda: run_filter(spec, store, on_batch=tracker.filtered))
            tracker.filtered(result)
            shards = result.shards
            tracker.phase(Phase.DOWNLOADING)
    except (ColumnError, MetadataError, ConvertError) as err:
        tracker.progress.finished_at = time.time()
        tracker.phase(Phase.FAILED, str(err))
        raise
    ensure_ray()
    try:
        failed = _download_all(spec, tracker, shards)
    except (StorageUnavailable, DamagedOutput) as err:
        tracker.progress.finished_at = time.time()
        tracker.count()
        try:
            tracker.phase(Phase.FAILED, str(err))
        except StorageUnavailable:
            pass  # the progress cannot say so; the job's exit code and log do
        raise
    tracker.count()
    if failed and all(isinstance(tracker.errors.get(s), InputError) for s in failed):
        # a shard's input that cannot be read (convert): no retry can help, the exit code says so
        tracker.progress.finished_at = time.time()
        tracker.phase(Phase.FAILED, str(tracker.errors[min(failed)]))
        raise tracker.errors[min(failed)]
    if failed:
        tracker.progress.finished_at = time.time()
        first = min(failed)
        tracker.phase(Phase.FAILED, f"{len(failed)} of {shards} shards failed after "
                                f"{spec.download.shard_retries} retries: {sorted(failed)[:10]}; "
                                f"shard {first}: {str(tracker.errors.get(first, 'unknown error'))[:500]}; "
                                "run the part again to retry them")
        raise PartFailed(tracker.progress.message)
    if spec.dataset:  # a conversion reads no metadata: its rows are the samples it read
        tracker.progress.rows_read = tracker.progress.rows_kept = sum(s.count for s in tracker.finished.values())
    tracker.phase(Phase.ANNOTATING)
    tracker.progress.finished_at = time.time()
    summary = store.retrying("writing the annotations", lambda: annotate(
        spec, store, list(tracker.finished.values()), tracker.progress))
    if spec.verify:
        summary = _verify(spec, store, tracker, summary)
    if spec.latents:
        summary["latents"] = run_latents(spec, tracker, sorted(tracker.finished))
        tracker.progress.finished_at = time.time()
        store.write_json(summary, contract.summary(spec.part_id))
    tracker.phase(Phase.SUCCEEDED, f"{tracker.progress.images_ok} images in {store.uri}")
    return summary


def _verify(spec: PartSpec, store: Store, tracker: Tracker, summary: dict) -> dict:
    """Read every shard back (a Ray task each); a mismatch fails the part and un-finishes the bad
    shards, so that running the part again redoes them."""
    tracker.phase(Phase.VERIFYING)
    spec_data = spec.to_dict()

    def check_all(shards):
        from .verify import ShardCheck

        refs = [_check.remote(spec_data, shard) for shard in shards]
        return [ShardCheck.from_json(ray.get(ref)) for ref in refs]

    result = verify(store, spec.part_id, spec.download.output_format, check_all=check_all)
    summary["verified"] = result.to_json()
    store.write_json(summary, contract.summary(spec.part_id))
    tracker.progress.verified = result.to_json()
    if not result.ok:
        for shard in result.bad_shards:
            store.fs.rm(store.path(contract.shard_stats(shard)))
        redo = f"; running the part again redoes shards {result.bad_shards[:10]}" if result.bad_shards else ""
        tracker.progress.finished_at = time.time()
        tracker.phase(Phase.FAILED, f"verify: {result.message}{redo}")
        raise PartFailed(tracker.progress.message)
    return summary
