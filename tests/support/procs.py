"""Processes by what started them, for killing a command or a cluster the way a crash does.

Ray's agents retitle themselves (`ray::DashboardAgent`), so their command line no longer names the
cluster's temp dir, and some start in sessions of their own, so a process-group kill misses them.
Left behind, an agent whose raylet is gone spins at most of a core. What they keep is their parent
link, until their parent dies: so a tree is listed before anything in it is killed."""

from __future__ import annotations

import os
import signal


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue  # ended while listed
    return parents


def tree(roots: list[int]) -> list[int]:
    """`roots` and every process under them."""
    parents = _parents()
    found = [pid for pid in roots if pid in parents]
    for pid in found:  # grows while it is walked: children of children
        found += [child for child, parent in parents.items() if parent == pid and child not in found]
    return found


def process_tree(mark: str) -> list[int]:
    """The pids of the processes whose command line holds `mark`, and of every process under them."""
    return tree([pid for pid in _parents() if mark in cmdline(pid)])


def alive(pids) -> list[int]:
    """The pids still running: a zombie has ended, only its parent has not reaped it yet."""
    running = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    running.append(pid)
        except OSError:
            continue
    return running


def signal_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process under it, whatever their session or group."""
    signal_all(tree([pid]), signal.SIGKILL)
