"""The loop one kopf daemon runs for one LaionPart: poll, carry the step out, sleep until the next."""

from __future__ import annotations

import asyncio
import logging

from .. import kube
from ..backend import BackendError
from ..lifecycle import Action
from .actions import Actions
from .reads import WaitingForCredentials

log = logging.getLogger(__name__)
# A settled part also looks again this often, should a watch event ever be missed.
SETTLED_RECHECK_SECONDS = 60.0


class Part(Actions):
    """One LaionPart followed by one kopf daemon."""

    async def follow(self) -> None:
        """Run until the operator stops or the object goes away; settled parts wait for spec changes."""
        # This daemon's own event: one for the same name still stopping must not keep or drop it.
        change = self.op.changes[self.key] = asyncio.Event()
        try:
            while not self.stopped:
                change.clear()  # before reading the object: a change from here on wakes the sleeps below
                generation = self.generation
                wait = self.retry_wait()
                if wait > 0:  # suspend, a spec change or delete end it; the deadline bounds it
                    await self.sleep(change, wait, generation)
                    continue
                try:
                    step = await self.reconcile()
                except WaitingForCredentials:
                    self.credentials_backoff = self.capped(2 * self.credentials_backoff or self.op.config.poll_seconds)
                    await self.sleep(change, self.credentials_backoff, generation)
                    continue
                except (BackendError, OSError, kube.KubeError) as err:
                    # Ray or the API server unreachable for a while: say so, and try again.
                    log.warning(
                        "part %s/%s: %s; retrying in %ss", self.namespace, self.name, err, self.op.config.poll_seconds
                    )
                    try:
                        await self.write(message=f"retrying after: {str(err)[:500]}")
                    except kube.KubeError:
                        pass  # the API server refuses this write too: the next round tries again
                    await self.sleep(change, self.op.config.poll_seconds, generation)
                    continue
                self.credentials_backoff = 0.0
                if step.action is Action.WAIT:
                    await self.observe_final()
                    await self.sleep(change, SETTLED_RECHECK_SECONDS, generation, any_change=True)
                elif step.action in (Action.SUBMIT, Action.FOLLOW):
                    await self.sleep(change, self.op.config.poll_seconds, generation)
                # SUCCEED, FAIL, SUSPEND: the next round finds the part settled and waits there; RETRY:
                # it waits out the backoff (retry_wait)
        finally:
            if self.op.changes.get(self.key) is change:
                del self.op.changes[self.key]
            self.op.slots.release(self.key)
            # A pause, a failover or a delete: what other replicas did meanwhile is listed again.
            self.op.slots.forget_listing()

    async def sleep(self, change: asyncio.Event, seconds: float, generation: int, any_change: bool = False) -> None:
        """Sleep `seconds`, less if the operator stops, the object goes, or its spec changes from
        `generation` (any watch event at all with `any_change`): a settled part never polls, so many
        finished parts cost an idle operator nothing, and a backoff ends when its reason does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.stopped and self.generation == generation:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            waits = [asyncio.ensure_future(change.wait()), asyncio.ensure_future(self.stopped.wait())]
            try:
                await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            if change.is_set():
                if any_change:
                    return
                change.clear()  # our own status write coming back, most likely: the generation tells
