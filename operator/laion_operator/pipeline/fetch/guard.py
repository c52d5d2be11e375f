"""The address guard and the resolver it sits behind: a download connects only to public addresses,
or to those `download.allowedNetworks` opens, checked after DNS on every hop (aiohttp's `resolver=`
hook), so the address connected to is the one that was checked."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from .errors import BlockedAddress

DNS_FAILURE_TTL = 30.0  # seconds a failed lookup is remembered (a success: for the whole task)

# Never connected to unless allowedNetworks opens them: this host, the local networks, cloud
# metadata (169.254.169.254), carrier-grade NAT, documentation, benchmarking, multicast, reserved.
BLOCKED_NETWORKS = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "255.255.255.255/32",
        "::/96",
        "::1/128",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for: IPv4-mapped, 6to4 or NAT64."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class AddressGuard:
    """Which IP addresses a download may connect to: public ones, and those in `allowed`."""

    def __init__(self, allowed: Iterable[str] = ()):
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed]

    def allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        forms = [ip]
        if ip.version == 6:
            inner = _embedded_ipv4(ip)
            if inner is not None:
                forms.append(inner)
        if any(f.version == n.version and f in n for f in forms for n in self.allowed):
            return True
        return not any(_blocked(f) for f in forms)


def _blocked(ip) -> bool:
    if any(ip.version == n.version and ip in n for n in BLOCKED_NETWORKS):
        return True
    if ip.version == 6 and _embedded_ipv4(ip) is not None:
        return _blocked(_embedded_ipv4(ip))
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class GuardedResolver(AbstractResolver):
    """DNS for one task: every answer cached (failures for DNS_FAILURE_TTL), and only addresses the
    guard allows handed to the connector, so the address connected to is one that was checked."""

    def __init__(self, inner: AbstractResolver, guard: AddressGuard):
        self.inner = inner
        self.guard = guard
        self._cache: dict[tuple, asyncio.Future] = {}
        self._failed_at: dict[tuple, float] = {}
        self.lookups = 0  # lookups that went to the resolver (the rest came from the cache)

    def _lookup(self, host: str, family: socket.AddressFamily) -> asyncio.Future:
        key = (host, family)
        loop = asyncio.get_running_loop()
        future = self._cache.get(key)
        if future is None or (key in self._failed_at and loop.time() - self._failed_at[key] > DNS_FAILURE_TTL):
            self.lookups += 1
            self._failed_at.pop(key, None)
            future = self._cache[key] = asyncio.ensure_future(self.inner.resolve(host, 0, family))

            def finished(f: asyncio.Future) -> None:
                if f.cancelled() or f.exception() is not None:  # (retrieving it keeps asyncio from logging it)
                    self._failed_at[key] = loop.time()

            future.add_done_callback(finished)
        return future

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            infos: list[ResolveResult] = await asyncio.shield(self._lookup(host, family))
        except OSError as err:  # a fresh error each time: aiohttp wraps it as ClientConnectorDNSError
            raise socket.gaierror(err.errno, err.strerror or str(err)) from None
        allowed: list[ResolveResult] = [{**i, "port": port} for i in infos if self.guard.allows(i["host"])]
        if not allowed:
            shown = ", ".join(sorted({i["host"] for i in infos})[:3])
            raise BlockedAddress(f"{host} resolves to {shown}: not a public address (download.allowedNetworks)")
        return allowed

    async def close(self) -> None:
        await self.inner.close()


def make_resolver(dns_servers: Iterable[str], guard: AddressGuard) -> GuardedResolver:
    servers = list(dns_servers)
    if servers:
        inner: AbstractResolver = aiohttp.AsyncResolver(nameservers=servers)  # c-ares, through aiodns
    else:
        inner = aiohttp.ThreadedResolver()  # the system's resolver (getaddrinfo)
    return GuardedResolver(inner, guard)
