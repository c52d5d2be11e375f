"""Faults on the loopback test bed: a storage endpoint that goes away and comes back, a second Ray node
that dies, and part specs the loopback image server can serve."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time

from tests.support.procs import cmdline, process_tree, signal_all
from tests.support.services import free_port, ray_start, wait_for_port


class Outage:
    """A TCP forwarder in front of a server: `down()` refuses every connection and cuts the open ones,
    as a storage endpoint that crashed; `up()` listens again on the same port."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> Outage:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        wait_for_port(self.port, timeout=5)
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def outage(self, seconds: float) -> threading.Thread:
        """Down now, up again after `seconds`, in the background."""
        self.down()

        def later():
            time.sleep(seconds)
            self.up()

        thread = threading.Thread(target=later, daemon=True)
        thread.start()
        return thread

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def ray_workers(cluster, name: str = "_write_shard") -> list[int]:
    """This cluster's worker processes (never another cluster's on the machine) running the task or
    actor class `name` right now: a shard, or the progress `Board`."""
    return [
        pid
        for pid in process_tree(f"raylet --raylet_socket_name={cluster.temp_dir}")
        if cmdline(pid).startswith(f"ray::{name}")
    ]


class SecondNode:
    """A second raylet joined to the session's cluster, with its own ports; `kill()` loses it whole
    (SIGKILL to its raylet and everything under it), as a node that dies."""

    def __init__(self, cluster, num_cpus: int = 2, resource: str = "second_node"):
        self.cluster = cluster
        self.num_cpus = num_cpus
        self.resource = resource
        self.node_manager_port = free_port()

    def start(self) -> SecondNode:
        cmd = ray_start(
            "--address",
            self.cluster.address,
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(self.num_cpus),
            "--resources",
            f'{{"{self.resource}": 100}}',
            "--node-manager-port",
            str(self.node_manager_port),
            "--disable-usage-stats",
        )
        for flag in (
            "--object-manager-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
        ):
            cmd += [flag, str(free_port())]
        for attempt in range(3):
            try:
                # The head runs as a single-machine cluster (services.LOOPBACK_RAY); a second raylet on the
                # same machine must be allowed to join it explicitly.
                env = {**self.cluster.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
                subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=420)
                return self
            except subprocess.CalledProcessError as err:
                self.kill()  # Ray gives a raylet 30 s to register; a loaded machine can miss that
                if attempt == 2:
                    raise RuntimeError(f"ray start (second node) failed: {err.stderr.decode()[-2000:]}") from None
        return self

    def processes(self) -> list[int]:
        """The pids of this node's raylet and of every process under it (workers, agents)."""
        return process_tree(f"--node_manager_port={self.node_manager_port}")

    def kill(self) -> None:
        signal_all(self.processes(), signal.SIGKILL)
