"""A node killed before its stop() (CI's timeout, a session's end) leaves mounts, iptables chains and
fixed paths behind; the next run restores the dead run's saved snapshot before it records its own.
These tests change the machine the way a node does, on a small scale, and check it is put back."""

from __future__ import annotations

import subprocess
import sys

from tests.support.hoststate import HostState, iptables_tables, mount_points


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_saved_snapshot_loads_equal(tmp_path):
    before = HostState.record(paths=(tmp_path / "fixed",), owned=(tmp_path,))
    before.save(tmp_path / "snapshot.json")
    assert HostState.load(tmp_path / "snapshot.json") == before
    assert HostState.load(tmp_path / "absent.json") is None
    assert not before.alive(), "this process's own snapshot is its own to restore"


def test_a_dead_runs_snapshot_is_restored(tmp_path):
    workdir = tmp_path / "node-dead"
    fixed = tmp_path / "kubelet"
    workdir.mkdir()
    snapshot = HostState.record(paths=(fixed,), owned=(workdir,))
    snapshot.pid = dead_pid()
    snapshot.save(tmp_path / "snapshot.json")
    # What the killed node left: a mount under its workdir, a fixed path, an iptables chain.
    shm = workdir / "sandbox" / "shm"
    shm.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "shm", str(shm)], check=True)
    (fixed / "pki").mkdir(parents=True)
    subprocess.run(["iptables", "-t", "filter", "-N", "LAION-TEST-LEFT"], check=True)
    try:
        dead = HostState.load(tmp_path / "snapshot.json")
        assert dead is not None and not dead.alive()
        undone = dead.restore()
        assert str(shm) not in mount_points()
        assert not fixed.exists()
        assert "LAION-TEST-LEFT" not in iptables_tables("iptables-save")["filter"]
        assert f"unmounted {shm}" in undone and f"removed {fixed}" in undone
        assert dead.differences(HostState.record(paths=(fixed,))) == []
    finally:
        subprocess.run(["umount", "-l", str(shm)], capture_output=True, check=False)
        subprocess.run(["iptables", "-t", "filter", "-X", "LAION-TEST-LEFT"], capture_output=True, check=False)
