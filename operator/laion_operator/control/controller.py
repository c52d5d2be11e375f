"""The kopf operator: thin handlers that hand each LaionPart to parts.Part, each LaionDataset to
datasets.Dataset.

Run it with `laion-operator operator --config FILE`. The configuration is read once, before kopf
starts, and everything the parts share (config, Ray backend, slots, metrics) reaches the handlers
through kopf's memo.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random

import kopf

from . import kube, rayjobs
from .config import OperatorConfig
from .datasets import Dataset
from .lifecycle import SUBMITTED
from .metrics import Metrics
from .parts import Operator, Part
from .slots import Slots

log = logging.getLogger(__name__)
FINALIZER = "laion-operator.io/stop-job"


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    config: OperatorConfig = memo.config
    metrics = Metrics(handlers=["follow", "stop", "dataset"])
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    # The parts holding a slot are those the API server says run, listed when a part is let in or
    # waits (slots.Slots): one deleted while the operator was down or paused, or that another replica
    # ran and finished, holds none.
    namespaces = list(memo.namespaces or [])

    async def slot_holders() -> set:
        parts = await asyncio.to_thread(kube.list_parts, namespaces)
        return {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in parts if _holds_slot(p.get("status"))}

    slots = Slots(config.max_concurrent_parts, metrics.set_queue_length, slot_holders, config.poll_seconds)
    memo.op = Operator(config, rayjobs.backend(config), slots, metrics)
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING  # log lines become Events only when a user must look at them
    settings.execution.max_workers = 16  # blocking SDK calls run in threads; many parts poll at once
    # kopf's own calls, as the operator's (kube.REQUEST_TIMEOUT): a hung connection is cut and retried.
    settings.networking.connect_timeout = kube.REQUEST_TIMEOUT[0]
    settings.networking.request_timeout = sum(kube.REQUEST_TIMEOUT)
    settings.watching.server_timeout = 300  # a watch stream the API server ends, and kopf opens again...
    settings.watching.client_timeout = 330  # ... or one that went silent, which kopf cuts
    log.info(
        "laion-operator started: mode %s, %s, at most %d parts at once",
        config.mode,
        config.ray_address if config.mode == "jobs" else "KubeRay RayJobs",
        config.max_concurrent_parts,
    )


_HOLDING = frozenset(p.value for p in SUBMITTED)


def _holds_slot(status) -> bool:
    """Whether a part's status says a job of theirs runs (lifecycle.SUBMITTED)."""
    return (status or {}).get("phase") in _HOLDING


@kopf.index(kube.GROUP, kube.VERSION, kube.PLURAL, id="dataset_parts", labels={kube.DATASET_LABEL: kopf.PRESENT})
def dataset_parts(namespace, name, body, labels, **_):
    """Each LaionDataset's parts as the watch last showed them: a dataset's poll lists nothing."""
    meta = body["metadata"]
    part = {
        "metadata": {
            "name": name,
            "generation": meta.get("generation"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "ownerReferences": list(meta.get("ownerReferences") or []),
        },
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }
    return {(namespace, labels[kube.DATASET_LABEL]): part}


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


# kopf's DaemonFn protocol lists no index keyword arguments, which kopf passes by the index's name.
@kopf.daemon(kube.GROUP, kube.VERSION, kube.DATASET_PLURAL, id="dataset", cancellation_timeout=10, backoff=5)  # type: ignore[arg-type]
async def dataset(body, stopped, memo: kopf.Memo, dataset_parts: kopf.Index, **_) -> None:
    try:
        await Dataset(memo.op, body, stopped, dataset_parts).follow()
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
    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=args.standalone,
            peering_name=None if args.standalone else config.peering_name,
            # Replicas must differ in priority, or kopf pauses all of them; the highest one works.
            priority=args.priority if args.priority is not None else random.randint(1, 2**31 - 1),
            memo=kopf.Memo(config=config, namespaces=namespaces),
        )
    )
    return 0
