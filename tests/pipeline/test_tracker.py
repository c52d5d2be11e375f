"""The Tracker: a part's progress.json as its stages end (no Ray)."""

from __future__ import annotations

import json

import pytest

from laion_operator.contract import Phase, Progress
from laion_operator.pipeline.tracker import Tracker
from laion_operator.spec import output_of
from laion_operator.storage import StorageUnavailable, Store


def tracker(tmp_path) -> Tracker:
    return Tracker(Store(output_of({"uri": str(tmp_path)})), Progress(part_id="t"), None)


def progress(tmp_path) -> dict:
    return json.loads((tmp_path / "_laion" / "progress.json").read_text())


def test_fail_ends_the_part_with_its_message(tmp_path):
    t = tracker(tmp_path)
    t.phase(Phase.DOWNLOADING)
    assert progress(tmp_path)["finished_at"] is None
    t.fail("3 of 4 shards failed")
    written = progress(tmp_path)
    assert written["phase"] == "Failed" and written["message"] == "3 of 4 shards failed"
    assert written["finished_at"] is not None


def test_finish_keeps_the_end_a_stage_set(tmp_path):
    t = tracker(tmp_path)
    t.end()
    ended = t.progress.finished_at
    t.finish("10 images")
    written = progress(tmp_path)
    assert written["phase"] == "Succeeded" and written["finished_at"] == ended
    fresh = tracker(tmp_path / "fresh")
    fresh.finish("0 images")  # no stage set an end: finishing is the end
    assert progress(tmp_path / "fresh")["finished_at"] is not None


def test_a_failure_of_the_store_itself_leaves_the_progress_as_it_was(tmp_path, monkeypatch):
    t = tracker(tmp_path)
    t.phase(Phase.DOWNLOADING)

    def away(what, fn):
        raise StorageUnavailable(f"{what}: the store is away")

    monkeypatch.setattr(t.store, "retrying", away)
    t.fail("storage unavailable", store_away=True)  # the job's exit code says it
    assert progress(tmp_path)["phase"] == "Downloading"
    with pytest.raises(StorageUnavailable):
        t.fail("2 shards failed")  # any other failure: the store being away is what the job reports
