"""`part_<id>_summary.json` as typed records (summary.py): the keys trainers' tooling reads stay the
ones the summary has always had, and a summary read back writes the same document, keys it does not
know included."""

from __future__ import annotations

import copy

from laion_operator.summary import HealSummary, LatentsSummary, Summary

# A part's summary with every section, as a part with verify, latents and heal writes it.
WHOLE = {
    "partId": "00007",
    "output": "s3://bucket/laion/part-00007",
    "outputFormat": "webdataset",
    "metadata": {"rowsRead": 1000, "rowsKept": 640, "droppedBy": {"minImageSize": 300, "nsfw": 60}},
    "shards": {"total": 2, "done": 2, "failed": 0},
    "images": {
        "attempted": 640,
        "ok": 512,
        "failedToDownload": 120,
        "failedToResize": 8,
        "failedByReason": {"http_4xx": 96, "timeout": 20, "decode": 8, "opt_out": 4},
        "optedOutBy": {"x_robots_tag": 3, "tdmrep_json": 1},
        "leftOutBy": {"exact": 2, "score": 5},
        "slowedDown": 6,
    },
    "successRate": 80.0,
    "bytesWritten": 12345678,
    "durations": {"totalSeconds": 42.5, "shardSecondsSum": 70.25},
    "annotations": "s3://bucket/laion/part-00007/part_00007_stats.csv",
    "verified": {
        "ok": True,
        "shards": 2,
        "samples": 512,
        "imagesDecoded": 512,
        "problems": [],
        "badShards": [],
        "seconds": 3.5,
    },
    "latents": {
        "index": "s3://bucket/laion/part-00007/latents/index.json",
        "samples": 512,
        "skipped": 0,
        "shards": 2,
        "latentsPerSecond": 40.0,
        "shardSecondsSum": 25.0,
        "devices": ["cpu"],
        "imageShape": [4, 32, 32],
        "imageShapes": {"256": [4, 32, 32]},
        "captionShape": [77, 768],
        "dtype": "float16",
        "dropped": {"semantic": 3, "score": 40},
    },
    "embeddings": {
        "folder": "s3://bucket/laion/part-00007/embeddings",
        "model": "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        "samples": 512,
        "skipped": 0,
        "shards": 2,
        "dim": 512,
        "embeddingsPerSecond": 90.0,
        "shardSecondsSum": 11.0,
        "devices": ["cuda"],
        "duplicates": {"exact": 3, "perceptual": 2, "semantic": 5, "groups": 7},
        "index": "s3://bucket/laion/part-00007/embeddings/index",
    },
    "heal": {"reasons": ["timeout"], "shards": 1, "refetched": 20},
}


def test_a_whole_summary_reads_and_writes_back_the_same_document():
    summary = Summary.from_json(copy.deepcopy(WHOLE))
    assert summary.written is not None and summary.written.ok == 512 and summary.images_ok == 512
    assert summary.written.failed_by_reason == {"http_4xx": 96, "timeout": 20, "decode": 8, "opt_out": 4}
    assert summary.written.opted_out_by == {"x_robots_tag": 3, "tdmrep_json": 1}
    assert summary.written.left_out_by == {"exact": 2, "score": 5} and summary.written.slowed_down == 6
    assert summary.verified is not None and summary.verified.ok and summary.verified.images_decoded == 512
    assert summary.latents == LatentsSummary(
        index=WHOLE["latents"]["index"],
        samples=512,
        skipped=0,
        shards=2,
        latents_per_second=40.0,
        shard_seconds_sum=25.0,
        devices=["cpu"],
        image_shape=[4, 32, 32],
        image_shapes={"256": [4, 32, 32]},
        caption_shape=[77, 768],
        dtype="float16",
        dropped={"semantic": 3, "score": 40},
    )
    assert summary.heal == HealSummary(reasons=["timeout"], shards=1, refetched=20)
    assert summary.embeddings is not None and summary.embeddings.duplicates == WHOLE["embeddings"]["duplicates"]
    assert summary.to_json() == WHOLE


def test_keys_it_does_not_know_are_kept_and_missing_sections_stay_missing():
    # A newer writer's key, and a summary of a part without verify, latents or heal.
    data = {k: v for k, v in copy.deepcopy(WHOLE).items() if k not in ("verified", "latents", "embeddings", "heal")}
    data["scores"] = {"shards": 2}
    summary = Summary.from_json(data)
    assert summary.extra == {"scores": {"shards": 2}}
    assert (summary.verified, summary.latents, summary.heal) == (None, None, None)
    assert summary.to_json() == data


def test_the_latents_of_a_folder_anyone_wrote_have_no_download_counts():
    # `laion-operator latents --mds`: the summary names the folder read and the latents section only.
    data = {"partId": "mds", "output": "/out", "input": "/their/mds", "latents": copy.deepcopy(WHOLE["latents"])}
    summary = Summary.from_json(data)
    assert summary.written is None and summary.images_ok == 0 and summary.input == "/their/mds"
    assert summary.to_json() == data


def test_the_written_counts_add_up_the_shards_slow_downs_and_opt_outs():
    """annotate.written: what each shard's stats counted, added up into the summary's images section."""
    from laion_operator.contract import Progress, ShardStats
    from laion_operator.pipeline.annotate import written
    from laion_operator.spec import PartSpec

    spec = PartSpec.from_dict({"partId": "t", "source": {"urls": ["m.parquet"]}, "output": {"uri": "o"}})
    shards = [
        ShardStats(shard=0, count=10, successes=8, slowed_down=2, opted_out_by={"robots_txt": 1}),
        ShardStats(shard=1, count=10, successes=9, slowed_down=3, opted_out_by={"robots_txt": 1, "tdmrep_json": 1}),
    ]
    images = Summary("t", "o", written(spec, shards, Progress(part_id="t"))).to_json()["images"]
    assert images["slowedDown"] == 5 and images["optedOutBy"] == {"robots_txt": 2, "tdmrep_json": 1}
    assert images["attempted"] == 20 and images["ok"] == 17
