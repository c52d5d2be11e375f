"""Object-storage credentials on their way to Ray workers, kept out of specs, entrypoints and logs.

A Ray job's `working_dir` is copied to every worker that runs for the job, and its content is not
shown by the Jobs API or the dashboard (only a content hash is). The submitter (the CLI against a
remote cluster, or the operator with a Secret's values) puts a credentials file there; drivers and
workers load it into their environment, where boto3 and s3fs look for credentials.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

FILE = "laion-credentials.json"
KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "HF_TOKEN",
)  # the Hugging Face hub's token, for a gated model (spec.latents.hubTokenSecret)


def from_environment() -> dict[str, str]:
    return {k: os.environ[k] for k in KEYS if os.environ.get(k)}


def working_dir(credentials: dict[str, str]) -> str:
    """A private folder holding only the credentials file, to ship as the job's working_dir."""
    folder = tempfile.mkdtemp(prefix="laion-job-")
    path = Path(folder) / FILE
    path.touch(mode=0o600)
    path.write_text(json.dumps({k: v for k, v in credentials.items() if k in KEYS}))
    return folder


def package(credentials: dict[str, str]) -> bytes:
    """The same folder as a zip in memory, as Ray stores a working_dir (the operator uploads it)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo(FILE, date_time=(1980, 1, 1, 0, 0, 0))  # same bytes for the same values
        info.external_attr = 0o600 << 16
        zf.writestr(info, json.dumps({k: v for k, v in credentials.items() if k in KEYS}, sort_keys=True))
    return buf.getvalue()


def load_into_environment(folder: str | Path = ".") -> bool:
    """Adopt the shipped credentials unless the environment already has its own."""
    path = Path(folder) / FILE
    if not path.is_file():
        return False
    for key, value in json.loads(path.read_text()).items():
        if key in KEYS:
            os.environ.setdefault(key, value)
    return True
