"""A DNS server on loopback, small enough to read: A records by a function, NXDOMAIN otherwise, and a
delay before every answer, so that a client's system resolver (glibc, through resolv.conf) pays a
lookup the way it does on a real network. UDP only, one question a query, no recursion, no caching:
every query is answered from the function, after its delay.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from collections.abc import Callable

A, AAAA = 1, 28
NOERROR, FORMERR, NXDOMAIN = 0, 1, 3


def parse_query(data: bytes) -> tuple[int, int, str, int, bytes]:
    """(id, flags, name, qtype, the question section as sent) of a query; ValueError if malformed."""
    if len(data) < 12:
        raise ValueError("short header")
    ident, flags, qdcount = struct.unpack("!HHH", data[:6])
    if qdcount != 1:
        raise ValueError("one question a query")
    labels, i = [], 12
    while True:
        n = data[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0:
            raise ValueError("compressed question")
        labels.append(data[i + 1 : i + 1 + n].decode("ascii"))
        i += 1 + n
    qtype, _qclass = struct.unpack("!HH", data[i : i + 4])
    return ident, flags, ".".join(labels).lower(), qtype, data[12 : i + 4]


def answer(ident: int, flags: int, question: bytes, rcode: int, address: str | None = None) -> bytes:
    """A response to one question: an A record for `address`, or no record with `rcode`."""
    # QR (a response), the query's opcode and RD copied, RA set: as a recursive resolver answers.
    out_flags = 0x8000 | (flags & 0x7900) | 0x0080 | rcode
    head = struct.pack("!HHHHHH", ident, out_flags, 1, 1 if address else 0, 0, 0)
    if not address:
        return head + question
    record = struct.pack("!HHHIH", 0xC00C, A, 1, 60, 4) + socket.inet_aton(address)
    return head + question + record


class DnsServer(asyncio.DatagramProtocol):
    """Answers `resolve(name)` (an IPv4 address, or None: NXDOMAIN) after `delay(name)` seconds.
    A name that resolves has no AAAA record (NOERROR, no answer), as most image hosts of LAION."""

    def __init__(self, resolve: Callable[[str], str | None], delay: Callable[[str], float]):
        self.resolve = resolve
        self.delay = delay
        self.queries: Counter = Counter()  # by outcome: a, nodata, nxdomain, bad
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            ident, flags, name, qtype, question = parse_query(data)
        except (ValueError, IndexError, UnicodeDecodeError, struct.error):
            self.queries["bad"] += 1
            if len(data) >= 2:
                self.transport.sendto(struct.pack("!HHHHHH", data[0] << 8 | data[1], 0x8001, 0, 0, 0, 0), addr)
            return
        address = self.resolve(name)
        if address is None:
            reply, outcome = answer(ident, flags, question, NXDOMAIN), "nxdomain"
        elif qtype == A:
            reply, outcome = answer(ident, flags, question, NOERROR, address), "a"
        else:
            reply, outcome = answer(ident, flags, question, NOERROR), "nodata"
        self.queries[outcome] += 1
        asyncio.get_running_loop().call_later(max(self.delay(name), 0.0), self._send, reply, addr)

    def _send(self, reply: bytes, addr) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


async def serve(host: str, port: int, resolve, delay) -> tuple[asyncio.DatagramTransport, DnsServer]:
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(lambda: DnsServer(resolve, delay), local_addr=(host, port))
