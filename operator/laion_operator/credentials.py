"""Object-storage credentials on their way to Ray workers, kept out of specs, entrypoints and logs.

A Ray job's `working_dir` is copied to every worker that runs for the job, and its content is not
shown by the Jobs API or the dashboard (only a content hash is). The submitter (the CLI against a
remote cluster, or the operator with a Secret's values) puts a credentials file there; drivers and
workers load it into their environment, where boto3 and s3fs look for credentials.

Each package names the one job it is for, so no two jobs share one: Ray unpacks a working_dir again,
over the same folder, whenever a new runtime env names its URI (`overwrite=True` in Ray's
working_dir plugin), and every worker of a job still running there would lose its current directory
and its credentials file. Two parts with one Secret, or two drivers with one set of credentials, hit
that as soon as the second starts.
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
    "HF_TOKEN",  # the Hugging Face hub's token, for a gated model (spec.latents.hubTokenSecret)
    "ARCHIVE_HEADERS",  # an archive source's HTTP headers, `Name: value` a line (source.archives.headersSecret)
)
ARCHIVE_HEADERS = "ARCHIVE_HEADERS"


def from_environment() -> dict[str, str]:
    return {k: os.environ[k] for k in KEYS if os.environ.get(k)}


def _content(credentials: dict[str, str], job: str) -> str:
    return json.dumps({"job": job, **{k: v for k, v in credentials.items() if k in KEYS}}, sort_keys=True)


def working_dir(credentials: dict[str, str], job: str) -> str:
    """A private folder holding only the credentials file, to ship as the working_dir of `job`."""
    folder = tempfile.mkdtemp(prefix="laion-job-")
    path = Path(folder) / FILE
    path.touch(mode=0o600)
    path.write_text(_content(credentials, job))
    return folder


def package(credentials: dict[str, str], job: str) -> bytes:
    """The same folder as a zip in memory, as Ray stores a working_dir (the operator uploads it)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo(FILE, date_time=(1980, 1, 1, 0, 0, 0))  # same bytes for the same job
        info.external_attr = 0o600 << 16
        zf.writestr(info, _content(credentials, job))
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
