"""A small TLS proxy in front of the real API server, for the faults a real server does not make on
demand: an answer of 500 (or any status), a connection that hangs, watch streams cut, or a watch
whose resourceVersion has expired (410 Gone). Everything else passes through unchanged, bearer
tokens included, so the client behind it keeps its own identity and RBAC."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import ssl
import threading
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.services import free_port

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade", "content-encoding"}


@dataclasses.dataclass
class Rule:
    method: str
    path: re.Pattern
    times: int
    status: int | None = None  # answer this status
    hang: bool = False  # never answer (until the proxy stops or the rule is cleared)
    expire: bool = False  # a watch: answer with an ERROR event of 410 Gone, as for a compacted revision
    hits: int = 0

    def matches(self, method: str, path: str, watch: bool) -> bool:
        if self.times <= 0 or (self.expire and not watch):
            return False
        return self.method in ("*", method) and bool(self.path.search(path))


class FaultProxy:
    __test__ = False

    def __init__(self, cluster):
        self.cluster = cluster
        self.port = free_port()
        # On the API server's own address: its serving certificate, which the proxy presents, names it.
        self.url = f"https://{cluster.address}:{self.port}"
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str]] = []
        self._watches: set[asyncio.Task] = set()
        self._hung: set[asyncio.Future] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    # ----- what tests call -----

    def fail(self, method: str, path: str, status: int = 500, times: int = 1) -> Rule:
        """The next `times` requests matching `method` and the `path` regex get `status`."""
        return self._add(Rule(method.upper(), re.compile(path), times, status=status))

    def hang(self, method: str, path: str, times: int = 1) -> Rule:
        """The next `times` matching requests are held open with no answer at all."""
        return self._add(Rule(method.upper(), re.compile(path), times, hang=True))

    def expire(self, path: str, times: int = 1) -> Rule:
        """The next `times` matching watches get 410 Gone, as after etcd compacted their revision."""
        return self._add(Rule("GET", re.compile(path), times, expire=True))

    def clear(self) -> None:
        """Forget every rule and let every hung request go (its client sees the connection close)."""

        def go():
            self.rules.clear()
            for fut in list(self._hung):
                if not fut.done():
                    fut.set_result(None)

        self._loop.call_soon_threadsafe(go)

    def drop_streams(self) -> None:
        """Cut every open watch stream, as a restarting API server or a load balancer would."""
        self._loop.call_soon_threadsafe(lambda: [t.cancel() for t in list(self._watches)])

    def kubeconfig_env(self, env: dict[str, str]) -> dict[str, str]:
        """The same credentials as `env`'s KUBECONFIG, through this proxy."""
        from pathlib import Path

        import yaml

        path = Path(env["KUBECONFIG"])
        config = yaml.safe_load(path.read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = self.url
        proxied = path.with_name(path.stem + "-proxied.kubeconfig")
        proxied.write_text(yaml.safe_dump(config))
        return {**env, "KUBECONFIG": str(proxied)}

    def _add(self, rule: Rule) -> Rule:
        self._loop.call_soon_threadsafe(self.rules.append, rule)
        return rule

    # ----- lifecycle -----

    def __enter__(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the fault proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop and self._stop:
            self.clear()
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=20)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        certs = self.cluster.workdir / "certs"
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ssl.load_cert_chain(certs / "apiserver.crt", certs / "apiserver.key")
        upstream_ssl = ssl.create_default_context(cafile=str(self.cluster.ca_file))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=upstream_ssl), timeout=timeout, auto_decompress=False
        ) as session:
            self._session = session
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, self.cluster.address, self.port, ssl_context=server_ssl)
            await site.start()
            self._ready.set()
            await self._stop.wait()
            for task in list(self._watches):
                task.cancel()
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        watch = request.query.get("watch") in ("true", "1")
        self.seen.append((request.method, request.path_qs))
        rule = next((r for r in self.rules if r.matches(request.method, request.path, watch)), None)
        if rule:
            rule.times -= 1
            rule.hits += 1
            if rule.hang:
                fut = asyncio.get_running_loop().create_future()
                self._hung.add(fut)
                try:
                    await fut
                finally:
                    self._hung.discard(fut)
                raise ConnectionResetError("the fault proxy lets a hung request go")
            if rule.expire:
                resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
                await resp.prepare(request)
                gone = {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": "too old resource version",
                        "reason": "Expired",
                        "code": 410,
                    },
                }
                await resp.write(json.dumps(gone).encode() + b"\n")
                return resp
            body = {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"the fault proxy answers {rule.status}",
                "code": rule.status,
            }
            return web.json_response(body, status=rule.status)
        return await self._forward(request, watch)

    async def _forward(self, request: web.Request, watch: bool) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        data = await request.read()
        task = asyncio.current_task()
        if watch:
            self._watches.add(task)
        try:
            async with self._session.request(
                request.method,
                self.cluster.url + request.path_qs,
                headers=headers,
                data=data or None,
                allow_redirects=False,
            ) as upstream:
                resp = web.StreamResponse(
                    status=upstream.status,
                    headers={
                        k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS - {"content-encoding"}
                    },
                )
                await resp.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except asyncio.CancelledError:
            # A cut stream: the client sees its connection end without the chunked terminator.
            if request.transport:
                request.transport.close()
            raise
        finally:
            self._watches.discard(task)


def rule_summary(proxy: FaultProxy) -> list[dict[str, Any]]:
    return [{"method": r.method, "path": r.path.pattern, "hits": r.hits} for r in proxy.rules]
