"""Heal (issue 12): a finished part's samples that failed for transient reasons are fetched again,
their shards rewritten so that every sample is in them exactly once with its new status."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from laion_operator.pipeline.driver import heal_part, run_part
from laion_operator.pipeline.heal import NotHealable
from laion_operator.spec import PartSpec
from tests.support.exactly_once import check_exactly_once
from tests.support.procs import kill_tree
from tests.support.specs import mixed_metadata, partspec

SLOW = 2  # seconds the "timeout" images take: they time out at 1 s and come at 5 s


def spec(source, output, timeout: float, heal: dict | None = None, fmt: str = "webdataset") -> PartSpec:
    download = {"imageSize": 64, "timeout": timeout, "maxInFlight": 8, "parallelism": 2, "outputFormat": fmt}
    # no heal block unless asked: a spec without one is the first run's
    extra = {} if heal is None else {"heal": heal}
    return partspec("h", source, output, download=download, **extra)


@pytest.fixture(scope="module")
def metadata(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("heal") / "part.parquet"
    return mixed_metadata(path, 50, image_server, seed=51, slow_seconds=SLOW, ok=0.5, timeout=0.3, http_4xx=0.2)


@pytest.fixture
def finished_part(ray_driver, metadata, tmp_path):
    """A part whose slow images timed out (a 1 s timeout): the transient failures a heal is for."""
    out = tmp_path / "out"
    first = run_part(spec(metadata, out, timeout=1))
    assert first["images"]["failedByReason"].get("timeout", 0) > 0
    return out, first


def stats_of(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in out.glob("*_stats.json")}


def test_heal_refetches_only_transient_failures_exactly_once(finished_part, metadata):
    out, first = finished_part
    before = stats_of(out)
    timeouts = first["images"]["failedByReason"]["timeout"]
    clean = {name for name in before if "timeout" not in json.loads(before[name])["failed_by_reason"]}
    summary = heal_part(spec(metadata, out, timeout=5))  # the network is better now
    assert summary["images"]["ok"] == first["images"]["ok"] + timeouts
    assert "timeout" not in summary["images"]["failedByReason"]
    assert summary["images"]["failedByReason"]["http_4xx"] == first["images"]["failedByReason"]["http_4xx"]
    assert summary["heal"]["refetched"] == timeouts
    after = stats_of(out)
    assert {n: after[n] for n in clean} == {n: before[n] for n in clean}  # shards with nothing to heal untouched
    assert not (out / "_laion" / "heal").exists() or not list((out / "_laion" / "heal").iterdir())
    check_exactly_once(out)

    assert heal_part(spec(metadata, out, timeout=5, heal={})) is None  # the same heal is done once
    healed_again = heal_part(spec(metadata, out, timeout=5, heal={"round": 1}))  # unless asked again
    assert healed_again["heal"]["refetched"] == 0  # nothing transient left
    check_exactly_once(out)


@pytest.mark.parametrize("fmt", ["files", "parquet", "tfrecord", "mds"])
def test_heal_rewrites_every_output_format(ray_driver, metadata, tmp_path, fmt):
    """The samples kept are read back from the format's shards and written again; verify reads the result."""
    from laion_operator.pipeline.verify import verify
    from laion_operator.storage import Store

    out = tmp_path / fmt
    first = run_part(spec(metadata, out, timeout=1, fmt=fmt))
    timeouts = first["images"]["failedByReason"]["timeout"]
    healed = spec(metadata, out, timeout=5, fmt=fmt)
    summary = heal_part(healed)
    assert summary["images"]["ok"] == first["images"]["ok"] + timeouts
    assert summary["heal"]["refetched"] == timeouts and "timeout" not in summary["images"]["failedByReason"]
    check_exactly_once(out)
    result = verify(Store(healed.output), "h", fmt)
    assert result.ok and result.samples == result.images_decoded == summary["images"]["ok"], result.problems


def test_heal_refuses_an_unfinished_part_naming_the_file(finished_part, metadata):
    out, _ = finished_part
    (out / "00002_stats.json").unlink()
    with pytest.raises(NotHealable, match=r"00002_stats\.json is missing"):
        heal_part(spec(metadata, out, timeout=5))


def _heal_cli(spec_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "laion-operator"), "heal", str(spec_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_interrupted_heal_resumes_exactly_once(finished_part, metadata, tmp_path):
    out, first = finished_part
    healed = spec(metadata, out, timeout=5)
    spec_file = tmp_path / "part.yaml"
    spec_file.write_text(yaml.safe_dump(healed.to_dict()))
    plan = out / "_laion" / "heal.json"
    run = _heal_cli(spec_file)
    deadline = time.monotonic() + 120
    # Killed once the first shard is rewritten and the next one is under way.
    while not (plan.exists() and json.loads(plan.read_text())["done"]):
        assert run.poll() is None, run.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    kill_tree(run.pid)  # and its local Ray's daemons, which a group kill leaves behind
    run.wait()
    state = json.loads(plan.read_text())
    assert not state["finished"] and len(state["done"]) < len(state["shards"])

    again = _heal_cli(spec_file)
    output = again.communicate(timeout=300)[0].decode()
    assert again.returncode == 0, output
    assert "samples fetched again" in output
    summary = check_exactly_once(out)
    assert summary["images"]["ok"] == first["images"]["ok"] + first["images"]["failedByReason"]["timeout"]
    assert "timeout" not in summary["images"]["failedByReason"]


def test_a_part_with_heal_set_heals_as_its_last_stage(finished_part, metadata):
    """spec.heal on a finished part (a LaionPart's heal job): run_part resumes it, then heals through
    the same shard pool, and its progress ends Succeeded with the heal's counts."""
    out, first = finished_part
    timeouts = first["images"]["failedByReason"]["timeout"]
    summary = run_part(spec(metadata, out, timeout=5, heal={}))
    assert summary["heal"]["refetched"] == timeouts
    assert summary["images"]["ok"] == first["images"]["ok"] + timeouts
    progress = json.loads((out / "_laion" / "progress.json").read_text())
    assert progress["phase"] == "Succeeded" and progress["message"].startswith("healed ")
    assert progress["images_ok"] == summary["images"]["ok"] and progress["shards_done"] == progress["shards_total"]
    assert progress["finished_at"] is not None
    assert json.loads((out / "_laion" / "heal.json").read_text())["finished"]
    check_exactly_once(out)
    again = run_part(spec(metadata, out, timeout=5, heal={}))  # the same heal is done once
    assert "heal" not in again
