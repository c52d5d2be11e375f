"""The kopf operator: thin handlers that hand each LaionPart to parts.Part.

Run it with `laion-operator operator --config FILE` (or `kopf run -m laion_operator.controller`,
with LAION_OPERATOR_CONFIG naming the file).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random

import kopf

from . import kube, rayjobs
from .config import OperatorConfig
from .metrics import Metrics
from .parts import RUNNING, Operator, Part, Slots

log = logging.getLogger(__name__)
CONFIG_ENV = "LAION_OPERATOR_CONFIG"
NAMESPACES_ENV = "LAION_OPERATOR_NAMESPACES"
FINALIZER = "laion-operator.io/stop-job"
OP: Operator | None = None


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_) -> None:
    global OP
    config = OperatorConfig.load(os.environ.get(CONFIG_ENV))
    metrics = Metrics(handlers=["follow", "stop"])
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    OP = Operator(config, rayjobs.backend(config), Slots(config.max_concurrent_parts, metrics.set_queue_length),
                  metrics)
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING  # Kubernetes events for what a user must look at
    settings.execution.max_workers = 16  # blocking SDK calls run in threads; many parts poll at once
    # Parts whose jobs already run hold their slots before any queued part can take one.
    namespaces = [n for n in os.environ.get(NAMESPACES_ENV, "").split(",") if n]
    for part in await asyncio.to_thread(kube.list_parts, namespaces):
        status = part.get("status") or {}
        if status.get("phase") in RUNNING and status.get("submissionId"):
            OP.slots.adopt((part["metadata"]["namespace"], part["metadata"]["name"]))
    log.info("laion-operator started: mode %s, %s, at most %d parts at once", config.mode,
             config.ray_address if config.mode == "jobs" else "KubeRay RayJobs", config.max_concurrent_parts)


@kopf.daemon(kube.GROUP, kube.VERSION, kube.PLURAL, id="follow", cancellation_timeout=10, backoff=5)
async def follow(body, stopped, **_) -> None:
    try:
        await Part(OP, body, stopped).follow()
    except Exception:
        OP.metrics.reconcile_error("follow")
        raise


@kopf.on.delete(kube.GROUP, kube.VERSION, kube.PLURAL, id="stop")
async def stop(body, **_) -> None:
    try:
        await Part(OP, body, None).stop()
    except Exception:
        OP.metrics.reconcile_error("stop")
        raise
    OP.metrics.forget_part(body["metadata"]["namespace"], body["metadata"]["name"])


def main(args) -> int:
    config = OperatorConfig.load(args.config)  # a bad file fails here, before kopf starts
    if args.config:
        os.environ[CONFIG_ENV] = os.path.abspath(args.config)
    namespaces = list(args.namespace or [])
    os.environ[NAMESPACES_ENV] = ",".join(namespaces)
    asyncio.run(kopf.operator(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=args.standalone,
        peering_name=None if args.standalone else config.peering_name,
        # Replicas must differ in priority, or kopf pauses all of them; the highest one works.
        priority=random.randint(1, 2**31 - 1),
    ))
    return 0
