"""Part specs for tests that download from the loopback image server."""

from __future__ import annotations


def loopback(download: dict) -> dict:
    """download options that let a part fetch from the loopback test bed (the downloader refuses
    loopback addresses unless download.allowedNetworks allows them)."""
    return {"allowedNetworks": ["127.0.0.0/8"], **download}


def part_dict(source, output, part_id: str = "7", samples_per_shard: int = 20, **download) -> dict:
    return {
        "partId": part_id,
        "source": {"urls": [str(source)]},
        "filter": {"samplesPerShard": samples_per_shard},
        "download": loopback({"imageSize": 64, "resizeMode": "keep_ratio", "timeout": 2, "maxInFlight": 8, **download}),
        "output": output if isinstance(output, dict) else {"uri": str(output)},
    }
