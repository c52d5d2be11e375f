"""Stage 2: download, resize and write one shard: each sample recorded by `record.Recorder` (img2dataset's
resizing, the metadata row, the counts) into the outputFormat's sample writer (pipeline/formats/).

The shard loop is ours rather than img2dataset's `Downloader` for what that class cannot do: fetch
many URLs at once on one event loop under deadlines, size caps, an address guard and per-host limits
(`fetch`), turn off TLS verification without patching the library, classify every failure into a
bounded set of reasons, report progress while a shard runs, and keep the shard's input so that a
re-run can redo it. A shard is finished when its `<shard>_stats.json` exists; it is written after
every other file of the shard, so a shard interrupted at any point is redone whole and each sample
lands exactly once. Samples are written in the order their downloads finish, as img2dataset does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from ..contract import ShardStats, sample_key, shard_stats
from ..spec import PartSpec
from ..storage import Store
from . import fetch
from .fetch import FetchError
from .filter import read_shard
from .record import KEY, Recorder, clear_shard


def task_cpus() -> int:
    """CPUs this shard task may use: its Ray resources inside a Ray task, else this process's CPUs."""
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(int(round(cpus)), 1)
    except Exception:  # noqa: BLE001 - not in a task: the process's own CPUs
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_stats(store: Store, shard: int) -> ShardStats | None:
    data = store.read_json(shard_stats(shard))
    return ShardStats.from_json(data) if data else None


def download_shard(
    spec: PartSpec,
    shard: int,
    report: Callable[[ShardStats], None] | None = None,
    report_every: float = 2.0,
    reuse: dict[str, tuple[bytes | None, dict]] | None = None,
    threads: int | None = None,
) -> ShardStats:
    """Download one shard into the output; returns its stats (also persisted: contract.shard_stats).

    Decoding and resizing run on `threads` threads (default: the task's CPUs). `reuse` (a heal,
    pipeline/heal.py): key → the sample's earlier image bytes (None if it failed) and metadata row,
    written again as they were instead of fetched; the other rows are fetched."""
    opts = spec.download
    store = Store(spec.output)
    clear_shard(store, shard)
    table = read_shard(store, shard)
    rows = table.to_pylist()
    recorder = Recorder(
        opts,
        store,
        ShardStats(shard=shard, count=table.num_rows, start_time=time.time()),
        "caption" in table.column_names,
        table.schema.append(KEY),
        opts.compute_hash,
        report,
        report_every,
    )

    def leading(index: int) -> dict:
        return {**rows[index], "key": sample_key(shard, index, spec.filter.samples_per_shard)}

    def handle(index: int, data: bytes | None, err: FetchError | None) -> None:
        """One URL's outcome, on a decode thread: resized and written."""
        if data is not None and err is None:
            recorder.image(leading(index), rows[index].get("caption"), data)
        else:
            err = err or FetchError("other", "fetched without a body")
            recorder.failed(leading(index), rows[index].get("caption"), str(err), err.reason, err.rule)

    fetched = []
    for index in range(len(rows)):
        key = sample_key(shard, index, spec.filter.samples_per_shard)
        if reuse and key in reuse:
            image, earlier = reuse[key]
            meta = recorder.row(leading(index))
            meta.update({k: earlier.get(k) for k in meta if k in earlier})
            recorder.write(image, rows[index].get("caption"), meta)
        else:
            fetched.append(index)
    engine = fetch.run(
        [rows[i]["url"] for i in fetched],
        opts,
        lambda j, data, err: handle(fetched[j], data, err),
        threads or task_cpus(),
        fetch.cluster_budget(opts),  # None outside Ray, or with hostBudget task: each host limited per task
    )
    recorder.stats.slowed_down = engine.slow_downs
    return recorder.finish()
