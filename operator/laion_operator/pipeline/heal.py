"""Heal a finished part: fetch again only the samples that failed for transient reasons (a DNS outage,
timeouts, 5xx), so that a 20-hour part need not be redone for them.

Each shard holding such samples is rewritten whole by `download_shard`, which writes every other
sample again as it was (its `reuse`: the image as the output format reads it back, whichever of
the formats it is, and its metadata row) and fetches the chosen ones: afterwards every sample is in
the shard exactly once, with its new status. The shards are rewritten in parallel, a Ray task each
(`heal_shard`), through the pool and Tracker a download runs on: the heal stage (stages/heal.py) is
the last of a part when `spec.heal` is set, and `driver.heal_part` runs it alone (`laion-operator
heal`). Then the annotations, the summary and the progress are made again from the shards' stats.

A heal interrupted at any point resumes like a download. Its plan is `_laion/heal.json`; before a
shard is rewritten its earlier samples are saved to `_laion/heal/<shard>.parquet` and its
`_stats.json` removed, so an interrupted rewrite is redone from the saved samples, never from a half
written shard; the saved file goes once the shard's new `_stats.json` is written.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from .. import contract
from ..contract import HEAL, MANIFEST, ShardStats
from ..errors import InputError
from ..spec import PartSpec
from ..storage import Store
from . import formats
from .download import download_shard
from .formats import read_metadata

log = logging.getLogger(__name__)


class NotHealable(InputError):
    """The part cannot be healed as it is; the message says why and names the file."""


def save_samples(store: Store, spec: PartSpec, shard: int) -> None:
    """The shard's samples (metadata row and image) into `_laion/heal/<shard>.parquet`, written at once."""
    fmt = formats.get(spec.download.output_format)
    table = read_metadata(store, shard)
    images = {sample.key: sample.image for sample in fmt.read_samples(store, shard)}
    rows = [{k: v for k, v in row.items() if k != spec.download.encode_format} for row in table.to_pylist()]
    saved = pa.table(
        {
            "key": [r["key"] for r in rows],
            "image": pa.array([images.get(r["key"]) for r in rows], pa.binary()),
            "meta": [json.dumps(r, default=str) for r in rows],
        }
    )
    buf = io.BytesIO()
    pq.write_table(saved, buf)
    store.fs.makedirs(store.path(contract.HEAL_DIR), exist_ok=True)
    store.fs.pipe(store.path(contract.heal_backup(shard)), buf.getvalue())


def saved_samples(store: Store, shard: int) -> dict[str, tuple[bytes | None, dict]]:
    with store.fs.open(store.path(contract.heal_backup(shard)), "rb") as f:
        table = pq.read_table(f)
    return {
        key: (image, json.loads(meta))
        for key, image, meta in zip(*(table.column(c).to_pylist() for c in ("key", "image", "meta")))
    }


def to_heal(meta: dict, reasons: set[str]) -> bool:
    return meta.get("status") != "success" and meta.get("failure_reason") in reasons


def _affected(store: Store, shard: int, reasons: set[str]) -> int:
    table = read_metadata(store, shard)
    return sum(
        1
        for status, reason in zip(table.column("status").to_pylist(), table.column("failure_reason").to_pylist())
        if status != "success" and reason in reasons
    )


def finished_stats(store: Store, shards: int, skip: AbstractSet[int] = frozenset()) -> list[ShardStats]:
    stats = []
    for shard in (s for s in range(shards) if s not in skip):
        data = store.read_json(contract.shard_stats(shard))
        if data is None:
            raise NotHealable(
                f"{store.url(contract.shard_stats(shard))} is missing: the part is not finished; "
                "run it to the end first (laion-operator run, or its LaionPart)"
            )
        stats.append(ShardStats.from_json(data))
    return stats


@dataclass(frozen=True)
class HealedShard:
    """A shard rewritten by `heal_shard`: its new stats, and how many of its samples were fetched again."""

    stats: ShardStats
    refetched: int


def heal_shard(spec: PartSpec, shard: int, reasons: set[str], report=None) -> HealedShard:
    """Rewrite one shard: its samples failed for `reasons` fetched again, every other written as it was.
    Its samples are saved first and its `_stats.json` removed, so an interrupted rewrite is redone
    from the saved samples; the saved file goes once the new `_stats.json` is written."""
    store = Store(spec.output)
    if not store.exists(contract.heal_backup(shard)):
        save_samples(store, spec, shard)
    if store.exists(contract.shard_stats(shard)):
        store.fs.rm(store.path(contract.shard_stats(shard)))  # the shard is being rewritten from here on
    samples = saved_samples(store, shard)
    reuse = {k: v for k, v in samples.items() if not to_heal(v[1], reasons)}
    stats = download_shard(spec, shard, reuse=reuse, report=report)
    store.fs.rm(store.path(contract.heal_backup(shard)))
    return HealedShard(stats, len(samples) - len(reuse))


def plan(spec: PartSpec, store: Store, reasons: list[str] | None, force: bool) -> tuple[dict, dict] | None:
    """This heal's plan (`contract.HEAL`), made or resumed, and the part's manifest; None when this heal
    (its reasons and round) was done already and `force` is not set."""
    heal = spec.heal
    reasons = sorted(set(reasons or (heal.reasons if heal else contract.TRANSIENT_REASONS)))
    key = f"{','.join(reasons)}#{heal.round if heal else 0}"
    manifest = store.read_json(MANIFEST)
    if manifest is None:
        raise NotHealable(f"{store.url(MANIFEST)} is missing: {store.uri} holds no part to heal")
    shards = manifest["shards"]

    plan = store.read_json(HEAL)
    if plan and plan.get("finished") and plan.get("key") == key and not force:
        log.info("heal %s of %s was done already", key, store.uri)
        return None
    if not plan or plan.get("finished") or plan.get("key") != key:
        if plan and not plan.get("finished"):
            log.warning("%s: an unfinished heal (%s) is replaced by this one (%s)", store.url(HEAL), plan["key"], key)
        saved = [s for s in range(shards) if store.exists(contract.heal_backup(s))]
        _finished_stats_or_saved(store, shards, saved)
        todo = sorted(set(saved) | {s for s in range(shards) if s not in saved and _affected(store, s, set(reasons))})
        plan = {
            "key": key,
            "reasons": reasons,
            "shards": todo,
            "done": [],
            "finished": False,
            "started_at": time.time(),
        }
        store.write_json(plan, HEAL)
    return plan, manifest


def _finished_stats_or_saved(store: Store, shards: int, saved: list[int]) -> None:
    """Every shard is finished, or is one an interrupted heal saved before rewriting it."""
    for shard in range(shards):
        if shard not in saved and not store.exists(contract.shard_stats(shard)):
            raise NotHealable(
                f"{store.url(contract.shard_stats(shard))} is missing: the part is not finished; "
                "run it to the end first (laion-operator run, or its LaionPart)"
            )
