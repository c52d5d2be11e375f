"""The LaionDataset resource: many parts from one template, and one status adding them up.

A dataset makes one LaionPart per source file (`spec.dataset_parts`), owned by it, so that deleting
the dataset deletes its parts (their own finalizer stops their jobs; the output stays). Each reconcile
brings every part's spec in line with the template (a change then reaches each part as a change of
its own spec: resume, or FilterChanged), adds up the parts' statuses, posts an Event on every
transition and writes the dataset's index of annotation files (`contract.DATASET_INDEX`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import re
import time

from .. import spec as specs

# (`annotations` renamed: `from __future__ import annotations` holds the name here)
from ..contract import DATASET_INDEX, FAILURE_REASONS, Phase, dataset_latents, part_dir, part_latents, summary
from ..contract import annotations as annotations_file
from ..storage import Store
from . import kube
from .context import Operator
from .resource import Resource, condition, now
from .status import CONDITIONS_SCHEMA, COUNT_SCHEMA, IMAGES_SCHEMA

log = logging.getLogger(__name__)

KIND = "LaionDataset"


class DatasetPhase(str, enum.Enum):
    """A dataset's own phases, not a part's: its parts run, all Succeeded, some Failed, or the rest Suspended."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


STATUS_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "phase": {"type": "string", "enum": [p.value for p in DatasetPhase]},
        "message": {"type": "string"},
        "observedGeneration": {"type": "integer"},
        "partsTotal": COUNT_SCHEMA,
        "partsSucceeded": COUNT_SCHEMA,
        "partsProgress": {"type": "string", "description": "Parts succeeded / parts in all."},
        "partsByPhase": {"type": "object", "additionalProperties": COUNT_SCHEMA},
        "partPhases": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Each part's phase, by part id.",
        },
        "images": IMAGES_SCHEMA,
        "bytesWritten": COUNT_SCHEMA,
        "successRate": {"type": "number", "description": "Percent of attempted images downloaded, all parts."},
        "index": {"type": "string", "description": "The dataset's index of every part's annotation files."},
        "conditions": CONDITIONS_SCHEMA,
    },
    "x-kubernetes-preserve-unknown-fields": True,  # kopf's bookkeeping
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Parts", "type": "string", "jsonPath": ".status.partsProgress"},
    {"name": "Images", "type": "integer", "jsonPath": ".status.images.ok"},
    {"name": "Success %", "type": "number", "jsonPath": ".status.successRate"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def part_name(dataset: str, part_id: str) -> str:
    """The LaionPart's name: the dataset's, then the part id (a DNS label's characters only)."""
    return f"{dataset}-" + re.sub(r"[^a-z0-9-]+", "-", part_id.lower()).strip("-")


def summarize(parts: list[dict]) -> dict:
    """The dataset status fields that add up its parts' statuses."""
    by_phase: dict[str, int] = {}
    phases: dict[str, str] = {}
    ok = failed = written = 0
    reasons: dict[str, int] = {}
    rules: dict[str, int] = {}
    for part in parts:
        status = part.get("status") or {}
        phase = status.get("phase") or Phase.PENDING.value
        phases[part["spec"]["partId"]] = phase
        by_phase[phase] = by_phase.get(phase, 0) + 1
        images = status.get("images") or {}
        ok += images.get("ok", 0)
        failed += images.get("failed", 0)
        for reason, n in (images.get("failedByReason") or {}).items():
            reason = reason if reason in FAILURE_REASONS else "other"
            reasons[reason] = reasons.get(reason, 0) + n
        for rule, n in (images.get("optedOutBy") or {}).items():
            rules[rule] = rules.get(rule, 0) + n
        written += status.get("bytesWritten", 0)
    succeeded = by_phase.get(Phase.SUCCEEDED.value, 0)
    return {
        "partsTotal": len(parts),
        "partsSucceeded": succeeded,
        "partsProgress": f"{succeeded}/{len(parts)}",
        "partsByPhase": by_phase,
        "partPhases": phases,
        "images": {"ok": ok, "failed": failed, "failedByReason": reasons, "optedOutBy": rules},
        "bytesWritten": written,
        "successRate": round(100.0 * ok / (ok + failed), 2) if ok + failed else 0.0,
    }


# A part spec replaced but not seen changed is sent again after this long (the CRD may have been fixed).
RESEND_SECONDS = 600.0


def dropped_fields(sent: dict, stored: dict, prefix: str = "spec") -> list[str]:
    """The fields of `sent` the API server did not store: an older CRD pruned them."""
    missing = []
    for key, value in sent.items():
        if key not in stored:
            missing.append(f"{prefix}.{key}")
        elif isinstance(value, dict) and isinstance(stored[key], dict):
            missing += dropped_fields(value, stored[key], f"{prefix}.{key}")
    return missing


def stale_message(fields: list[str]) -> str:
    return (
        f"the API server drops {', '.join(fields[:10])} from the parts' specs: its LaionPart CRD is older "
        "than the operator (Helm never upgrades crds/); apply the chart's CRDs with "
        "`kubectl apply --server-side -f crds/`"
    )


def decided(part: dict, want: dict, stored: dict | None = None) -> bool:
    """Whether the part's status is its own decision on the spec the dataset wants now: its spec is
    the template's and its status observed its current generation. `stored`: the part as the API
    server answered the dataset's last change of its spec (an older CRD may have pruned it); a part
    seen at an older generation than that is a watch event behind. A part created or re-specced this
    poll is not decided: the dataset must not add up a phase of a generation that part has not run."""
    meta = part.get("metadata") or {}
    generation = meta.get("generation")
    templated = part.get("spec") == want or (stored is not None and part.get("spec") == stored.get("spec"))
    if generation is None or not templated:
        return False
    if stored is not None and generation < ((stored.get("metadata") or {}).get("generation") or 0):
        return False
    return (part.get("status") or {}).get("observedGeneration") == generation


def undecided(part_id: str, part: dict | None) -> dict:
    """A part as the dataset adds it up until it decided on the wanted spec: Pending, with the counts
    its output holds so far."""
    status = dict((part or {}).get("status") or {})
    status["phase"] = Phase.PENDING.value
    return {"metadata": dict((part or {}).get("metadata") or {}), "spec": {"partId": part_id}, "status": status}


def dataset_phase(by_phase: dict[str, int], total: int, suspend: bool) -> DatasetPhase:
    if not total:
        return DatasetPhase.PENDING
    if by_phase.get(Phase.SUCCEEDED.value, 0) == total:
        return DatasetPhase.SUCCEEDED
    active = sum(
        n for p, n in by_phase.items() if p not in (Phase.SUCCEEDED.value, Phase.FAILED.value, Phase.SUSPENDED.value)
    )
    if active:
        return DatasetPhase.RUNNING
    if suspend or by_phase.get(Phase.SUSPENDED.value):
        return DatasetPhase.SUSPENDED
    return DatasetPhase.FAILED


class Dataset(Resource):
    """One LaionDataset followed by one kopf daemon; `parts` is the kopf index of the parts by dataset
    (controller.dataset_parts), so that a poll lists nothing."""

    plural = kube.DATASET_PLURAL

    def __init__(self, op: Operator, body, stopped, parts=None):
        super().__init__(op, body, stopped)
        self.parts = parts
        # Part specs this process replaced, and when: the index may not show the change yet, and an
        # API server whose CRD is older than the operator prunes fields it does not know (`stale`).
        self.sent: dict[str, tuple[dict, float]] = {}
        self.stored: dict[str, dict] = {}  # the API server's answer to the last spec sent (`decided`)
        self.stale: dict[str, list[str]] = {}

    async def follow(self) -> None:
        while not self.stopped:
            try:
                await self.reconcile()
            except (RuntimeError, OSError, kube.KubeError) as err:
                log.warning(
                    "dataset %s/%s: %s; retrying in %ss", self.namespace, self.name, err, self.op.config.poll_seconds
                )
            await self.stopped.wait(self.op.config.poll_seconds)

    async def reconcile(self) -> None:
        generation = int(self.body["metadata"].get("generation") or 1)
        try:
            data = specs.validate_dataset(self.body["spec"])
        except specs.SpecError as err:
            if self.status.get("phase") != DatasetPhase.FAILED or self.status.get("observedGeneration") != generation:
                await self.write(
                    phase=DatasetPhase.FAILED.value,
                    message=str(err),
                    observedGeneration=generation,
                    conditions=[
                        condition("Ready", False, "InvalidSpec", str(err), self.status.get("conditions") or [])
                    ],
                )
                self.event("InvalidSpec", str(err), warning=True)
            return
        parts = await self.converge(data, generation)
        await self.publish(data, parts, generation)

    def current_parts(self) -> dict[str, dict]:
        """This dataset's parts by part id, from the index (or a list, without one: tests, the CLI)."""
        if self.parts is None:
            found = kube.list_dataset_parts(self.namespace, self.name)
        else:
            found = list(self.parts.get((self.namespace, kube.label_value(self.name)), ()))
        uid = self.body["metadata"].get("uid")
        return {
            p["spec"].get("partId"): p
            for p in found
            if not uid or any(o.get("uid") == uid for o in p["metadata"].get("ownerReferences") or [])
        }

    async def converge(self, data: dict, generation: int) -> list[dict]:
        """Create the missing parts, bring every part's spec in line with the template, and delete the
        parts a shrunk range left outside (their own finalizers stop their jobs; the output stays).
        Returns every wanted part as the dataset adds it up: those not decided on the wanted spec yet
        (`decided`) as Pending."""
        existing = self.current_parts() if self.parts is not None else await asyncio.to_thread(self.current_parts)
        wanted = {part_id: specs.apply_defaults(spec) for part_id, spec in specs.dataset_parts(data).items()}
        created, changed, pruned = [], [], {}
        for part_id, want in wanted.items():  # as the API server stores it, so that equal compares equal
            have = existing.get(part_id)
            if have is None:
                if await asyncio.to_thread(kube.create_part, self.namespace, self.part_body(part_id, want)):
                    created.append(part_id)
            elif have["spec"] != want:
                sent, at = self.sent.get(part_id, (None, 0.0))
                if sent == want and time.monotonic() - at < RESEND_SECONDS:
                    continue  # replaced already: the index has not caught up, or the CRD prunes it
                stored = await asyncio.to_thread(kube.replace_part_spec, self.namespace, have["metadata"]["name"], want)
                self.sent[part_id] = (want, time.monotonic())
                self.stored[part_id] = stored or {}
                changed.append(part_id)
                missing = dropped_fields(want, self.stored[part_id].get("spec") or {})
                if missing:
                    pruned[part_id] = missing
        # Parts already being deleted go by their own finalizers: neither deleted nor announced again.
        gone = [
            p for part_id, p in existing.items() if part_id not in wanted and not p["metadata"].get("deletionTimestamp")
        ]
        for part in gone:
            await asyncio.to_thread(kube.delete_part, self.namespace, part["metadata"]["name"])
        if created:
            self.event("PartsCreated", f"created {len(created)} parts: {', '.join(created)}")
        if changed:
            what = "suspend" if data["suspend"] else "template"
            self.event(
                "PartsUpdated",
                f"generation {generation}: the {what} reached {len(changed)} parts: {', '.join(changed)}",
            )
        if gone:
            ids = ", ".join(sorted(p["spec"].get("partId", "") for p in gone))
            self.event(
                "PartsDeleted",
                f"generation {generation}: {len(gone)} parts outside the range deleted (their output stays): {ids}",
            )
        if pruned and pruned != self.stale:
            fields = sorted({f for fs in pruned.values() for f in fs})
            self.event("StaleCRD", stale_message(fields), warning=True)
        self.stale = pruned or (self.stale if changed == [] else {})
        if (created or changed) and self.parts is None:  # no index to catch up: read the parts as they are now
            existing = await asyncio.to_thread(self.current_parts)
        return [
            have if have is not None and decided(have, want, self.stored.get(part_id)) else undecided(part_id, have)
            for part_id, want in wanted.items()
            for have in [existing.get(part_id)]
        ]

    def part_body(self, part_id: str, part_spec: dict) -> dict:
        meta = self.body["metadata"]
        return {
            "apiVersion": f"{kube.GROUP}/{kube.VERSION}",
            "kind": "LaionPart",
            "metadata": {
                "name": part_name(self.name, part_id),
                "namespace": self.namespace,
                "labels": {kube.DATASET_LABEL: kube.label_value(self.name)},
                "ownerReferences": [
                    {
                        "apiVersion": f"{kube.GROUP}/{kube.VERSION}",
                        "kind": KIND,
                        "name": self.name,
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": part_spec,
        }

    async def publish(self, data: dict, parts: list[dict], generation: int) -> None:
        fields = summarize(parts)
        phase = dataset_phase(fields["partsByPhase"], fields["partsTotal"], data["suspend"])
        before = self.status
        old_phases = before.get("partPhases") or {}
        for part_id, part_phase in sorted(fields["partPhases"].items()):
            if part_phase != old_phases.get(part_id) and part_phase in (Phase.SUCCEEDED.value, Phase.FAILED.value):
                message = f"part {part_id} {part_phase.lower()} ({fields['partsProgress']} parts succeeded)"
                self.event(f"Part{part_phase}", message, warning=part_phase == Phase.FAILED.value)
        if fields["partPhases"] != old_phases and fields["partsTotal"]:
            try:
                fields["index"] = await self.write_index(data, parts)
            except Exception as err:  # noqa: BLE001 - the index is rewritten on the next change
                log.warning("dataset %s/%s: index not written: %s", self.namespace, self.name, err)
        message = f"{fields['partsProgress']} parts succeeded, " + ", ".join(
            f"{n} {p}" for p, n in sorted(fields["partsByPhase"].items())
        )
        conditions = before.get("conditions") or []
        stale = sorted({f for fs in self.stale.values() for f in fs})
        fields.update(
            phase=phase.value,
            message=message,
            observedGeneration=generation,
            conditions=[
                condition("Complete", phase is DatasetPhase.SUCCEEDED, phase.value, message, conditions),
                condition(
                    "Suspended",
                    phase is DatasetPhase.SUSPENDED,
                    "Suspend" if data["suspend"] else "Resume",
                    "",
                    conditions,
                ),
                condition(
                    "CRDCurrent",
                    not stale,
                    "StaleCRD" if stale else "Current",
                    stale_message(stale) if stale else "",
                    conditions,
                ),
            ],
        )
        self.op.metrics.observe_dataset(self.namespace, self.name, fields)
        unchanged = all(before.get(k) == v for k, v in fields.items() if k != "conditions")
        if unchanged:
            return
        await self.write(**fields)
        if phase.value != before.get("phase"):
            self.event(phase.value, message, warning=phase is DatasetPhase.FAILED)

    async def write_index(self, data: dict, parts: list[dict]) -> str:
        """`<output>/dataset_index.json`: every part's folder and annotation files, and whether they are ready."""
        first = specs.PartSpec.from_dict(specs.apply_defaults(next(iter(specs.dataset_parts(data).values()))))
        output = dataclasses.replace(first.output, uri=data["template"]["output"]["uri"].rstrip("/"))
        secret = None
        if output.credentials_secret:
            secret = await asyncio.to_thread(kube.read_secret, self.namespace, output.credentials_secret)
        fmt = first.download.output_format
        entries = []
        for part in sorted(parts, key=lambda p: p["spec"]["partId"]):
            part_id = part["spec"]["partId"]
            status = part.get("status") or {}
            entries.append(
                {
                    "partId": part_id,
                    "part": part["metadata"]["name"],
                    "output": part_dir(part_id),
                    "annotations": f"{part_dir(part_id)}/{annotations_file(part_id, fmt)}",
                    "summary": f"{part_dir(part_id)}/{summary(part_id)}",
                    "phase": status.get("phase") or Phase.PENDING.value,
                    "ready": status.get("phase") == Phase.SUCCEEDED.value,
                    "images": (status.get("images") or {}).get("ok", 0),
                    **({"latents": part_latents(part_id)} if first.latents else {}),
                }
            )
        index = {
            "dataset": self.name,
            "namespace": self.namespace,
            "outputFormat": fmt,
            "updatedAt": now(),
            "parts": entries,
        }
        if first.latents:  # one manifest for every part: they all encode with the template's settings
            index["latents"] = dataset_latents(first.latents)
        await asyncio.to_thread(lambda: Store(output, secret=secret or {}).write_json(index, DATASET_INDEX))
        return f"{output.uri}/{DATASET_INDEX}"
