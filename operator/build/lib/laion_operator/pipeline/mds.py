"""The part-wide MDS index: every shard's `index.json` merged into one at the output's root.

Each download shard writes its own MDS folder (`00000/index.json`, `00000/shard.00000.mds`, …), so
shards stay independent for resume. A trainer wants one dataset: `StreamingDataset(remote=<output>)`
reads the root `index.json`, whose shard entries name their files relative to the root. This is what
streaming's `merge_index` writes (basenames prefixed with their folder; tests/test_mds.py compares),
done here because `merge_index(<output>)` takes every `.json` below the root for an index (the
shards' `_stats.json` and `_laion/` too), and through the part's Store so that S3 is reached with the
part's credentials and endpoint rather than boto3's environment.
"""

from __future__ import annotations

import copy
import json

from .. import contract
from ..contract import shard_name
from ..storage import Store

_FILE_KEYS = ("raw_data", "zip_data", "raw_meta", "zip_meta")


def read_index(store: Store, shard: int) -> dict:
    data = store.read_json(contract.mds_index(shard))
    if data is None:
        raise FileNotFoundError(f"{store.url(contract.mds_index(shard))}: the shard's MDS index is missing")
    return data


def shard_files(index: dict) -> list[tuple[str, int]]:
    """(MDS file basename, samples) of each MDS shard an index lists."""
    return [(entry["raw_data"]["basename"], entry["samples"]) for entry in index["shards"]]


def merge(indexes: dict[int, dict]) -> dict:
    """One index over the shards' indexes, their files named from the root (streaming's merge_index)."""
    shards = []
    for shard, index in sorted(indexes.items()):
        for entry in index["shards"]:
            entry = copy.deepcopy(entry)
            for key in _FILE_KEYS:
                if entry.get(key):
                    entry[key]["basename"] = f"{shard_name(shard)}/{entry[key]['basename']}"
            shards.append(entry)
    return {"version": 2, "shards": shards}


def write_merged_index(store: Store, indexes: dict[int, dict]) -> None:
    # streaming reads it with json.load; sorted keys keep the file stable across identical runs
    store.write_text(json.dumps(merge(indexes), sort_keys=True), contract.mds_index())
