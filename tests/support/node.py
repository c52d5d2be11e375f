"""A real node beside the test bed's control plane: containerd and runc, the CNI bridge, a kubelet,
kube-scheduler, kube-proxy and CoreDNS, all built from pinned source (scripts/build-testbed) or
Debian's packages, running the images `scripts/build-images --testbed` made from `images/`.

Addresses stay inside 198.18.0.0/15, the block set aside for benchmark networks: the bridge and the
node at 198.18.0.1, pods in 198.18.0.0/24, Services in 198.19.0.0/24. Pods get a route to that block
only (no default route, no masquerade): nothing they send leaves the machine. The API server, the
image server and the S3 server the pods use listen on the bridge's address.

Everything the node changes on the machine (sysctls, iptables chains, mounts, network namespaces,
cgroups, the kubelet's fixed paths) is recorded first and put back by `stop()` (tests/support/hoststate).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support.cluster import Process, testbed_binaries
from tests.support.hoststate import HostState
from tests.support.network import BRIDGE, NODE_IP, NODE_NAME, POD_SUBNET, TESTBED_BLOCK
from tests.support.services import free_port, wait_for_port

CGROUP_NAME = "laion-testbed"
ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LAION_TESTBED_CACHE", Path.home() / ".cache/laion-operator/testbed"))
# Paths the kubelet and containerd's shims use whatever their flags say (the shims' sockets go to
# /run/containerd/s); removed after if the machine did not have them.
KUBELET_FIXED_PATHS = (
    Path("/var/lib/kubelet"),
    Path("/var/log/containers"),
    Path("/var/log/pods"),
    Path("/run/containerd"),
)
# The running node's snapshot of the machine, there until its stop() has put the machine back.
SNAPSHOT = CACHE / "node-host-state.json"


def run(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@dataclass(frozen=True)
class Image:
    """An image `scripts/build-images --testbed` made: imported into the node's containerd."""

    role: str
    repository: str
    tag: str
    archive: str
    size_bytes: int

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


def build_images(extras: str = "pipeline") -> dict[str, Image]:
    """The project's images from the working tree, cached by content (seconds when nothing changed)."""
    out = run(str(ROOT / "scripts/build-images"), "--testbed", "--extras", extras, timeout=3600)
    manifest = Path(out.stdout.strip().splitlines()[-1])
    return {
        role: Image(role, d["repository"], d["tag"], d["archive"], int(d["size_bytes"]))
        for role, d in json.loads(manifest.read_text()).items()
    }


class Node:
    """containerd, kubelet, kube-scheduler, kube-proxy and CoreDNS for `cluster` (a started
    tests.support.cluster.Cluster whose API server listens on the bridge). A context manager."""

    def __init__(self, cluster, images: dict[str, Image]):
        self.cluster = cluster
        self.images = images
        self.bins = testbed_binaries()
        self.workdir = Path(tempfile.mkdtemp(prefix="node-"))
        # containerd's content store lasts between sessions, so an image is imported once per content.
        self.containerd_root = CACHE / "containerd"
        self.containerd_state = self.workdir / "containerd-state"
        self.socket = self.workdir / "containerd.sock"
        self.kubelet_root = self.workdir / "kubelet"
        self.components: dict[str, Process] = {}
        self.host: HostState | None = None
        self.recovered: list[str] = []  # what start() undid of a run killed before its stop()
        self.undone: list[str] = []  # what stop() had to put back
        self.leftovers: list[str] = []  # what it could not

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- start -----

    def start(self) -> Node:
        self.recovered = self._recover_dead_run()
        owned = (self.workdir, self.containerd_root, *KUBELET_FIXED_PATHS)
        self.host = HostState.record(paths=KUBELET_FIXED_PATHS, cgroup_name=CGROUP_NAME, owned=owned)
        self.host.save(SNAPSHOT)
        try:
            self._cgroups()
            self._containerd()
            self._import_images()
            self._coredns()
            self._kubelet()
            self._scheduler()
            self._kube_proxy()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _recover_dead_run(self) -> list[str]:
        """Put back what a killed run's node left (its snapshot's file is still there)."""
        dead = HostState.load(SNAPSHOT)
        if dead is None:
            return []
        if dead.alive():
            raise RuntimeError(f"another test run's node (pid {dead.pid}) is running on this machine; {SNAPSHOT}")
        run(self.bins["KUBE_PROXY"], "--cleanup", check=False)
        undone = dead.restore()
        for folder in map(Path, dead.owned):
            if folder.parent == self.workdir.parent and folder.name.startswith("node-"):
                shutil.rmtree(folder, ignore_errors=True)
        SNAPSHOT.unlink()
        return undone

    def _cgroups(self) -> None:
        """The kubelet's cgroupRoot, in every v1 controller (cpuset needs its cpus and mems copied)."""
        for controller in Path("/sys/fs/cgroup").iterdir():
            if not (controller / "cgroup.procs").exists() or controller.is_symlink():
                continue
            folder = controller / CGROUP_NAME
            folder.mkdir(exist_ok=True)
            if controller.name == "cpuset":
                for key in ("cpuset.cpus", "cpuset.mems"):
                    (folder / key).write_text((controller / key).read_text())

    def _containerd(self) -> None:
        cni_conf = self.workdir / "cni"
        cni_conf.mkdir()
        # bridge + host-local: pods in POD_SUBNET, a route to the test bed's block only (no default
        # route), no masquerade; hairpin so a pod reaches itself through its Service.
        (cni_conf / "10-laion-testbed.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "laion-testbed",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_SUBNET, "rangeStart": "198.18.0.10", "gateway": NODE_IP}]],
                                "routes": [{"dst": TESTBED_BLOCK}],
                                "dataDir": str(self.workdir / "cni-ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=2,
            )
        )
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "containerd.toml"
        config.write_text(
            CONTAINERD_CONFIG.format(
                root=self.containerd_root,
                state=self.containerd_state,
                socket=self.socket,
                cni_conf=cni_conf,
                pause=self.images["pause"].ref,
            )
        )
        # containerd finds its shim by name on PATH.
        shims = self.workdir / "bin"
        shims.mkdir()
        (shims / "containerd-shim-runc-v2").symlink_to(self.bins["CONTAINERD_SHIM"])
        self.components["containerd"] = Process(
            "containerd",
            [self.bins["CONTAINERD"], "--config", str(config)],
            self.workdir,
            env={"PATH": f"{shims}:{os.environ['PATH']}"},
        ).start()
        deadline = time.monotonic() + 60
        while run(*self.ctr("version"), check=False).returncode != 0:
            if not self.components["containerd"].alive() or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start:\n{self.components['containerd'].logs()[-4000:]}")
            time.sleep(0.3)

    def ctr(self, *args: str) -> list[str]:
        return [self.bins["CTR"], "--address", str(self.socket), "--namespace", "k8s.io", *args]

    def _import_images(self) -> None:
        present = set(run(*self.ctr("images", "ls", "-q")).stdout.split())
        # The content store lasts between sessions: earlier builds of these images go.
        stale = [
            ref
            for ref in present
            for image in self.images.values()
            if ref.startswith(image.repository + ":") and ref != image.ref
        ]
        if stale:
            run(*self.ctr("images", "rm", *stale), check=False)
        for image in self.images.values():
            if image.ref not in present:
                run(*self.ctr("images", "import", "--base-name", image.repository, image.archive), timeout=900)
            if image.ref not in run(*self.ctr("images", "ls", "-q")).stdout.split():
                raise RuntimeError(f"containerd has no {image.ref} after importing {image.archive}")

    def _coredns(self) -> None:
        """CoreDNS with the kubernetes plugin, on the bridge's address: the pods' cluster DNS. No
        `forward`: names outside cluster.local are refused, nothing is asked of the outside."""
        corefile = self.workdir / "Corefile"
        corefile.write_text(
            f""".:53 {{
    bind {NODE_IP}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.cluster.kubeconfig_path} admin
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
}}
"""
        )
        self.components["coredns"] = Process(
            "coredns", [self.bins["COREDNS"], "-conf", str(corefile)], self.workdir
        ).start()
        wait_for_port(53, host=NODE_IP, timeout=30)

    def _kubelet(self) -> None:
        w = self.workdir
        kubeconfig = w / "kubelet.kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(self.cluster.kubeconfig(f"system:node:{NODE_NAME}", self.cluster.node_token))
        )
        resolv = w / "resolv.conf"
        resolv.write_text(f"nameserver {NODE_IP}\n")
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine has cgroup v1 and no systemd.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_NAME}",
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "address": NODE_IP,
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "clusterDomain": "cluster.local",
            "clusterDNS": [NODE_IP],
            "resolvConf": str(resolv),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(self.cluster.kubelet_client_ca)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "podLogsDir": str(w / "pod-logs"),
            "failSwapOn": False,
            # The images are imported, never pulled: the kubelet must not collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%"},
            "serializeImagePulls": False,
            "registerNode": True,
            "maxPods": 60,
        }
        (w / "kubelet.yaml").write_text(yaml.safe_dump(config))
        self.components["kubelet"] = Process(
            "kubelet",
            [
                self.bins["KUBELET"],
                f"--config={w / 'kubelet.yaml'}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.kubelet_root}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "-v=1",
            ],
            w,
        ).start()

    def _scheduler(self) -> None:
        kubeconfig = str(self.cluster.kubeconfig_path)
        self.components["kube-scheduler"] = Process(
            "kube-scheduler",
            [
                self.bins["KUBE_SCHEDULER"],
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "-v=1",
            ],
            self.workdir,
        ).start()

    def _kube_proxy(self) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.cluster.kubeconfig_path)},
            "mode": "iptables",
            "clusterCIDR": POD_SUBNET,
            "hostnameOverride": NODE_NAME,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # Leave the machine's conntrack limits and route_localnet as they are.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False},
        }
        path = self.workdir / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        self.components["kube-proxy"] = Process(
            "kube-proxy", [self.bins["KUBE_PROXY"], f"--config={path}", "-v=1"], self.workdir
        ).start()

    def wait_ready(self, timeout: float = 180) -> None:
        """The node registered and Ready, and the kubernetes Service routed (kube-proxy's rules)."""
        deadline = time.monotonic() + timeout
        while True:
            dead = [name for name, p in self.components.items() if not p.alive()]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited:\n{self.logs()}")
            node = self.cluster.get("", "v1", "nodes", None, NODE_NAME)
            conditions = {c["type"]: c["status"] for c in ((node or {}).get("status") or {}).get("conditions", [])}
            if conditions.get("Ready") == "True" and "KUBE-SERVICES" in run("iptables-save", "-t", "nat").stdout:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node was not Ready in {timeout} s ({conditions}):\n{self.logs()}")
            time.sleep(1)

    # ----- stop -----

    def stop(self) -> None:
        """Every container killed, every component stopped, the machine put back as it was."""
        kubelet = self.components.pop("kubelet", None)
        if kubelet:
            kubelet.stop()
        if "containerd" in self.components and self.components["containerd"].alive():
            self._remove_containers()
        proxy = self.components.pop("kube-proxy", None)
        if proxy:
            proxy.stop()
            run(self.bins["KUBE_PROXY"], "--cleanup", check=False)
        for proc in reversed(list(self.components.values())):
            proc.stop()
        self.components.clear()
        if self.host is not None:
            self.undone = self.host.restore()
            now = HostState.record(paths=KUBELET_FIXED_PATHS, cgroup_name=CGROUP_NAME)
            self.leftovers = self.host.differences(now) + [
                f"mount {m} left"
                for m in now.mounts - self.host.mounts
                if any(m.startswith(o.rstrip("/") + "/") for o in self.host.owned)
            ]
            if not self.leftovers:
                SNAPSHOT.unlink(missing_ok=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _remove_containers(self) -> None:
        """What a drained node does: every task killed and deleted, so runc's mounts and the pods'
        network namespaces (the CNI DEL) go with them."""
        for _ in range(2):
            tasks = run(*self.ctr("tasks", "ls", "-q"), check=False).stdout.split()
            for task in tasks:
                run(*self.ctr("tasks", "kill", "-s", "SIGKILL", task), check=False)
            for task in tasks:
                run(*self.ctr("tasks", "delete", "-f", task), check=False, timeout=30)
            containers = run(*self.ctr("containers", "ls", "-q"), check=False).stdout.split()
            for container in containers:
                run(*self.ctr("containers", "delete", container), check=False)
            if not tasks and not containers:
                return

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.logs()[-3000:]}" for name, p in self.components.items())

    def restart_kubelet(self) -> None:
        """The kubelet stopped and started again (an upgrade, a crash): pods keep running meanwhile."""
        proc = self.components["kubelet"]
        proc.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / "kubelet.log").rename(self.workdir / "kubelet.log.1")
        proc.start()


# containerd 2's configuration (version 3): its own root, state and socket; the CRI plugin with
# runc under the cgroupfs driver, the pause image imported (never pulled), and the CNI config folder
# of the test bed's own (podman's package drops a bridge in /etc/cni/net.d).
CONTAINERD_CONFIG = """\
version = 3
root = '{root}'
state = '{state}'
imports = []
# Plugins that would write to fixed paths of the machine (/opt/containerd, /var/run/nri).
disabled_plugins = [
  'io.containerd.nri.v1.nri',
  'io.containerd.internal.v1.opt',
  'io.containerd.image-verifier.v1.bindir',
]

[grpc]
  address = '{socket}'

[ttrpc]
  address = '{socket}.ttrpc'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{pause}'

  [plugins.'io.containerd.cri.v1.runtime']
    # root here lacks CAP_SYS_RESOURCE: runc cannot lower a container's oom_score_adj below its own.
    restrict_oom_score_adj = true
    # The pods' network namespaces under the state folder, not /var/run/netns.
    netns_mounts_under_state_dir = true
    cdi_spec_dirs = []
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '/usr/sbin/runc'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['/usr/lib/cni']
      conf_dir = '{cni_conf}'
      max_conf_num = 1

  [plugins.'io.containerd.grpc.v1.cri']
    disable_tcp_service = true
"""
