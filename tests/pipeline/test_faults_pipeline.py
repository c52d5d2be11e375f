"""Faults under a running part (issue 12): the object store goes away, a shard's worker is killed,
a worker node is lost, the output is damaged. Each ends with each sample exactly once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from laion_operator.pipeline.driver import run_part
from laion_operator.pipeline.resume import DamagedOutput
from laion_operator.spec import PartSpec
from laion_operator.storage import StorageUnavailable
from laion_operator.testbed.demo_data import write_metadata
from tests.support.exactly_once import check_exactly_once
from tests.support.faults import SecondNode, cmdline, ray_workers
from tests.support.specs import mixed_metadata, partspec

# The outage is ~30 s; LAION_TEST_OUTAGE_SECONDS makes it shorter on a slow machine.
OUTAGE_SECONDS = float(os.environ.get("LAION_TEST_OUTAGE_SECONDS", "30"))


def spec(source, output, rows_per_shard: int = 10, **download) -> PartSpec:
    download = {"imageSize": 64, "timeout": 5, "maxInFlight": 2, "parallelism": 2, "shardRetries": 3, **download}
    return partspec("f", source, output, samples_per_shard=rows_per_shard, download=download)


@pytest.fixture(scope="module")
def slow_metadata(tmp_path_factory, image_server):
    """Half the images answer after a second: shards run long enough to be hit mid-way."""
    path = tmp_path_factory.mktemp("slow") / "part.parquet"
    return mixed_metadata(path, 60, image_server, seed=31, slow_seconds=1, ok=0.5, timeout=0.4, http_4xx=0.1)


@pytest.fixture(scope="module")
def fast_metadata(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("fast") / "part.parquet"
    write_metadata(path, 50, image_server.base_url, seed=32, failure_mix={"ok": 0.8, "http_4xx": 0.1, "decode": 0.1})
    return path


class Background:
    """run_part in a thread of this process (the Ray driver), its outcome kept for the test."""

    def __init__(self, part: PartSpec):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(part,), daemon=True)
        self.thread.start()

    def _run(self, part):
        try:
            self.result = run_part(part)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            self.error = err

    def wait(self, timeout: float = 300):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the part did not end"
        return self


def wait_until(predicate, timeout: float = 180, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def s3_output(s3, bucket: str, retry_seconds: float) -> dict:
    return {
        "uri": f"s3://{bucket}/part",
        "endpoint": s3.endpoint,
        "region": "us-east-1",
        "pathStyle": True,
        "retrySeconds": retry_seconds,
    }


def stats_files(s3, bucket: str) -> dict[str, bytes]:
    client = s3.client()
    return {
        k: client.get_object(Bucket=bucket, Key=k)["Body"].read()
        for k in s3.keys(bucket, "part/")
        if k.endswith("_stats.json")
    }


def test_object_store_outage_is_ridden_out_exactly_once(ray_driver, s3, slow_metadata):
    bucket = s3.create_bucket("outage-ok")
    part = spec(slow_metadata, s3_output(s3, bucket, retry_seconds=OUTAGE_SECONDS * 3))
    run = Background(part)
    wait_until(lambda: stats_files(s3, bucket) or run.error, what="a first finished shard")
    assert run.error is None, run.error
    before = stats_files(s3, bucket)
    s3.outage(OUTAGE_SECONDS).join()  # the server's process killed and started again; shards keep downloading
    run.wait()
    assert run.error is None, run.error
    assert run.result["shards"]["done"] == 6
    after = stats_files(s3, bucket)
    assert {k: after[k] for k in before} == before  # shards finished before the outage were not redone
    check_exactly_once(part.output)


def test_outage_longer_than_the_retries_fails_naming_the_endpoint_and_resumes(ray_driver, s3, slow_metadata):
    bucket = s3.create_bucket("outage-long")
    part = spec(slow_metadata, s3_output(s3, bucket, retry_seconds=3))
    run = Background(part)
    wait_until(lambda: stats_files(s3, bucket) or run.error, what="a first finished shard")
    s3.down()
    try:
        run.wait()
    finally:
        s3.up()
    assert isinstance(run.error, StorageUnavailable), run.error
    assert s3.endpoint in str(run.error) and "output.retrySeconds" in str(run.error)
    finished = stats_files(s3, bucket)
    assert 0 < len(finished) < 6

    summary = run_part(part)  # the next attempt resumes from the finished shards
    assert summary["shards"]["done"] == 6
    after = stats_files(s3, bucket)
    assert {k: after[k] for k in finished} == finished
    check_exactly_once(part.output)


def test_killed_shard_worker_is_retried_exactly_once(ray_driver, slow_metadata, tmp_path):
    out = tmp_path / "out"
    part = spec(slow_metadata, out)
    run = Background(part)
    # A shard half-way: its tar is open, its stats not yet written.
    wait_until(lambda: ray_workers(ray_driver) and list(out.glob("*.tar")) or run.error, what="a running shard")
    time.sleep(1.5)
    killed = ray_workers(ray_driver)[0]
    os.kill(killed, signal.SIGKILL)
    run.wait()
    assert run.error is None, run.error
    check_exactly_once(out)


def test_lost_progress_board_comes_back_and_the_part_goes_on(ray_driver, slow_metadata, tmp_path):
    """The actor that gathers running shards' counts is only progress: lost mid-part, it restarts and
    the part ends as if nothing happened."""
    out = tmp_path / "out"
    run = Background(spec(slow_metadata, out))
    wait_until(
        lambda: (ray_workers(ray_driver) and ray_workers(ray_driver, "Board")) or run.error,
        what="a running shard and its board",
    )
    time.sleep(1)
    for pid in ray_workers(ray_driver, "Board"):
        os.kill(pid, signal.SIGKILL)
    run.wait()
    assert run.error is None, run.error
    assert run.result["shards"]["done"] == 6
    check_exactly_once(out)


def test_lost_worker_node_runs_its_shards_elsewhere(ray_driver, slow_metadata, tmp_path):
    node = SecondNode(ray_driver).start()
    try:
        import ray

        wait_until(lambda: ray.cluster_resources().get("second_node"), timeout=60, what="the second node")
        out = tmp_path / "out"
        part = spec(slow_metadata, out, parallelism=4)

        def on_second_node():
            return [pid for pid in node.processes() if cmdline(pid).startswith("ray::_write_shard")]

        run = Background(part)
        wait_until(lambda: on_second_node() or run.error, what="a shard on the second node")
        time.sleep(1)
        node.kill()
        run.wait()
        assert run.error is None, run.error
        check_exactly_once(out)
    finally:
        node.kill()


def test_damaged_output_is_repaired_or_refused_naming_the_file(ray_driver, fast_metadata, tmp_path):
    out = tmp_path / "out"
    part = spec(fast_metadata, out)
    first = run_part(part)
    total = first["shards"]["total"]
    assert total == 5
    untouched = (out / "00004_stats.json").read_text()

    (out / "_laion" / "progress.json").write_text('{"part_id": "f", "images_ok": 99')  # truncated
    (out / "00000_stats.json").unlink()  # its tar stays: the shard is not finished
    (out / "00001_stats.json").write_text("{")  # unreadable
    (out / "00002.tar").unlink()  # its stats claim a shard that is gone
    stats = json.loads((out / "00003_stats.json").read_text())
    redone = run_part(part)
    assert redone["images"] == first["images"]
    assert (out / "00004_stats.json").read_text() == untouched  # sound shards are kept
    assert json.loads((out / "00003_stats.json").read_text()) == stats
    check_exactly_once(out)

    progress = json.loads((out / "_laion" / "progress.json").read_text())
    progress.update(images_ok=10**6, shards_done=99)  # hand-edited: counts come from the shards, not from it
    (out / "_laion" / "progress.json").write_text(json.dumps(progress))
    assert run_part(part)["images"] == first["images"]
    check_exactly_once(out)

    (out / "00042.tar").write_bytes(b"not a shard of this part")
    with pytest.raises(DamagedOutput, match=r"00042\.tar.*not a shard of this part"):
        run_part(part)
    (out / "00042.tar").unlink()
    assert run_part(part)["images"] == first["images"]
    check_exactly_once(out)
