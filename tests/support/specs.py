"""Part specs for tests that download from the loopback image server."""

from __future__ import annotations

from laion_operator import spec as specs


def loopback(download: dict) -> dict:
    """download options that let a part fetch from 127.0.0.1, where the spec knows such an option
    (the downloader refuses loopback unless download.allowedNetworks allows it)."""
    if "allowedNetworks" in specs.SCHEMA["properties"]["download"]["properties"]:
        return {"allowedNetworks": ["127.0.0.0/8"], **download}
    return dict(download)


def part_dict(source, output, part_id: str = "7", samples_per_shard: int = 20, **download) -> dict:
    return {
        "partId": part_id,
        "source": {"urls": [str(source)]},
        "filter": {"samplesPerShard": samples_per_shard},
        "download": loopback({"imageSize": 64, "resizeMode": "keep_ratio", "timeout": 2, "threadsPerTask": 8,
                              **download}),
        "output": output if isinstance(output, dict) else {"uri": str(output)},
    }
