"""The README's first command: a LAION-like part, its images served on loopback, run end to end."""

from __future__ import annotations

from pathlib import Path

import yaml

from .. import spec as specs
from ..pipeline.local import run_with_progress
from .demo_data import write_metadata
from .fakeweb import ImageServer


def demo_spec(metadata: Path, output: Path) -> dict:
    """The seeds' aesthetics filter on one generated part, into a local webdataset."""
    return {
        "partId": "0",
        "source": {"urls": [str(metadata)]},
        "filter": {
            "minWidth": 512,
            "minHeight": 512,
            "maxPunsafe": 0.98,
            "minAesthetic": 4.5,
            "samplesPerShard": 250,
            "seed": 0,
        },
        "download": {
            "imageSize": 256,
            "resizeMode": "keep_ratio",
            "outputFormat": "webdataset",
            "timeout": 2,
            # Every image comes from one loopback server here: the address guard must let it
            # through, and it stands for many hosts, so more than one host's share of connections.
            "allowedNetworks": ["127.0.0.0/8"],
            "maxPerHost": 16,
        },
        "output": {"uri": str(output)},
    }


def run_demo(out: Path, rows: int = 2000) -> int:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with ImageServer() as server:
        metadata = out / "2B-en-4.5_0.parquet"
        write_metadata(metadata, rows, server.base_url, variant="aesthetics", seed=0, return_table=False)
        spec_data = demo_spec(metadata, out / "dataset")
        (out / "part.yaml").write_text(yaml.safe_dump(spec_data, sort_keys=False))
        print(f"demo: {rows:,} metadata rows in {metadata}, images served from {server.base_url}")
        print(f"demo: part spec in {out / 'part.yaml'}; starting a local Ray")
        return run_with_progress(specs.PartSpec.from_dict(spec_data))
