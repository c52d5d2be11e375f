"""The internet benchmark's matrix: each profile a configuration of `tests.support.internet`
(hosts, latency, failure mix, transport), a shard size and a URL count, deterministic by seed.

Every profile but `calm`'s own baseline keeps the seeds' ~80 % success; they differ in what a
reviewer from either side would call the test bed's choice: how many URLs straggle and for how
long, whether slow-but-steady large images exist, how many hosts there are and how busy the busiest
is, whether names and TLS cost anything, and how large a shard is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.support.internet import DEFAULT_MIX

# The seeds' failure mix without its stragglers: no drip-fed bodies, no silent hosts, no oversized
# bodies; their share goes to images.
CALM_MIX = {k: v for k, v in DEFAULT_MIX.items() if k not in ("drip", "silent", "big")}
CALM_MIX["ok"] += DEFAULT_MIX["drip"] + DEFAULT_MIX["silent"] + DEFAULT_MIX["big"]
BUSIEST = 0.03  # LAION's busiest domains hold a few per cent of its URLs


def _with(mix: dict[str, float], **shares: float) -> dict[str, float]:
    """`mix` with some kinds' shares set, the difference taken from (or given to) images."""
    out = dict(mix)
    for kind, share in shares.items():
        out["ok"] -= share - out.get(kind, 0.0)
        out[kind] = share
    return out


@dataclass(frozen=True)
class Profile:
    name: str
    about: str
    mix: dict[str, float]
    config: dict = field(default_factory=dict)  # tests.support.internet.Config fields besides the seed
    urls: int = 1500
    shard: int = 750
    stragglers: bool = False  # stragglers or many hosts in play: the 1.5× goal applies
    netns: bool = False  # names and TLS: both sides and the servers in a network namespace
    default: bool = True  # in the default set (`--profiles` unset)


def _stragglers(share: float, seconds: int, default: bool) -> Profile:
    pct = f"{share * 100:g}pct"
    return Profile(
        f"stragglers-{pct}-{seconds}s",
        f"the seeds' failure mix with {share:.1%} of URLs drip-fed (headers, then a byte every 2 s) for "
        f"{seconds} s; silent hosts (2 %) and 96 MiB bodies (0.5 %) as in the seeds' mix",
        _with(DEFAULT_MIX, drip=share),
        {"drip_seconds": float(seconds), "host_share": BUSIEST},
        stragglers=True,
        default=default,
    )


PROFILES = {
    p.name: p
    for p in [
        Profile(
            "calm",
            "the baseline: latency and the fast failures (404, 403, 5xx, refused, the busy host's 429s) "
            "but no drip-fed bodies, no silent hosts, no oversized bodies",
            CALM_MIX,
            {"silent_hosts": 0, "host_share": BUSIEST},
        ),
        _stragglers(0.01, 40, True),
        _stragglers(0.001, 15, False),
        _stragglers(0.01, 15, False),
        _stragglers(0.001, 40, False),
        Profile(
            "heavy-tail",
            "calm's mix with 5 % of URLs slow-but-steady large images: 1-8 MB (log-uniform) at "
            "100-500 KB/s; those that take longer than the 10 s deadline are kept by a per-read "
            "timeout (img2dataset's) and dropped by a whole-request deadline (the project's)",
            _with(CALM_MIX, heavy=0.05),
            {"silent_hosts": 0, "host_share": BUSIEST},
        ),
        Profile(
            "many-hosts",
            "the seeds' failure mix over 4,000 hosts (127.79/16), the busiest with 3 % of the URLs",
            DEFAULT_MIX,
            {"hosts": 4000, "host_share": BUSIEST, "net": 79, "refused_hosts": 40, "silent_hosts": 40},
            stragglers=True,
        ),
        Profile(
            "dns-tls",
            "the seeds' failure mix with every host by name through a loopback DNS server (answers after "
            "a lognormal delay, median 20 ms, p99 300 ms; 2 % of URLs on names that do not exist: "
            "NXDOMAIN) and HTTPS only, certificates from a CA made for the run and trusted through "
            "SSL_CERT_FILE; both sides and the servers in a network namespace whose resolv.conf names "
            "that DNS server",
            _with(DEFAULT_MIX, nxdomain=0.02),
            {"hosts": 500, "host_share": BUSIEST, "net": 80, "names": True, "tls": True},
            stragglers=True,
            netns=True,
            default=False,  # the default set would pass the ~40 minutes it should fit in
        ),
        Profile(
            "shards-10000",
            "stragglers-1pct-40s at img2dataset's default shard size, 10,000 URLs, two shards per process",
            _with(DEFAULT_MIX, drip=0.01),
            {"drip_seconds": 40.0, "host_share": BUSIEST},
            urls=40_000,
            shard=10_000,
            stragglers=True,
            default=False,
        ),
    ]
}
ALIASES = {"stragglers": [n for n in PROFILES if n.startswith("stragglers-")]}


def select(names: str | None) -> list[Profile]:
    """The profiles a comma-separated list names (`stragglers` is all four), or the default set."""
    if not names:
        return [p for p in PROFILES.values() if p.default]
    out: list[Profile] = []
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        for one in ALIASES.get(name, [name]):
            if one not in PROFILES:
                raise SystemExit(f"unknown internet profile {one!r}; known: {', '.join([*PROFILES, *ALIASES])}")
            if PROFILES[one] not in out:
                out.append(PROFILES[one])
    return out
