"""The check every fault test ends with: each sample of a part exactly once, and every count agrees.

- every kept row (the filter's `_laion/shards/*.parquet`) is in exactly one shard's metadata parquet;
- keys are unique across the part, and the images in the shard files are the successful keys, once;
- no shard files beyond the part's shards, and every shard has its `_stats.json`;
- the summary, the shards' stats, and (if given) the LaionPart status and the operator's metrics agree.
"""

from __future__ import annotations

import re
from collections import Counter

import pyarrow.parquet as pq

from laion_operator import contract
from laion_operator.pipeline import formats
from laion_operator.storage import Store
from tests.support import outputs


def _parquet(store: Store, name: str):
    with store.fs.open(store.path(name), "rb") as f:
        return pq.read_table(f)


def check_exactly_once(
    output,
    status: dict | None = None,
    metrics: str | None = None,
    namespace: str | None = None,
    name: str | None = None,
) -> dict:
    """Assert the part in `output` (a path, URI, Output or Store) holds each sample exactly once and that
    its summary, `status` (a LaionPart's) and `metrics` (the operator's /metrics text) agree; returns the
    summary."""
    store = outputs.store_of(output)
    manifest = store.read_json(contract.MANIFEST)
    assert manifest, f"{store.url(contract.MANIFEST)} is missing"
    total, kept_rows = manifest["shards"], manifest["rows_kept"]
    shard_names = {contract.shard_name(s) for s in range(total)}
    for entry in store.fs.ls(store.root, detail=False):
        base = entry.rstrip("/").rsplit("/", 1)[-1]
        m = re.match(rf"^(\d{{{contract.SHARD_DIGITS}}})\b", base)
        assert not m or m.group(1) in shard_names, f"stray shard file {base} in {store.uri}"

    summaries = [p for p in store.fs.ls(store.root, detail=False) if p.endswith("_summary.json")]
    assert len(summaries) == 1, summaries
    summary = store.read_json(summaries[0].rsplit("/", 1)[-1])
    fmt = summary["outputFormat"]

    kept_urls: list[str] = []
    written_urls: list[str] = []
    keys: list[str] = []
    reasons: Counter = Counter()
    ok = 0
    stats_ok = 0
    for shard in range(total):
        kept_urls += _parquet(store, contract.shard_input(shard)).column("url").to_pylist()
        table = formats.read_metadata(store, shard)
        rows = table.to_pylist()
        written_urls += [r["url"] for r in rows]
        keys += [r["key"] for r in rows]
        success = [r["key"] for r in rows if r["status"] == "success"]
        ok += len(success)
        reasons.update(r["failure_reason"] for r in rows if r["status"] != "success")
        images = [s.key for s in outputs.images(store, fmt, shard)]
        assert sorted(images) == sorted(success), f"shard {shard}: images in its file differ from its successes"
        stats = store.read_json(contract.shard_stats(shard))
        assert stats is not None, f"{contract.shard_stats(shard)} missing"
        assert stats["count"] == len(rows) and stats["successes"] == len(success), f"shard {shard}: {stats}"
        stats_ok += stats["successes"]

    assert len(kept_urls) == kept_rows, (len(kept_urls), kept_rows)
    assert Counter(written_urls) == Counter(kept_urls), "a kept row is missing from, or doubled in, the shards"
    assert len(keys) == len(set(keys)) == kept_rows, "a key appears twice"
    assert summary["images"]["ok"] == ok == stats_ok
    assert summary["images"]["attempted"] == kept_rows
    assert summary["images"]["failedByReason"] == dict(reasons)
    assert summary["shards"] == {"total": total, "done": total, "failed": 0}
    assert summary["metadata"]["rowsKept"] == kept_rows
    progress = store.read_json(contract.PROGRESS)
    assert progress["phase"] == "Succeeded" and progress["images_ok"] == ok, progress

    if status is not None:
        assert status["phase"] == "Succeeded", status
        assert status["images"]["ok"] == ok
        assert status["images"]["failedByReason"] == dict(reasons)
        assert status["rowsKept"] == kept_rows
        assert status["shards"] == summary["shards"]
        assert status["bytesWritten"] == summary["bytesWritten"]
    if metrics is not None:
        sel = f'namespace="{namespace}",part="{name}"'
        assert _metric(metrics, "laion_part_images_total", sel) == ok
        for reason in contract.FAILURE_REASONS:  # a reason a heal removed is back at 0
            assert _metric(metrics, "laion_part_images_failed_total", sel + f',reason="{reason}"') == reasons.get(
                reason, 0
            ), reason
        assert _metric(metrics, "laion_part_metadata_rows_kept_total", sel) == kept_rows
        assert _metric(metrics, "laion_part_phase", sel + ',phase="Succeeded"') == 1
    return summary


def _metric(text: str, name: str, labels: str) -> float:
    """One sample of the Prometheus text format (labels in the exposition's order)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and line.split("}")[0][len(name) + 1 :] == labels:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{labels}}} in the metrics")
