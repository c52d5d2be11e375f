"""Part specs for tests that download from the loopback image server: one builder for the spec a
part runs with, as a LaionPart manifest (what `kubectl apply` takes) and as a PartSpec (what the
pipeline takes). Each test module keeps only its own values (shard size, download options)."""

from __future__ import annotations

from pathlib import Path

from laion_operator.spec import PartSpec
from laion_operator.testbed.demo_data import write_metadata

GROUP, VERSION = "laion-operator.io", "v1alpha1"

# What the operator tests' parts download with: small images, and few requests at once on the shared
# cores of the test machine.
OPERATOR_DOWNLOAD = {"imageSize": 64, "timeout": 5, "maxInFlight": 4}


def loopback(download: dict) -> dict:
    """download options that let a part fetch from the loopback test bed (the downloader refuses
    loopback addresses unless download.allowedNetworks allows them)."""
    return {"allowedNetworks": ["127.0.0.0/8"], **download}


def spec_dict(part_id: str, source, output, samples_per_shard: int = 10, download: dict | None = None, **spec) -> dict:
    """A part's spec as a dict (a LaionPart's .spec): one source file, the output a folder (a path)
    or a whole output block (a dict), download options allowed the loopback test bed. `filter` is
    merged over samplesPerShard; other fields are set as given."""
    return {
        "partId": part_id,
        "source": {"urls": [str(source)]},
        "output": output if isinstance(output, dict) else {"uri": str(output)},
        "filter": {"samplesPerShard": samples_per_shard, **spec.pop("filter", {})},
        "download": loopback(download or {}),
        **spec,
    }


def partspec(
    part_id: str, source, output, samples_per_shard: int = 10, download: dict | None = None, **spec
) -> PartSpec:
    """spec_dict as the pipeline takes it."""
    return PartSpec.from_dict(spec_dict(part_id, source, output, samples_per_shard, download, **spec))


def laionpart(name: str, source, output, samples_per_shard: int = 10, download: dict | None = None, **spec) -> dict:
    """A LaionPart named `name` (its partId too, unless `partId` is given), downloading with
    OPERATOR_DOWNLOAD and `download` merged over it."""
    part_id = spec.pop("partId", name)
    download = {**OPERATOR_DOWNLOAD, **(download or {})}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LaionPart",
        "metadata": {"name": name},
        "spec": spec_dict(part_id, source, output, samples_per_shard, download, **spec),
    }


def part_dict(source, output, part_id: str = "7", samples_per_shard: int = 20, **download) -> dict:
    """The verify and MDS tests' part: small images, kept in ratio, a short timeout."""
    download = {"imageSize": 64, "resizeMode": "keep_ratio", "timeout": 2, "maxInFlight": 8, **download}
    return spec_dict(part_id, source, output, samples_per_shard, download)


def mixed_metadata(path: Path, rows: int, server, seed: int, slow_seconds: float, **mix: float) -> Path:
    """A metadata file at `path` of `rows` images on the loopback image `server`, by outcome shares
    (`ok`, `timeout`, `http_4xx`): the slow ones answer after `slow_seconds`, so that shards run long
    enough to be hit mid-way, or time out at a shorter download.timeout."""
    write_metadata(path, rows, server.base_url, seed=seed, slow_seconds=slow_seconds, failure_mix=mix)
    return path
