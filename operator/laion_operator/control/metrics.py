"""Prometheus metrics of the operator: each part's progress, and the operator's own health.

Per-part values are not incremented in memory: they are *set from* the latest Progress the job
persisted (`contract.PROGRESS`), which the operator reads as it watches the part. A restarted
operator therefore exposes the same counter values as before, and a deleted part's series vanish
with `forget_part`. Labels are bounded: namespace, part, and the fixed sets of phases, shard states
and failure reasons; never a URL or a domain.

Series per part, about 30 (64 parts: ~2,000):

    laion_part_images_total                      images downloaded into the dataset
    laion_part_images_failed_total{reason}       images that failed, one series per FAILURE_REASONS
    laion_part_images_opted_out_total{rule}      the opt_out ones by the rule that refused them (OPT_OUT_RULES)
    laion_part_bytes_written_total               bytes of finished shards
    laion_part_metadata_rows_read_total          metadata rows read by the filter
    laion_part_metadata_rows_kept_total          rows kept, i.e. images the part will attempt
    laion_part_shards{state=total|done|failed}
    laion_part_phase{phase}                      1 for the current phase, 0 for the others
    laion_part_retries_total                     times the operator resubmitted the job
    laion_part_duration_seconds                  of the current run, growing while it runs
    laion_part_last_progress_timestamp_seconds   when the counts last moved
    laion_part_stalled                           1 while the counts have not moved for spec.stallSeconds
    laion_part_latents_total                     samples with image latents and text embeddings (spec.latents)
    laion_part_latents_per_second                the latents stage's rate in its current run
    laion_part_latents_shards{state=total|done|failed}
    laion_part_embeddings_total                  samples with CLIP image and caption embeddings (spec.embeddings)
    laion_part_embeddings_per_second             the embeddings stage's rate in its current run
    laion_part_embeddings_shards{state=total|done|failed}
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..contract import FAILURE_REASONS, OPT_OUT_RULES, PHASES, RUNNING, Phase, Progress, reason_of

SHARD_STATES = ("total", "done", "failed")
PART_LABELS = ["namespace", "part"]


def stall_counts(progress: Progress) -> tuple:
    """What a part's progress is measured by: while none of these moves, the part stands still. One
    tuple for both clocks, laion_part_last_progress_timestamp_seconds here and the part's Stalled
    condition (spec.stallSeconds), so that the two never disagree on whether a part moved."""
    return (
        progress.phase,
        progress.rows_read,
        progress.images_ok,
        progress.images_failed,
        progress.shards_done,
        progress.shards_failed,
        progress.latents.get("written", 0),
        progress.embeddings.get("written", 0),
    )


@dataclasses.dataclass
class _Part:
    phase: str
    retries: int = 0
    progress: Progress | None = None
    # Highest values exposed so far. A re-run starts its Progress from zero and climbs back to the
    # finished shards' counts; exposing that dip would read as a counter reset and rate() would
    # count the same images twice.
    high: dict[str, float] = dataclasses.field(default_factory=dict)
    last_progress_at: float | None = None
    last_counts: tuple = ()
    stalled: bool = False

    def counter(self, key: str, value: float) -> float:
        self.high[key] = max(self.high.get(key, 0), value)
        return self.high[key]


class _PartCollector(Collector):
    """Builds the per-part families at scrape time from the parts' latest snapshots."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        with self.metrics._lock:
            parts = {key: dataclasses.replace(p, high=dict(p.high)) for key, p in self.metrics._parts.items()}
        now = time.time()

        def counter(name, doc, extra=()):
            return CounterMetricFamily(name, doc, labels=PART_LABELS + list(extra))

        def gauge(name, doc, extra=()):
            return GaugeMetricFamily(name, doc, labels=PART_LABELS + list(extra))

        images = counter("laion_part_images", "Images downloaded and written to the dataset.")
        failed = counter("laion_part_images_failed", "Images that failed, by reason.", ["reason"])
        opted_out = counter(
            "laion_part_images_opted_out", "Images an opt-out refused, by the rule that refused them.", ["rule"]
        )
        written = counter("laion_part_bytes_written", "Bytes written by the part's finished shards.")
        read = counter("laion_part_metadata_rows_read", "Metadata rows read by the filter.")
        kept = counter("laion_part_metadata_rows_kept", "Metadata rows kept by the filter (images to attempt).")
        shards = gauge("laion_part_shards", "Download shards of the part, by state.", ["state"])
        phase = gauge("laion_part_phase", "1 for the part's current phase, 0 for the others.", ["phase"])
        retries = counter("laion_part_retries", "Times the operator resubmitted the part's job.")
        duration = gauge("laion_part_duration_seconds", "Seconds the part's current run has taken so far.")
        moved = gauge(
            "laion_part_last_progress_timestamp_seconds",
            "Unix time at which the part's counts last changed (stall detection).",
        )
        latents = counter("laion_part_latents", "Samples encoded into image latents and text embeddings.")
        latents_rate = gauge("laion_part_latents_per_second", "Samples the latents stage encodes a second.")
        latents_shards = gauge("laion_part_latents_shards", "Shards of the latents stage, by state.", ["state"])
        embedded = counter("laion_part_embeddings", "Samples with CLIP image and caption embeddings.")
        embedded_rate = gauge("laion_part_embeddings_per_second", "Samples the embeddings stage embeds a second.")
        embedded_shards = gauge("laion_part_embeddings_shards", "Shards of the embeddings stage, by state.", ["state"])
        model_stages = {
            "latents": (latents, latents_rate, latents_shards),
            "embeddings": (embedded, embedded_rate, embedded_shards),
        }
        stalled = gauge("laion_part_stalled", "1 while the part's counts have not moved for spec.stallSeconds.")

        for (namespace, name), part in sorted(parts.items()):
            labels = [namespace, name]
            for p in PHASES:
                phase.add_metric(labels + [p], 1.0 if p == part.phase else 0.0)
            retries.add_metric(labels, part.retries)
            stalled.add_metric(labels, 1.0 if part.stalled else 0.0)
            progress = part.progress
            if progress is None:
                # Nothing read yet (a new part, or a restarted operator that has not read the output):
                # exposing zeros now and the real counts later would look like a reset and a jump.
                continue
            images.add_metric(labels, part.high["images"])
            for reason in FAILURE_REASONS:
                failed.add_metric(labels + [reason], part.high.get(f"failed:{reason}", 0))
            for rule in OPT_OUT_RULES:
                opted_out.add_metric(labels + [rule], part.high.get(f"opted_out:{rule}", 0))
            written.add_metric(labels, part.high["bytes"])
            read.add_metric(labels, part.high["rows_read"])
            kept.add_metric(labels, part.high["rows_kept"])
            for state, value in zip(
                SHARD_STATES, (progress.shards_total, progress.shards_done, progress.shards_failed)
            ):
                shards.add_metric(labels + [state], value)
            end = progress.finished_at or (now if part.phase in RUNNING else progress.updated_at)
            duration.add_metric(labels, max(end - progress.started_at, 0.0))
            moved.add_metric(labels, part.last_progress_at or progress.updated_at)
            for stage, (total, rate, stage_shards) in model_stages.items():
                counts = getattr(progress, stage)
                if counts:
                    total.add_metric(labels, part.high.get(stage, 0))
                    rate.add_metric(labels, counts.get("perSecond", 0.0))
                    for state in SHARD_STATES:
                        stage_shards.add_metric(labels + [state], counts.get("shards", {}).get(state, 0))

        yield from (
            images,
            failed,
            opted_out,
            written,
            read,
            kept,
            shards,
            phase,
            retries,
            duration,
            moved,
            latents,
            latents_rate,
            latents_shards,
            embedded,
            embedded_rate,
            embedded_shards,
            stalled,
        )


class Metrics:
    """The operator's metrics, in a registry of their own (served by `serve`)."""

    def __init__(self, handlers: Iterable[str] = ()):
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._parts: dict[tuple[str, str], _Part] = {}
        self.registry.register(_PartCollector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

        self.build_info = Gauge(
            "laion_operator_build_info",
            "Always 1; the operator's version as a label.",
            ["version"],
            registry=self.registry,
        )
        self.build_info.labels(version=__version__).set(1)
        self.reconcile_errors = Counter(
            "laion_operator_reconcile_errors",
            "Handler runs that raised, by handler.",
            ["handler"],
            registry=self.registry,
        )
        # Known handlers start at 0, so their series exist before the first error and rate() sees it.
        for handler in handlers:
            self.reconcile_errors.labels(handler=handler)
        self.kube_api_errors = Counter(
            "laion_operator_kube_api_errors", "Kubernetes API calls that failed.", registry=self.registry
        )
        self.ray_submission_errors = Counter(
            "laion_operator_ray_submission_errors",
            "Ray job submissions or status calls that failed.",
            registry=self.registry,
        )
        self.queue_length = Gauge(
            "laion_operator_queue_length",
            "Parts waiting for a free slot before their job is submitted.",
            registry=self.registry,
        )
        # A LaionDataset's view: its parts' statuses added up (gauges: a deleted part takes its share along).
        self.dataset_parts = Gauge(
            "laion_dataset_parts",
            "Parts of a LaionDataset, by phase.",
            ["namespace", "dataset", "phase"],
            registry=self.registry,
        )
        self.dataset_images = Gauge(
            "laion_dataset_images",
            "Images written by a LaionDataset's parts.",
            ["namespace", "dataset"],
            registry=self.registry,
        )
        self.dataset_images_failed = Gauge(
            "laion_dataset_images_failed",
            "Images a LaionDataset's parts failed to get, by reason.",
            ["namespace", "dataset", "reason"],
            registry=self.registry,
        )
        self.dataset_bytes_written = Gauge(
            "laion_dataset_bytes_written",
            "Bytes written by a LaionDataset's parts.",
            ["namespace", "dataset"],
            registry=self.registry,
        )

    # --- parts -----------------------------------------------------------------------------------

    def observe_part(
        self, namespace: str, name: str, phase: str, progress: Progress | None, retries: int = 0, stalled: bool = False
    ) -> None:
        """Record a part's phase and its latest persisted progress (None: not read yet, keep the last)."""
        with self._lock:
            part = self._parts.setdefault((namespace, name), _Part(phase=phase))
            part.phase = phase
            part.stalled = stalled
            part.retries = max(part.retries, retries)
            if progress is None:
                return
            # A copy: the pipeline keeps mutating its Progress while the server thread scrapes.
            progress = dataclasses.replace(
                progress,
                failed_by_reason=dict(progress.failed_by_reason),
                dropped_by=dict(progress.dropped_by),
                opted_out_by=dict(progress.opted_out_by),
            )
            part.progress = progress
            part.counter("images", progress.images_ok)
            reasons: dict[str, int] = {}
            for reason, n in progress.failed_by_reason.items():
                reasons[reason_of(reason)] = reasons.get(reason_of(reason), 0) + n
            for reason, n in reasons.items():
                part.counter(f"failed:{reason}", n)
            rules = {rule: n for rule, n in progress.opted_out_by.items() if rule in OPT_OUT_RULES}
            for rule, n in rules.items():
                part.counter(f"opted_out:{rule}", n)
            if progress.phase == Phase.SUCCEEDED.value:
                # A finished part's counts are its shards' own. A heal lowers failed ones: they are set
                # rather than kept at their highest, once, at its end (a counter reset, as rate() reads
                # it), so that the metrics agree with the summary and the status.
                for key in [k for k in part.high if k.startswith("failed:")]:
                    part.high[key] = reasons.get(key.split(":", 1)[1], 0)
                for key in [k for k in part.high if k.startswith("opted_out:")]:
                    part.high[key] = rules.get(key.split(":", 1)[1], 0)
            part.counter("bytes", progress.bytes_written)
            part.counter("rows_read", progress.rows_read)
            part.counter("rows_kept", progress.rows_kept)
            part.counter("latents", progress.latents.get("written", 0))
            part.counter("embeddings", progress.embeddings.get("written", 0))
            counts = stall_counts(progress)
            if counts != part.last_counts:
                part.last_counts = counts
                part.last_progress_at = progress.updated_at

    def forget_part(self, namespace: str, name: str) -> None:
        """Drop a deleted part's series (also call it before a part starts over into a new output)."""
        with self._lock:
            self._parts.pop((namespace, name), None)

    def parts(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._parts)

    # --- datasets --------------------------------------------------------------------------------

    def observe_dataset(self, namespace: str, name: str, status: dict) -> None:
        """Record a dataset's added-up status (datasets.summarize)."""
        for phase in PHASES:
            self.dataset_parts.labels(namespace, name, phase).set(status["partsByPhase"].get(phase, 0))
        self.dataset_images.labels(namespace, name).set(status["images"]["ok"])
        for reason in FAILURE_REASONS:
            self.dataset_images_failed.labels(namespace, name, reason).set(
                status["images"]["failedByReason"].get(reason, 0)
            )
        self.dataset_bytes_written.labels(namespace, name).set(status["bytesWritten"])

    def forget_dataset(self, namespace: str, name: str) -> None:
        for phase in PHASES:
            with contextlib.suppress(KeyError):
                self.dataset_parts.remove(namespace, name, phase)
        for reason in FAILURE_REASONS:
            with contextlib.suppress(KeyError):
                self.dataset_images_failed.remove(namespace, name, reason)
        for gauge in (self.dataset_images, self.dataset_bytes_written):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)

    # --- operator health -------------------------------------------------------------------------

    def reconcile_error(self, handler: str) -> None:
        self.reconcile_errors.labels(handler=handler).inc()

    def set_queue_length(self, n: int) -> None:
        self.queue_length.set(n)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Serve /metrics in a daemon thread; returns the server (`shutdown()` and `server_close()` stop it)."""
        server, _thread = start_http_server(port, addr, registry=self.registry)
        return server
