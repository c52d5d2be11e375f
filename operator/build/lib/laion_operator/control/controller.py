"""The kopf operator: thin handlers that hand each LaionPart to parts.Part, each LaionDataset to
datasets.Dataset.

Run it with `laion-operator operator --config FILE`. The configuration is read once, before kopf
starts, and everything the parts share (config, Ray backend, slots, metrics) reaches the handlers
through kopf's memo.
"""

from __future__ import annotations

import asyncio
import logging
import random

import kopf

from ..contract import RUNNING
from . import kube, rayjobs
from .config import OperatorConfig
from .datasets import Dataset
from .metrics import Metrics
from .parts import Operator, Part, Slots

log = logging.getLogger(__name__)
FINALIZER = "laion-operator.io/stop-job"


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    config: OperatorConfig = memo.config
    metrics = Metrics(handlers=["follow", "stop", "dataset"])
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    memo.op = Operator(config, rayjobs.backend(config), Slots(config.max_concurrent_parts, metrics.set_queue_length),
                       metrics)
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING  # log lines become Events only when a user must look at them
    settings.execution.max_workers = 16  # blocking SDK calls run in threads; many parts poll at once
    # Parts whose jobs already run hold their slots before any queued part can take one.
    for part in await asyncio.to_thread(kube.list_parts, memo.namespaces):
        status = part.get("status") or {}
        if status.get("phase") in RUNNING and status.get("submissionId"):
            memo.op.slots.adopt((part["metadata"]["namespace"], part["metadata"]["name"]))
    log.info("laion-operator started: mode %s, %s, at most %d parts at once", config.mode,
             config.ray_address if config.mode == "jobs" else "KubeRay RayJobs", config.max_concurrent_parts)


@kopf.on.event(kube.GROUP, kube.VERSION, kube.PLURAL, id="wake")
async def wake(body, memo: kopf.Memo, **_) -> None:
    """Every watch event of a part wakes its daemon if it sleeps settled (parts.Part.follow). kopf
    watches only once the startup handler has set `memo.op`."""
    memo.op.changed((body["metadata"].get("namespace"), body["metadata"]["name"]))


class _QuietWake(logging.Filter):
    """kopf logs each watching handler's success; for `wake`, that is a line for every watch event."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Handler 'wake' succeeded."


@kopf.daemon(kube.GROUP, kube.VERSION, kube.PLURAL, id="follow", cancellation_timeout=10, backoff=5)
async def follow(body, stopped, memo: kopf.Memo, **_) -> None:
    try:
        await Part(memo.op, body, stopped).follow()
    except Exception:
        memo.op.metrics.reconcile_error("follow")
        raise


@kopf.on.delete(kube.GROUP, kube.VERSION, kube.PLURAL, id="stop")
async def stop(body, memo: kopf.Memo, **_) -> None:
    try:
        await Part(memo.op, body, None).stop()
    except Exception:
        memo.op.metrics.reconcile_error("stop")
        raise
    memo.op.metrics.forget_part(body["metadata"]["namespace"], body["metadata"]["name"])


@kopf.daemon(kube.GROUP, kube.VERSION, kube.DATASET_PLURAL, id="dataset", cancellation_timeout=10, backoff=5)
async def dataset(body, stopped, memo: kopf.Memo, **_) -> None:
    try:
        await Dataset(memo.op, body, stopped).follow()
    except Exception:
        memo.op.metrics.reconcile_error("dataset")
        raise


@kopf.on.delete(kube.GROUP, kube.VERSION, kube.DATASET_PLURAL, id="forget-dataset", optional=True)
async def forget_dataset(body, memo: kopf.Memo, **_) -> None:
    """Its parts go by garbage collection (ownerReferences); only its metrics are the operator's to drop."""
    memo.op.metrics.forget_dataset(body["metadata"]["namespace"], body["metadata"]["name"])


def main(args) -> int:
    config = OperatorConfig.load(args.config)  # a bad file fails here, before kopf starts
    logging.getLogger("kopf.objects").addFilter(_QuietWake())
    namespaces = list(args.namespace or [])
    asyncio.run(kopf.operator(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=args.standalone,
        peering_name=None if args.standalone else config.peering_name,
        # Replicas must differ in priority, or kopf pauses all of them; the highest one works.
        priority=random.randint(1, 2**31 - 1),
        memo=kopf.Memo(config=config, namespaces=namespaces),
    ))
    return 0
