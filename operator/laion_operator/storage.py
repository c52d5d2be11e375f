"""Where a part's files live: a local folder or an S3-compatible bucket, behind one fsspec interface.

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a Secret mounted
into the Ray job) or a named profile, never from the spec. img2dataset's writers open their files
through fsspec by URL, so the S3 options are registered process-wide in fsspec's config.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import fsspec

from . import credentials
from .contract import META_DIR
from .errors import InputError
from .spec import Output

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(InputError):
    """The output cannot be written (refused, not missing): a retry cannot help."""


class StorageUnavailable(RuntimeError):
    """The output's storage did not answer for output.retrySeconds; the message names the endpoint.
    A job ends with ExitCode.STORAGE_UNAVAILABLE, and the next attempt resumes from the finished shards."""


# Names of the exceptions that mean "nobody answered", whichever client raised them (s3fs wraps
# botocore's and aiohttp's; local files raise the builtins): matched by name so that neither is imported.
_UNREACHABLE_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ServerTimeoutError",
    "FSTimeoutError",
    "HTTPClientError",
    "ResponseStreamingError",
    "IncompleteReadError",
}


def unreachable(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the storage did not answer."""
    seen = set()
    err: BaseException | None = error
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, socket.timeout, TimeoutError)):
            return True
        if any(cls.__name__ in _UNREACHABLE_NAMES for cls in type(err).__mro__):
            return True
        err = err.__cause__ or err.__context__
    return False


def endpoint_of(output: Output) -> str:
    if not output.uri.startswith("s3://"):
        return output.uri
    return output.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def retrying(
    output: Output,
    what: str,
    fn: Callable[[], T],
    budget: float | None = None,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """`fn()`, called again with backoff while the storage does not answer, for up to `budget` seconds
    (output.retrySeconds); after that StorageUnavailable naming the endpoint. Other errors pass through.
    `fn` must be safe to call again (a whole shard is: it removes what an earlier try left)."""
    budget = output.retry_seconds if budget is None else budget
    budget = 300.0 if budget is None else float(budget)
    deadline = time.monotonic() + budget
    delay = 0.5
    while True:
        try:
            return fn()
        except Exception as err:  # classified right below
            if not unreachable(err):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageUnavailable(
                    f"the output's storage at {endpoint_of(output)} did not answer for {budget:g} s "
                    f"(output.retrySeconds) while {what}: {type(err).__name__}: {err}"
                ) from err
            log.warning(
                "storage at %s did not answer while %s (%s); retrying for %.0f s more",
                endpoint_of(output),
                what,
                type(err).__name__,
                left,
            )
            time.sleep(min(delay, max(left, 0.1)))
            delay = min(delay * 2, 10.0)
            if on_retry:
                on_retry()


def s3_options(output: Output, secret: dict[str, str] | None = None) -> dict:
    """s3fs options for the output; `secret` holds explicit credentials (the operator's, from a Secret)."""
    secret = secret or {}
    client_kwargs: dict = {}
    config_kwargs: dict = {}
    endpoint = (
        output.endpoint
        or secret.get("AWS_ENDPOINT_URL")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if output.region:
        client_kwargs["region_name"] = output.region
    if output.path_style:
        config_kwargs["s3"] = {"addressing_style": "path"}
    opts: dict = {"client_kwargs": client_kwargs, "config_kwargs": config_kwargs}
    if secret.get("AWS_ACCESS_KEY_ID"):
        opts.update(
            key=secret["AWS_ACCESS_KEY_ID"],
            secret=secret.get("AWS_SECRET_ACCESS_KEY"),
            token=secret.get("AWS_SESSION_TOKEN"),
        )
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
        self._options = options
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

    def retrying(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()` retried while the storage does not answer (see `retrying`)."""
        return retrying(self.output, what, fn, on_retry=self.reconnect)

    def reconnect(self) -> None:
        """A new client after an outage: the old one may hold connections to a server that went away."""
        if self.uri.startswith("s3://"):
            fsspec.get_filesystem_class("s3").clear_instance_cache()
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self._options)

    def check_writable(self) -> None:
        """Fail before any download starts when the output cannot take files."""
        probe = self.path(META_DIR, f".write-probe-{uuid.uuid4().hex[:8]}")

        def probe_once():
            try:
                self.fs.makedirs(self.path(META_DIR), exist_ok=True)
                self.fs.pipe(probe, b"ok")
                self.fs.rm(probe)
            except Exception as err:  # any backend error means the same to the user
                if unreachable(err):
                    raise
                raise StorageError(f"output {self.uri} is not writable: {type(err).__name__}: {err}") from err

        self.retrying(f"checking that {self.uri} takes files", probe_once)
