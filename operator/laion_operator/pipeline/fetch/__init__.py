"""Fetching a shard's images: many URLs in flight on one event loop, each under a deadline, a size
cap, an address guard and per-host politeness.

A shard task runs one `Engine` (aiohttp) on one event loop through `run`: `maxInFlight` URLs at once,
keep-alive connections reused per host, at most `maxPerHost` URLs and connections to one host at a
time, counted across the Ray cluster's shard tasks (`budget`, `hostBudget: cluster`) or per task.
Every fetched body goes to a small pool of decode/resize threads, so that the CPU works while the
network waits. A fetch slot is free again as soon as its body is queued for those threads, so the
network runs ahead of the CPU: a URL that will only end at its deadline (a silent host, a drip-fed
body) starts early and waits alongside the decoding instead of after it, at a shard's end. The bodies
in memory are bounded: `maxInFlight` being read, of at most `maxImageBytes` each, and the queued ones
up to `spec.DECODE_BACKLOG_BYTES`.

What happens to one URL, and the failure reason (contract.FAILURE_REASONS) each step can give:
- only http and https URLs are fetched, with no I/O for anything else (`bad_url`);
- a host marked dead — several connections in a row refused or unanswered, none answered since —
  fails at once (`connection`), for the rest of the shard;
- with `respectRobotsTxt`, the host's robots.txt, fetched once per task under its own deadline
  (`opt_out`, rule robots_txt);
- attempts, 1 + `retries`: each is bounded to its response's headers — DNS, connect, TLS, redirects and
  headers — by `timeout` (`timeout`; `dns` if the deadline passes while resolving), and with its body
  by its pace (`pace`), counted from the attempt's start: `minBodyRate` × `timeout` bytes in every
  `timeout` seconds, and at most timeout + size / minBodyRate, size being its Content-Length or
  `maxImageBytes` (`timeout`). 429, and
  503 with a Retry-After, wait and try again for as long as the URL's budget ((retries + 1) × timeout)
  lasts, and this host's other URLs wait too, in every task of the cluster with its host budget, which
  also halves the host's limit (`rate_limited` once the URL's budget is spent);
- on every hop: the address connected to, after DNS, must be public unless `allowedNetworks` opens it
  (`blocked_address`); redirects are followed here, at most `maxRedirects` and never in a loop
  (`redirect`); `maxImageBytes` by Content-Length before reading and while reading, and the pixels the
  image's header declares against `maxImagePixels` (`too_large`);
- the opt-outs (`opt_out`, each with the rule that refused the image, contract.OPT_OUT_RULES):
  X-Robots-Tag's `disallowedHeaderDirectives` (x_robots_tag); with `respectTdmRep`, a
  `tdm-reservation: 1` header (tdm_reservation) and the host's /.well-known/tdmrep.json, fetched once
  per task beside the host's first image under `timeout` and 64 KiB (tdmrep_json).

So a URL holds its slot for at most, per attempt, timeout + size / minBodyRate, plus the rate limits'
waits within its budget; with robots.txt on, plus that file's deadline once per host,
and tdmrep.json's likewise (it runs beside the image, so only an image quicker than it waits for it).

By layer, as aiohttp splits its client:

    errors  FetchError and its reason; BlockedAddress; `classify`, an exception's failure reason
    guard   the address guard and the caching resolver it sits behind
    robots  X-Robots-Tag and robots.txt
    tdmrep  TDMRep: the tdm-reservation header and tdmrep.json's rules
    pace    how long a body may take (`Pace`, `body_limit`)
    budget  the host budget: per task, or shared by the Ray cluster's tasks (leases, AIMD on 429/503)
    engine  one URL: host state, attempts, redirects, the caps, the opt-outs (`Engine`)
    shard   a shard's URLs: the per-host scheduler, the decode backlog, `run`

The image headers the caps read are `pipeline.image_header`'s, which the resizer reads too.
"""

from .budget import ClusterBudget, cluster_budget
from .engine import Engine
from .errors import BlockedAddress, FetchError, classify
from .guard import AddressGuard
from .robots import robots_tag_disallows
from .shard import Handler, fetch_all, run

__all__ = [
    "AddressGuard",
    "BlockedAddress",
    "ClusterBudget",
    "Engine",
    "FetchError",
    "Handler",
    "classify",
    "cluster_budget",
    "fetch_all",
    "robots_tag_disallows",
    "run",
]
