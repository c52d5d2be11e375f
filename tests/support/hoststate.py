"""What a node changes on the machine it runs on, recorded before and put back after: a kubelet,
kube-proxy, the CNI bridge plugin and runc each change some of it (sysctls, iptables chains, mounts,
network namespaces, cgroups), and the test bed must leave the machine as it found it.

`HostState.record()` takes the snapshot; `restore()` puts back what differs and returns what it had
to undo, and `differences()` tells what is still not as it was (a test asserts it is empty).

A run that is killed (CI's timeout, a session's end, a second Ctrl-C) never reaches its restore, and
the next run would record the dirty machine as "before": so the snapshot is also written to a file
(`save`) until the restore is done, and the next node restores a dead run's snapshot first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# The sysctls a node's components write: the bridge plugin turns forwarding on, kube-proxy and the
# kubelet set conntrack limits and kernel defaults (the kubelet's protectKernelDefaults=false path).
SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)
NETNS_DIRS = (Path("/run/netns"), Path("/var/run/netns"))
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def iptables_tables(tool: str) -> dict[str, str]:
    """`iptables-save` (or ip6tables-save) split by table: {table: its block, up to COMMIT}."""
    if not shutil.which(tool):
        return {}
    out = subprocess.run([tool], capture_output=True, text=True, check=False).stdout
    tables: dict[str, str] = {}
    for block in re.findall(r"^\*(\w+)\n(.*?^COMMIT$)", out, flags=re.M | re.S):
        name, body = block
        # Counters move with every packet: a chain's policy is what is compared, not its counts.
        lines = (re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in body.splitlines() if not line.startswith("#"))
        tables[name] = "\n".join(lines)
    return tables


def _empty_table(block: str) -> str:
    """A table's block with only its built-in chains at ACCEPT: what `iptables-restore` turns a table
    the machine did not have into (nf_tables keeps the empty table; nothing filters)."""
    builtins = [line.split()[0] for line in block.splitlines() if line.startswith(":") and line.split()[1] != "-"]
    return "\n".join([*(f"{chain} ACCEPT [0:0]" for chain in builtins), "COMMIT"])


def mount_points() -> set[str]:
    points = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        points.add(line.split()[4].replace("\\040", " "))
    return points


def cgroup_dirs(name: str) -> list[Path]:
    """Every controller's folder `name` (the node's cgroup root), deepest first."""
    found: list[Path] = []
    if not CGROUP_ROOT.is_dir():
        return found
    for controller in CGROUP_ROOT.iterdir():
        top = controller / name
        if top.is_dir():
            found += sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            found.append(top)
    return found


def kill_cgroup(name: str) -> int:
    """SIGKILL every process left in the node's cgroups (containers whose runtime is gone)."""
    killed = 0
    for folder in cgroup_dirs(name):
        for pid in (_read(folder / "cgroup.procs") or "").split():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), 9)
                killed += 1
    return killed


@dataclass
class HostState:
    """The machine's state that a node touches, at one moment."""

    sysctls: dict[str, str | None] = field(default_factory=dict)
    iptables: dict[str, dict[str, str]] = field(default_factory=dict)
    mounts: set[str] = field(default_factory=set)
    netns: set[str] = field(default_factory=set)
    paths: dict[str, bool] = field(default_factory=dict)
    cgroup_name: str = ""
    owned: tuple[str, ...] = ()  # folders whose new mounts are the node's (its root dirs)
    pid: int = 0  # the process that recorded it: a snapshot whose pid is gone belongs to a dead run

    @classmethod
    def record(cls, *, paths: tuple[Path, ...] = (), cgroup_name: str = "", owned: tuple[Path, ...] = ()) -> HostState:
        """`paths`: fixed paths the node may create (the kubelet's /var/lib/kubelet, say): removed
        after if they did not exist before."""
        return cls(
            owned=tuple(str(o) for o in owned),
            pid=os.getpid(),
            sysctls={key: _read(Path("/proc/sys") / key) for key in SYSCTLS},
            iptables={tool: iptables_tables(tool) for tool in ("iptables-save", "ip6tables-save")},
            mounts=mount_points(),
            netns={str(p) for d in NETNS_DIRS if d.is_dir() for p in d.iterdir()},
            paths={str(p): p.exists() for p in paths},
            cgroup_name=cgroup_name,
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = {**self.__dict__, "mounts": sorted(self.mounts), "netns": sorted(self.netns)}
        path.write_text(json.dumps(fields, indent=1))

    @classmethod
    def load(cls, path: Path) -> HostState | None:
        try:
            fields = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        fields.update(mounts=set(fields["mounts"]), netns=set(fields["netns"]), owned=tuple(fields["owned"]))
        return cls(**fields)

    def alive(self) -> bool:
        """Whether the run that recorded this snapshot is still running (then it is not ours to undo)."""
        if not self.pid or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def restore(self) -> list[str]:
        """Put back what differs. Returns a line for each thing undone."""
        undone: list[str] = []
        if self.cgroup_name and kill_cgroup(self.cgroup_name):
            undone.append(f"killed processes left in cgroup {self.cgroup_name}")
        now = mount_points()
        ours = [
            m
            for m in now - self.mounts
            if any(m == str(o) or m.startswith(str(o).rstrip("/") + "/") for o in (*self.owned, *NETNS_DIRS))
        ]
        for point in sorted(ours, key=lambda m: -len(m)):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
            undone.append(f"unmounted {point}")
        for d in NETNS_DIRS:
            for p in d.iterdir() if d.is_dir() else ():
                if str(p) not in self.netns:
                    with contextlib.suppress(OSError):
                        p.unlink()
                    undone.append(f"removed network namespace {p}")
        for tool, before in self.iptables.items():
            undone += self._restore_iptables(tool, before)
        for key, value in self.sysctls.items():
            path = Path("/proc/sys") / key
            if value is not None and _read(path) != value:
                with contextlib.suppress(OSError):
                    path.write_text(value + "\n")
                    undone.append(f"sysctl {key.replace('/', '.')} back to {value}")
        folders = cgroup_dirs(self.cgroup_name) if self.cgroup_name else []
        for folder in folders:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if folders:
            undone.append(f"removed cgroup {self.cgroup_name}")
        for path, existed in self.paths.items():
            if not existed and os.path.lexists(path):
                shutil.rmtree(path, ignore_errors=True)
                undone.append(f"removed {path}")
        return undone

    @staticmethod
    def _restore_iptables(tool: str, before: dict[str, str]) -> list[str]:
        now = iptables_tables(tool)
        changed = {t: before.get(t) or _empty_table(block) for t, block in now.items() if block != before.get(t)}
        if not changed:
            return []
        text = "".join(f"*{t}\n{block}\n" for t, block in changed.items())
        subprocess.run([tool.replace("-save", "-restore")], input=text, text=True, check=True)
        return [f"{tool.replace('-save', '')} table {t} restored" for t in changed]

    def differences(self, now: HostState) -> list[str]:
        """What `now` has that differs from this snapshot (empty: the machine is as it was)."""
        diffs = [
            f"sysctl {k.replace('/', '.')}: {v} -> {now.sysctls.get(k)}"
            for k, v in self.sysctls.items()
            if v != now.sysctls.get(k)
        ]
        for tool, before in self.iptables.items():
            for table, block in now.iptables.get(tool, {}).items():
                expected = before.get(table) or _empty_table(block)
                if block != expected:
                    chains = sorted({line.split()[0][1:] for line in block.splitlines() if line.startswith(":")})
                    diffs.append(f"{tool.replace('-save', '')} table {table} differs (chains: {', '.join(chains)})")
        diffs += [f"netns {p} left" for p in now.netns - self.netns]
        diffs += [f"{p} left" for p, existed in self.paths.items() if not existed and os.path.lexists(p)]
        if self.cgroup_name:
            diffs += [f"cgroup {p} left" for p in cgroup_dirs(self.cgroup_name)]
        return diffs
