"""What both benchmarks share: running a command while sampling its memory, the machine, tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The test bed's servers (the loopback internet, the API server) are tests/support's, not the package's.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "work"  # generated data and outputs; git-ignored
PYTHON = sys.executable
# No update checks or usage reports to the internet from the tools under test.
QUIET_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "WANDB_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
    "SPARK_LOCAL_IP": "127.0.0.1",
}


def env(**extra: str) -> dict:
    return {**os.environ, **QUIET_ENV, **extra}


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_sample(pid: int, cpu: dict[int, float], rss: dict[int, int] | None = None) -> int:
    """Resident bytes of a process and all its descendants; records each one's CPU seconds in `cpu`
    (and, given `rss`, each one's resident bytes)."""
    tree, total, todo = _children(), 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                resident = int(f.read().split()[1]) * page
            total += resident
            if rss is not None:
                rss[p] = resident
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu[p] = max(cpu.get(p, 0.0), (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
        todo.extend(tree.get(p, []))
    return total


@dataclass
class Run:
    seconds: float  # wall time of the whole command
    peak_rss: int  # peak resident bytes of the command's process tree, sampled every 50 ms
    cpu: float  # CPU seconds of the process tree (sampled: a process's last 50 ms may be missed)
    stdout: str
    returncode: int
    peaks: dict[str, int] = field(default_factory=dict)  # peak resident bytes by group (see run's `groups`)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def run(cmd: list[str], timeout: float = 3600, groups=None, **kwargs) -> Run:
    """Run `cmd`, return its wall time, its process tree's peak memory and its output. `groups(pid,
    root, cmdline)` names the group of each process: the peak of each group's sum is kept apart."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kwargs.pop("env", env()), **kwargs
    )
    peak = 0
    cpu: dict[int, float] = {}
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            rss: dict[int, int] | None = {} if groups else None
            peak = max(peak, tree_sample(proc.pid, cpu, rss))
            if rss:
                sums: dict[str, int] = {}
                for pid, resident in rss.items():  # read each time: a Ray worker retitles itself
                    name = groups(pid, proc.pid, cmdline(pid))
                    sums[name] = sums.get(name, 0) + resident
                for name, total in sums.items():
                    peaks[name] = max(peaks.get(name, 0), total)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"{' '.join(cmd[:4])} … took over {timeout:.0f} s") from None
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err[-3000:]}")
    return Run(seconds, peak, sum(cpu.values()), out, proc.returncode, peaks)


def last_json(text: str) -> dict:
    """The last line of a worker's stdout that is a JSON object."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON result in output: {text[-500:]}")


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "-"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.node() or 'host'}: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def versions(names: list[str]) -> str:
    return ", ".join(f"{n} {_version(n)}" for n in names)


def java_version() -> str:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60)
        return out.stderr.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "no java"


def load() -> str:
    """The machine's load averages (1, 5, 15 min): other work on the same cores slows every side."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def goal(ok: bool) -> str:
    return "met" if ok else "NOT met"
