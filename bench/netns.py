"""A network namespace for a benchmark that needs its own resolver: `ip netns add`, loopback up, and
/etc/netns/<name>/resolv.conf naming a DNS server, which `ip netns exec` mounts over /etc/resolv.conf
for every command run in it. So a client's system resolver (glibc's getaddrinfo) asks that server,
as a user's machine asks its own. Needs root (or CAP_SYS_ADMIN) and iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


class Namespace:
    def __init__(self, name: str, nameserver: str):
        self.name = name
        self.nameserver = nameserver
        self.etc = Path("/etc/netns") / name

    def __enter__(self) -> Namespace:
        if os.geteuid() != 0:
            raise SystemExit(f"[netns] a network namespace needs root ({self.name})")
        if not shutil.which("ip"):
            raise SystemExit("[netns] iproute2's `ip` is missing")
        self.close()  # a namespace an interrupted run left behind
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)
        self.etc.mkdir(parents=True, exist_ok=True)
        # One attempt, no search list: a name that does not exist costs one answer, not a walk of suffixes.
        (self.etc / "resolv.conf").write_text(f"nameserver {self.nameserver}\noptions attempts:2 timeout:5\nsearch .\n")
        # Only localhost in the namespace's hosts file: every image host goes to DNS.
        (self.etc / "hosts").write_text("127.0.0.1 localhost\n")
        return self

    def prefix(self) -> list[str]:
        """What to put before a command to run it in the namespace."""
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], stderr=subprocess.DEVNULL, check=False)
        shutil.rmtree(self.etc, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()
