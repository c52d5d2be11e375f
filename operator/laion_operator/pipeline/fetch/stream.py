"""One large file over http(s) as a blocking stream (an archive, an annotations file), for readers that
take a file object (tarfile's "r|*", a spool to disk): the same address guard, deadlines, size cap,
redirect limit and failure reasons as an image fetch, and a connection lost mid-body resumed by a
range request where the server allows one, so an archive half read is not read again from its start.

`download.timeout` bounds connecting, the headers and every read (a body of gigabytes has no whole
deadline), and the body must keep `download.minBodyRate` over every `timeout` seconds spent waiting on
the server (pace.Pace, as an image's body; the time the reader spends between reads is not counted, so
a slow consumer is not the server's fault); `download.retries` is how many times a lost connection is
resumed. A 403 whose body says
the signature expired (S3's and CloudFront's "Request has expired", "AccessDenied ... expired") is
`expired`, not `http_4xx`: a fresh link is what fixes it. Names are resolved as an image fetch resolves
them (`download.dnsServers`, else the system's resolver), the address connected to is the one the guard
checked, and the User-Agent is the image fetches' (`download.userAgent`, `userAgentToken`).
"""

from __future__ import annotations

import asyncio
import http.client
import io
import socket
import ssl
import time
from urllib.parse import urljoin, urlsplit

from ...spec import Download
from .engine import REDIRECTS, SCHEMES, user_agent
from .errors import FINAL, BlockedAddress, FetchError, classify
from .guard import AddressGuard, make_resolver
from .pace import Pace

ERROR_BODY_BYTES = 4096  # of a refusal's body, read to tell an expired signature from other 403s


def shown(url: str) -> str:
    """The URL without its query and credentials (a signed link's signature is a credential)."""
    if "://" not in url:
        return url  # a local path
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


class _Pinned(http.client.HTTPConnection):
    """A connection to `address`, the one the guard checked, whatever `host` resolves to later."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedTLS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address
        self.context = context

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.context.wrap_socket(sock, server_hostname=self.host)


class Stream(io.RawIOBase):
    """The body of `url`, read once from start to end; raises FetchError with its reason."""

    def __init__(self, url: str, opts: Download, limit: int, headers: dict[str, str] | None = None):
        self.url, self.opts, self.limit = url, opts, limit
        self.secret = dict(headers or {})
        self.guard = AddressGuard(opts.allowed_networks or ())
        self.position = 0
        self.size: int | None = None  # the whole body's, when the server said
        self.resumes = 0  # range requests after a lost connection
        self._response: http.client.HTTPResponse | None = None
        self._connection: http.client.HTTPConnection | None = None
        self.waited = 0.0  # seconds spent in the server's reads: the pace's clock
        self.pace = Pace(opts.min_body_rate, float(opts.timeout), 0.0)
        # A read asks for a quarter of a window's due at most, so a drip is caught within the window.
        self.step = max(int(self.pace.need / 4), 4096)
        self._open()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            try:
                response = self._response
                if response is None:
                    return 0
                started = time.monotonic()
                n = response.readinto(view[: self.step])
                self.waited += time.monotonic() - started
                if n == 0 and self.size is not None and self.position < self.size:
                    raise http.client.IncompleteRead(b"", self.size - self.position)
            except (OSError, http.client.HTTPException) as err:
                self._resume(err)
                continue
            self.pace.add(self.waited, n)
            if n and self.waited > self.pace.deadline:
                raise FetchError(
                    "timeout",
                    f"{shown(self.url)}: slower than download.minBodyRate ({self.opts.min_body_rate:g} bytes/s "
                    f"over {self.opts.timeout:g} s) at byte {self.position + n}",
                )
            self.position += n
            if self.position > self.limit:
                raise FetchError("too_large", f"{shown(self.url)}: more than {self.limit} bytes")
            return n

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._response = None
        super().close()

    def _resume(self, err: BaseException) -> None:
        """Go on from `position` after a lost connection, by range, within `download.retries`."""
        if self.resumes >= self.opts.retries:
            raise FetchError(
                classify(err), f"{shown(self.url)}: lost at byte {self.position} after {self.resumes} resumes: {err}"
            ) from None
        self.resumes += 1
        time.sleep(min(2.0**self.resumes / 4, 8.0))
        self._open()

    def _open(self) -> None:
        """Request the body from `position`, following redirects (each hop guarded)."""
        if self._connection is not None:
            self._connection.close()
        url, headers = self.url, dict(self.secret)
        origin = urlsplit(url).netloc
        for _hop in range(self.opts.max_redirects + 1):
            connection, response = self._request(url, headers)
            if response.status in REDIRECTS and response.getheader("Location"):
                connection.close()
                url = urljoin(url, response.getheader("Location") or "")
                if urlsplit(url).netloc != origin:
                    headers = {}  # a token for the repository is not the CDN's to see
                continue
            self._connection = connection
            try:
                self._accept(url, response)
            except FetchError:
                connection.close()
                raise
            return
        raise FetchError("redirect", f"{shown(self.url)}: more than {self.opts.max_redirects} redirects")

    def _accept(self, url: str, response: http.client.HTTPResponse) -> None:
        status = response.status
        if status >= 400:
            body = response.read(ERROR_BODY_BYTES).decode("utf-8", "replace")
            what = f"{shown(self.url)} answered {status} {response.reason}"
            if status == 403 and "expired" in body.lower():
                raise FetchError("expired", f"{what}: the signed link has expired ({body.strip()[:120]})")
            raise FetchError("http_4xx" if status < 500 else "http_5xx", f"{what}: {body.strip()[:120]}")
        length = response.getheader("Content-Length")
        if self.position and status != 206:
            raise FetchError(
                "connection",
                f"{shown(self.url)}: lost at byte {self.position}, and the server "
                "does not resume by range (it answered 200 to a range request)",
            )
        if length is not None and length.isdigit():
            self.size = self.position + int(length)
            if self.size > self.limit:
                raise FetchError("too_large", f"{shown(self.url)}: {self.size} bytes, more than {self.limit}")
        self._response = response

    def _request(
        self, url: str, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise FetchError("bad_url", f"not an http(s) URL: {shown(url)}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        timeout = float(self.opts.timeout)
        address = self._address(parts.hostname, port)
        if parts.scheme == "https":
            context = ssl.create_default_context()
            if not self.opts.verify_tls:
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            connection: http.client.HTTPConnection = _PinnedTLS(parts.hostname, port, address, timeout, context)
        else:
            connection = _Pinned(parts.hostname, port, address, timeout)
        sent = {"User-Agent": user_agent(self.opts), "Accept-Encoding": "identity", **headers}
        if self.position:
            sent["Range"] = f"bytes={self.position}-"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            connection.request("GET", path, headers=sent)
            return connection, connection.getresponse()
        except (OSError, http.client.HTTPException) as err:
            connection.close()
            reason = classify(err)
            if reason in FINAL:
                raise FetchError(reason, f"{shown(url)}: {err}") from None
            raise FetchError(reason, f"{shown(url)}: {reason}: {err}") from None

    def _address(self, host: str, port: int) -> str:
        """An address of `host` the guard allows (`blocked_address` when it allows none)."""
        if self.opts.dns_servers:
            return self._asked(host, port)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            raise FetchError("dns", f"{host}: {err}") from None
        addresses = [str(info[4][0]) for info in infos]
        allowed = [a for a in addresses if self.guard.allows(a)]
        if not allowed:
            raise FetchError(
                "blocked_address",
                f"{host} resolves to {', '.join(sorted(set(addresses))[:3])}: not a public address "
                "(download.allowedNetworks)",
            )
        return allowed[0]

    def _asked(self, host: str, port: int) -> str:
        """`host` resolved by download.dnsServers through the image fetches' own guarded resolver (this
        blocking stream runs outside any event loop: one of its own, for the lookup)."""

        async def lookup() -> list:
            resolver = make_resolver(self.opts.dns_servers, self.guard)
            try:
                return await resolver.resolve(host, port)
            finally:
                await resolver.close()

        try:
            return str(asyncio.run(lookup())[0]["host"])
        except BlockedAddress as err:
            raise FetchError("blocked_address", str(err)) from None
        except OSError as err:
            raise FetchError("dns", f"{host}: {err} (download.dnsServers)") from None
