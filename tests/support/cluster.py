"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-controller-manager built
from pinned source (scripts/build-testbed), with authentication and RBAC on, and the real kubectl.

Tests reach it as an admin (a static token in group system:masters); the operator reaches it only
with a token of the chart's ServiceAccount (`operator_env`), as it would inside a cluster. The API
server listens on the test bed's bridge (tests/support/network.py), where a node's pods reach it
through the `kubernetes` Service; the node itself (kubelet, scheduler, kube-proxy) is started by
tests/support/node.py only for the tests that run pods, and until then pods stay Pending.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

from tests.support.network import NODE_IP, NODE_NAME, SERVICE_RANGE, Bridge
from tests.support.services import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
JSON = dict[str, Any]
CRD_RESOURCE = ("apiextensions.k8s.io", "v1", "customresourcedefinitions")


BIN_DIR = Path(os.environ.get("LAION_TESTBED_BIN", Path.home() / ".cache/laion-operator/testbed/bin"))


def testbed_binaries() -> dict[str, str]:
    """The binaries scripts/build-testbed made (`scripts/setup --test` runs it), by role."""
    env_file = BIN_DIR / "testbed.env"
    if not env_file.exists():
        raise RuntimeError(f"{env_file} is missing: run scripts/setup --test (it builds the test bed with Go)")
    return dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)


def kuberay_crd(name: str = "rayjobs") -> Path:
    """A CRD of the pinned KubeRay release, as its operator was built from."""
    return Path(testbed_binaries()["KUBERAY_CRDS"]) / f"ray.io_{name}.yaml"


def write_signing_key(private: Path, public: Path) -> None:
    """The key pair the API server signs ServiceAccount tokens with (and verifies them by)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def write_kubelet_client_pki(folder: Path) -> tuple[Path, Path, Path]:
    """(CA, client certificate, key): the API server's identity towards kubelets, in system:masters."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from tests.support.tls import certificate_authority, issue, write_pem

    ca = certificate_authority("laion test bed kubelet-client CA")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
            x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver-kubelet-client"),
        ]
    )
    paths = write_pem(folder, ca, {"client": issue(ca, subject, client=True)})
    return paths["ca"], paths["client"], paths["client.key"]


class KubeAPIError(Exception):
    def __init__(self, code: int, body: Any):
        super().__init__(f"{code}: {body}")
        self.code = code
        self.body = body

    @property
    def reason(self) -> str | None:
        return self.body.get("reason") if isinstance(self.body, dict) else None


def _parsed(body: bytes | str | None) -> Any:
    """An error's body: the API server's Status object, or its text when it is not JSON."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body or ""
    try:
        return json.loads(text)
    except ValueError:
        return text


class Process:
    """A component's process, its output in a log file, stopped with its whole process group."""

    def __init__(self, name: str, cmd: list[str], workdir: Path, env: dict[str, str] | None = None):
        self.name, self.cmd, self.env = name, cmd, env
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(self.env or {})},
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if not self.alive():
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Cluster:
    """etcd + kube-apiserver + kube-controller-manager on loopback; a context manager."""

    __test__ = False

    def __init__(self):
        self.bins = testbed_binaries()
        self.workdir = Path(tempfile.mkdtemp(prefix="kube-"))
        self.admin_token = secrets.token_hex(16)
        # The node's credentials exist from the start: the API server reads its token file once.
        self.node_token = secrets.token_hex(16)
        self.bridge = Bridge()
        self.address = NODE_IP
        self.port = free_port()
        self.url = f"https://{self.address}:{self.port}"
        self.ca_file = self.workdir / "certs" / "apiserver.crt"  # until the server is up: then its CA alone
        self.kubeconfig_path = self.workdir / "admin.kubeconfig"
        self.components: dict[str, Process] = {}
        self._client: ApiClient | None = None

    # ----- lifecycle -----

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Cluster:
        w = self.workdir
        self.bridge.up()
        write_signing_key(w / "sa.key", w / "sa.pub")
        (w / "tokens.csv").write_text(
            f'{self.admin_token},admin,admin-uid,"system:masters"\n'
            f'{self.node_token},system:node:{NODE_NAME},node-uid,"system:nodes"\n'
        )
        self.kubelet_client_ca, client_cert, client_key = write_kubelet_client_pki(w / "kubelet-pki")
        etcd_port, etcd_peer = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self.components["etcd"] = Process(
            "etcd",
            [
                self.bins["ETCD"],
                "--name",
                "testbed",
                "--data-dir",
                str(w / "etcd"),
                "--listen-client-urls",
                etcd_url,
                "--advertise-client-urls",
                etcd_url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster",
                f"testbed=http://127.0.0.1:{etcd_peer}",
                "--log-level",
                "warn",
                "--unsafe-no-fsync",
            ],
            w,
        ).start()
        wait_for_port(etcd_port, timeout=60)
        self.components["kube-apiserver"] = Process(
            "kube-apiserver",
            [
                self.bins["KUBE_APISERVER"],
                "--etcd-servers",
                etcd_url,
                "--bind-address",
                self.address,
                "--advertise-address",
                self.address,
                "--secure-port",
                str(self.port),
                "--cert-dir",
                str(w / "certs"),
                "--token-auth-file",
                str(w / "tokens.csv"),
                "--authorization-mode",
                "Node,RBAC",
                # As strict clusters run: setting blockOwnerDeletion needs `update` on the owner's finalizers.
                "--enable-admission-plugins",
                "OwnerReferencesPermissionEnforcement",
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file",
                str(w / "sa.pub"),
                "--service-account-signing-key-file",
                str(w / "sa.key"),
                "--service-cluster-ip-range",
                SERVICE_RANGE,
                # `kubectl logs` and `exec` through the kubelet, which trusts this client's CA; the
                # node's name resolves nowhere, its InternalIP does.
                "--kubelet-client-certificate",
                str(client_cert),
                "--kubelet-client-key",
                str(client_key),
                "--kubelet-preferred-address-types",
                "InternalIP",
                "--profiling=false",
                "--enable-priority-and-fairness=false",
                "-v",
                "1",
            ],
            w,
        ).start()
        self._wait_ready()
        # The API server's generated bundle is its serving certificate, then the CA that signed it:
        # clients and the controller-manager's root CA publisher get the CA alone.
        blocks = self.ca_file.read_text().split("-----END CERTIFICATE-----")
        self.ca_file = w / "ca.crt"
        self.ca_file.write_text(blocks[-2].strip() + "\n-----END CERTIFICATE-----\n")
        self._close_client()
        self.kubeconfig_path.write_text(yaml.safe_dump(self.kubeconfig("admin", self.admin_token)))
        self.components["kube-controller-manager"] = Process(
            "kube-controller-manager",
            [
                self.bins["KUBE_CONTROLLER_MANAGER"],
                "--kubeconfig",
                str(self.kubeconfig_path),
                "--authentication-kubeconfig",
                str(self.kubeconfig_path),
                "--authorization-kubeconfig",
                str(self.kubeconfig_path),
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                str(free_port()),
                "--leader-elect=false",
                "--service-account-private-key-file",
                str(w / "sa.key"),
                "--root-ca-file",
                str(self.ca_file),
                "--use-service-account-credentials=false",
                "--concurrent-gc-syncs",
                "5",
                "-v",
                "1",
            ],
            w,
        ).start()
        return self

    def start_kuberay(self) -> Process:
        """The KubeRay operator of the pinned release, with its release's CRDs, as admin. It reaches
        Ray dashboards through the API server's service proxy (--use-kubernetes-proxy), so that it
        dials nothing but loopback: with no kubelet, no pod has an address and the proxy answers 503."""
        if "kuberay-operator" in self.components and self.components["kuberay-operator"].alive():
            return self.components["kuberay-operator"]
        for name in ("rayclusters", "rayjobs", "rayservices"):
            self.install_crd(kuberay_crd(name))
        proc = Process(
            "kuberay-operator",
            [
                self.bins["KUBERAY_OPERATOR"],
                "--metrics-addr",
                f"127.0.0.1:{free_port()}",
                "--health-probe-bind-address",
                f"127.0.0.1:{free_port()}",
                "--enable-leader-election=false",
                "--use-kubernetes-proxy",
                "--log-stdout-encoder",
                "console",
            ],
            self.workdir,
            env={"KUBECONFIG": str(self.kubeconfig_path)},
        ).start()
        self.components["kuberay-operator"] = proc
        deadline = time.monotonic() + 60
        while "Starting workers" not in proc.logs():
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the KubeRay operator did not start:\n{proc.logs()[-4000:]}")
            time.sleep(0.5)
        return proc

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            api = self.components["kube-apiserver"]
            if not api.alive():
                raise RuntimeError(f"kube-apiserver exited:\n{api.logs()[-4000:]}")
            try:
                if self.ca_file.exists() and self.request("GET", "/readyz", raw=True) == b"ok":
                    return
            except (OSError, KubeAPIError, urllib3.exceptions.HTTPError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"kube-apiserver not ready in {timeout} s:\n{api.logs()[-4000:]}")
            time.sleep(0.5)

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def stop(self) -> None:
        self._close_client()
        for proc in reversed(list(self.components.values())):
            proc.stop()
        self.bridge.down()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def kubeconfig(self, user: str, token: str, server: str | None = None, namespace: str = "default") -> JSON:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [
                {
                    "name": "testbed",
                    "cluster": {"server": server or self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "testbed", "user": user, "namespace": namespace}}],
            "current-context": user,
        }

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.logs()[-3000:]}" for name, p in self.components.items())

    # ----- environment, kubectl -----

    @property
    def env_vars(self) -> dict[str, str]:
        """The admin's KUBECONFIG, for subprocesses that act as the test (kubectl)."""
        return {"KUBECONFIG": str(self.kubeconfig_path)}

    @contextlib.contextmanager
    def env(self) -> Iterator[None]:
        """KUBECONFIG points at this cluster as admin in this process (the kubernetes client, kopf)."""
        old = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(self.kubeconfig_path)
        import kubernetes.config.kube_config as kube_config

        saved = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(self.kubeconfig_path)
        try:
            yield
        finally:
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = saved
            if old is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = old

    def kubectl(
        self,
        *args: str,
        input: str | bytes | None = None,  # noqa: A002 - subprocess.run's name for it
        check: bool = True,
        timeout: float = 60,
        namespace: str | None = None,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess:
        """The real kubectl (built with the API server) as admin, or with another kubeconfig."""
        cmd = [
            self.bins["KUBECTL"],
            f"--kubeconfig={kubeconfig or self.kubeconfig_path}",
            f"--cache-dir={self.workdir / 'kube-cache'}",
        ]
        if namespace is not None:
            cmd.append(f"--namespace={namespace}")
        cmd += [str(a) for a in args]
        env = {**os.environ, "HOME": str(self.workdir)}
        env.pop("KUBECONFIG", None)
        text = input.decode() if isinstance(input, bytes) else input
        result = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(map(str, args))} failed with exit code {result.returncode}:\n"
                f"--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"
            )
        return result

    # ----- the API as admin, through the kubernetes client -----

    def client(self) -> ApiClient:
        """The kubernetes client's ApiClient as admin (made again once the CA file changes)."""
        if self._client is None:
            config = Configuration(
                host=self.url,
                api_key={"BearerToken": self.admin_token},
                api_key_prefix={"BearerToken": "Bearer"},
                ssl_ca_cert=str(self.ca_file),
            )
            self._client = ApiClient(config)
        return self._client

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        raw: bool = False,
        timeout: float = 30,
    ) -> Any:
        """One call at `path` (see `path()`): its JSON answer (`raw`: its bytes), or KubeAPIError. The
        kubernetes client's generic call, so that any kind, a CRD just installed included, and any
        subresource or query (dryRun) is one line for the tests."""
        try:
            response = self.client().call_api(
                path,
                method.upper(),
                query_params=[(k, v) for k, v in (params or {}).items() if v is not None],
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=timeout,
            )
        except ApiException as err:
            raise KubeAPIError(err.status, _parsed(err.body)) from None
        text = response.data
        if raw:
            return text
        return json.loads(text) if text else None

    @staticmethod
    def path(
        group: str,
        version: str,
        plural: str,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> str:
        path = f"/apis/{group}/{version}" if group else f"/api/{version}"
        if namespace:
            path += f"/namespaces/{namespace}"
        path += f"/{plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path

    def get(self, group: str, version: str, plural: str, namespace: str | None, name: str) -> JSON | None:
        try:
            return self.request("GET", self.path(group, version, plural, namespace, name))
        except KubeAPIError as err:
            if err.code == 404:
                return None
            raise

    def list(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[JSON]:
        found = self.request(
            "GET",
            self.path(group, version, plural, namespace),
            params={"labelSelector": label_selector, "fieldSelector": field_selector},
        )
        return list(found["items"])

    def create(
        self, group: str, version: str, plural: str, body: Mapping[str, Any], namespace: str | None = None
    ) -> JSON:
        namespace = namespace or (body.get("metadata") or {}).get("namespace")
        return self.request("POST", self.path(group, version, plural, namespace), dict(body))

    def patch(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str | None = None,
        patch_type: str = "merge",
    ) -> JSON:
        ctype = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "strategic": "application/strategic-merge-patch+json",
        }[patch_type]
        return self.request(
            "PATCH", self.path(group, version, plural, namespace, name, subresource), patch, content_type=ctype
        )

    def patch_status(
        self, group: str, version: str, plural: str, namespace: str | None, name: str, status: Mapping[str, Any]
    ) -> JSON:
        """What a component that owns the status writes (a kubelet for a pod's phase, say)."""
        return self.patch(group, version, plural, namespace, name, {"status": dict(status)}, subresource="status")

    def delete(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str | None,
        name: str,
        *,
        propagation_policy: str | None = None,
    ) -> JSON | None:
        body = {"propagationPolicy": propagation_policy} if propagation_policy else None
        try:
            return self.request("DELETE", self.path(group, version, plural, namespace, name), body)
        except KubeAPIError as err:
            if err.code == 404:
                return None
            raise

    def remove_finalizers(self, group: str, version: str, plural: str, namespace: str | None, name: str) -> None:
        with contextlib.suppress(KubeAPIError):
            self.patch(group, version, plural, namespace, name, {"metadata": {"finalizers": None}})

    def wait_for(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str | None,
        name: str,
        predicate: Callable[[JSON | None], Any] = lambda obj: obj is not None,
        *,
        timeout: float = 10,
        interval: float = 0.1,
    ) -> JSON | None:
        """Poll the object until `predicate(obj or None)` holds; its last state, or AssertionError."""
        deadline = time.monotonic() + timeout
        while True:
            obj = self.get(group, version, plural, namespace, name)
            if predicate(obj):
                return obj
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Timed out in {timeout}s waiting for {plural}/{name} in {namespace!r}; "
                    f"the last state: {json.dumps(obj, indent=2)}"
                )
            time.sleep(interval)

    def wait_for_deletion(
        self, group: str, version: str, plural: str, namespace: str | None, name: str, *, timeout: float = 10
    ) -> None:
        self.wait_for(group, version, plural, namespace, name, lambda obj: obj is None, timeout=timeout)

    def events(self, namespace: str, involved_name: str | None = None) -> list[JSON]:
        found = self.list("", "v1", "events", namespace)
        return [e for e in found if involved_name is None or e["involvedObject"].get("name") == involved_name]

    # ----- namespaces, CRDs, manifests -----

    def create_namespace(self, name: str, *, exist_ok: bool = True) -> JSON:
        try:
            return self.create("", "v1", "namespaces", {"metadata": {"name": name}})
        except KubeAPIError as err:
            if err.code == 409 and exist_ok:
                return self.get("", "v1", "namespaces", None, name) or {}
            raise

    def delete_namespace(self, name: str) -> None:
        """Delete a namespace; the finalizers of its parts and datasets go first, since the operator
        that would remove them may be stopped. The namespace controller removes the rest."""
        for plural in ("laionparts", "laiondatasets"):
            with contextlib.suppress(KubeAPIError):
                for obj in self.list("laion-operator.io", "v1alpha1", plural, name):
                    self.remove_finalizers("laion-operator.io", "v1alpha1", plural, name, obj["metadata"]["name"])
        self.delete("", "v1", "namespaces", None, name)

    def install_crd(self, source: str | os.PathLike | Mapping | Iterable[Mapping]) -> list[str]:
        """Install (or replace) CRDs and wait until the API server serves them (Established). A CRD
        already installed from the same text is left as it is (a digest in an annotation says so)."""
        names = []
        for doc in load_documents(source):
            if doc.get("kind") != "CustomResourceDefinition":
                continue
            name = doc["metadata"]["name"]
            digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
            doc = {
                **doc,
                "metadata": {
                    **doc["metadata"],
                    "annotations": {**(doc["metadata"].get("annotations") or {}), "laion-testbed/digest": digest},
                },
            }
            existing = self.get(*CRD_RESOURCE, None, name)
            if existing is None:
                self.request("POST", self.path(*CRD_RESOURCE), doc)
            elif (existing["metadata"].get("annotations") or {}).get("laion-testbed/digest") != digest:
                doc["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                self.request("PUT", self.path(*CRD_RESOURCE, None, name), doc)
            names.append(name)
        for name in names:
            self.wait_for(
                *CRD_RESOURCE,
                None,
                name,
                lambda o: any(
                    c["type"] == "Established" and c["status"] == "True"
                    for c in ((o or {}).get("status") or {}).get("conditions") or []
                ),
                timeout=30,
            )
        return names

    def apply(self, docs: Iterable[Mapping], namespace: str | None = None) -> None:
        """`kubectl apply` of manifests, as a user or Helm would send them."""
        text = yaml.safe_dump_all([{k: v for k, v in d.items() if not k.startswith("__")} for d in docs])
        args = ["apply", "--server-side", "--force-conflicts", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        self.kubectl(*args, input=text)

    def token(self, service_account: str, namespace: str, duration: str = "24h") -> str:
        """A token of a ServiceAccount, from the TokenRequest API (as a projected volume gets it)."""
        return self.kubectl(
            "create", "token", service_account, "-n", namespace, f"--duration={duration}"
        ).stdout.strip()


def load_documents(source) -> list[JSON]:
    if isinstance(source, Mapping):
        return [dict(source)]
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        text = path.read_text() if path.exists() else str(source)
        return [d for d in yaml.safe_load_all(text) if d]
    return [dict(d) for d in source]
