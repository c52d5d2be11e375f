"""Where a part's files live: a local folder or an S3-compatible bucket, behind one fsspec interface.

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a Secret mounted
into the Ray job) or a named profile, never from the spec. img2dataset's writers open their files
through fsspec by URL, so the S3 options are registered process-wide in fsspec's config.
"""

from __future__ import annotations

import json
import os
import uuid

import fsspec

from . import credentials
from .contract import META_DIR, InputError
from .spec import Output


class StorageError(InputError):
    """The output cannot be reached or written."""


def s3_options(output: Output, secret: dict[str, str] | None = None) -> dict:
    """s3fs options for the output; `secret` holds explicit credentials (the operator's, from a Secret)."""
    secret = secret or {}
    client_kwargs: dict = {}
    config_kwargs: dict = {}
    endpoint = (output.endpoint or secret.get("AWS_ENDPOINT_URL")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if output.region:
        client_kwargs["region_name"] = output.region
    if output.path_style:
        config_kwargs["s3"] = {"addressing_style": "path"}
    opts: dict = {"client_kwargs": client_kwargs, "config_kwargs": config_kwargs}
    if secret.get("AWS_ACCESS_KEY_ID"):
        opts.update(key=secret["AWS_ACCESS_KEY_ID"], secret=secret.get("AWS_SECRET_ACCESS_KEY"),
                    token=secret.get("AWS_SESSION_TOKEN"))
    elif output.profile:
        opts["profile"] = output.profile
    return opts


def configure(output: Output) -> None:
    """Register the S3 options with fsspec, so that every s3:// open in this process uses them."""
    credentials.load_into_environment()
    if output.uri.startswith("s3://"):
        fsspec.config.conf["s3"] = s3_options(output)
        # The filesystem instance cache would otherwise keep a client built with older options.
        fsspec.get_filesystem_class("s3").clear_instance_cache()


class Store:
    """The output folder of one part."""

    def __init__(self, output: Output, secret: dict[str, str] | None = None):
        """`secret`: credentials for this store only, leaving the process's fsspec config alone."""
        if secret is None:
            configure(output)
        self.output = output
        self.uri = output.uri.rstrip("/")
        options = s3_options(output, secret) if self.uri.startswith("s3://") and secret is not None else {}
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **options)

    def url(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str) -> dict | None:
        try:
            with self.fs.open(self.path(*parts), "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def write_json(self, data: dict, *parts: str) -> None:
        self.write_text(json.dumps(data, indent=2, sort_keys=True), *parts)

    def write_text(self, text: str, *parts: str) -> None:
        path = self.path(*parts)
        if self.uri.startswith("s3://"):
            self.fs.pipe(path, text.encode())  # an S3 PUT is already atomic
            return
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "w") as f:
            f.write(text)
        self.fs.mv(tmp, path)  # readers never see half a file

    def check_writable(self) -> None:
        """Fail before any download starts when the output cannot take files."""
        probe = self.path(META_DIR, f".write-probe-{uuid.uuid4().hex[:8]}")
        try:
            self.fs.makedirs(self.path(META_DIR), exist_ok=True)
            self.fs.pipe(probe, b"ok")
            self.fs.rm(probe)
        except Exception as err:  # noqa: BLE001 - any backend error means the same to the user
            raise StorageError(f"output {self.uri} is not writable: {type(err).__name__}: {err}") from err
