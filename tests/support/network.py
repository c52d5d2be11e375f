"""The test bed's addresses: all inside 198.18.0.0/15, the block set aside for benchmark networks
(never 10/8, 172.16/12 or 192.168/16, which this machine's network rules watch). The node and the
bridge its pods hang on hold NODE_IP; the API server, and the image and S3 servers pods use, listen
there; pods take POD_SUBNET and Services SERVICE_RANGE."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

BRIDGE = "laionbr0"
NODE_IP = "198.18.0.1"
POD_SUBNET = "198.18.0.0/24"
SERVICE_RANGE = "198.19.0.0/24"
TESTBED_BLOCK = "198.18.0.0/15"
NODE_NAME = "testbed-node"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Bridge:
    """A Linux bridge holding the node's address: made before the API server starts (it listens
    there), removed when the last test bed using it stops. Two test sessions on one machine (a
    benchmark beside the tests) share it: each registers its pid in USERS."""

    USERS = Path("/run/laion-testbed/bridge-users")

    def __init__(self, name: str = BRIDGE, address: str = NODE_IP, prefix: int = 24):
        self.name, self.address, self.prefix = name, address, prefix
        self.user = self.USERS / str(os.getpid())

    def up(self) -> Bridge:
        self.USERS.mkdir(parents=True, exist_ok=True)
        self.user.touch()
        if _ip("link", "show", self.name, check=False).returncode != 0:
            _ip("link", "add", self.name, "type", "bridge")
        if f"{self.address}/" not in _ip("-br", "addr", "show", self.name).stdout:
            _ip("addr", "add", f"{self.address}/{self.prefix}", "dev", self.name)
        _ip("link", "set", self.name, "up")
        return self

    def down(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.user.unlink()
        others = [p for p in self.USERS.glob("*") if p.name.isdigit() and _alive(int(p.name))]
        if others:
            return
        _ip("link", "del", self.name, check=False)
        with contextlib.suppress(OSError):
            for stale in self.USERS.iterdir():
                stale.unlink()
            self.USERS.rmdir()
            self.USERS.parent.rmdir()
