"""What parts and datasets share: reading their status, patching it, conditions and Events."""

from __future__ import annotations

import asyncio
import time

import kopf

from . import kube


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def condition(kind: str, ok: bool, reason: str, message: str, previous: list[dict]) -> dict:
    """A Kubernetes condition whose lastTransitionTime moves only when its status does."""
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now()
    return {"type": kind, "status": status, "reason": reason, "message": message[:1000], "lastTransitionTime": since}


def removing(old, new):
    """`new` as a merge patch over `old`: map keys that `new` drops become null."""
    if not isinstance(new, dict) or not isinstance(old, dict):
        return new
    return {**{k: None for k in old if k not in new}, **{k: removing(old.get(k), v) for k, v in new.items()}}


class Resource:
    """One of the operator's objects followed by a kopf daemon; `body` is kopf's live view of it."""

    plural = kube.PLURAL

    def __init__(self, op, body, stopped):
        self.op, self.body, self.stopped = op, body, stopped
        self.namespace = body["metadata"]["namespace"]
        self.name = body["metadata"]["name"]
        self.key = (self.namespace, self.name)
        # What this process last wrote: the watch stream may not have brought it back yet.
        self.written: dict = {}

    @property
    def generation(self) -> int:
        return int(self.body["metadata"].get("generation") or 1)

    @property
    def status(self) -> dict:
        return {**(self.body.get("status") or {}), **self.written}

    async def write(self, **fields) -> None:
        """Patch the status (merge), keeping conditions whole; maps lose the keys `fields` drop from them."""
        conditions = list(self.status.get("conditions") or [])
        for new in fields.pop("conditions", []):
            conditions = [c for c in conditions if c.get("type") != new["type"]] + [new]
        fields["conditions"] = conditions
        patch = {k: removing(self.status.get(k), v) for k, v in fields.items()}
        try:
            await asyncio.to_thread(kube.patch_status, self.namespace, self.name, patch, self.plural)
        except kube.KubeError as err:
            self.op.metrics.kube_api_errors.inc()
            if err.status == 404:  # deleted meanwhile
                return
            raise
        self.written.update(fields)

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        """A Kubernetes Event on the object (`kubectl describe`), posted in the background by kopf."""
        kopf.event(self.body, type="Warning" if warning else "Normal", reason=reason, message=message[:1000])
