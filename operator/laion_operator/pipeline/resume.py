"""What a resumed run finds in its output: the shards already finished (and damaged ones, redone whole),
and shard files this part did not write."""

from __future__ import annotations

import logging

from .. import contract
from ..contract import ShardStats
from ..errors import InputError
from ..storage import Store
from . import formats

log = logging.getLogger(__name__)


class DamagedOutput(InputError):
    """The output holds files this part did not write and cannot account for; the message names them."""


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
    for needed in (contract.shard_metadata(shard), formats.shard_data(shard, output_format)):
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
    # a shard's files in any format (00042, 00042.tar, 00042.parquet, 00042_stats.json, …), as each format names them
    stray = sorted(n for n in names if (shard := formats.shard_of_file(n)) is not None and shard >= shards)
    if stray:
        raise DamagedOutput(
            f"output {store.uri} holds {', '.join(store.url(n) for n in stray[:5])}"
            f"{' and more' if len(stray) > 5 else ''}, which {'is' if len(stray) == 1 else 'are'} not a shard of "
            f"this part (it has {shards} shards, {contract.shard_name(0)} to {contract.shard_name(shards - 1)}): "
            f"remove {'it' if len(stray) == 1 else 'them'}, or choose another output.uri"
        )


def finished_shards(store: Store) -> list[int]:
    """The shards of an output whose stats file exists (a download or a conversion)."""
    found = (
        contract.shard_of_stats(path.rsplit("/", 1)[-1])
        for path in store.fs.glob(store.path(contract.SHARD_STATS_GLOB))
    )
    return sorted(shard for shard in found if shard is not None)
