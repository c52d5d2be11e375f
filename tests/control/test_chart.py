"""The Helm chart: renders with Helm's own engine, refuses wrong values, yields manifests valid for
Kubernetes, runs the operator under Pod Security "restricted", and grants nothing beyond what the
operator uses. Also: the CRD has one source, and the images agree with the chart and the lock."""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import textwrap
from contextlib import redirect_stdout
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python.errors import HelmRenderError, HelmValuesError
from kubernetes_validate.utils import SchemaNotFoundError

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_DIR = ROOT / "operator"
if str(OPERATOR_DIR) not in sys.path:
    sys.path.insert(0, str(OPERATOR_DIR))

from tests.support.chart import (  # noqa: E402 - once operator/ is on sys.path
    CHART,
    FULLNAME,
    NAMESPACE,
    RELEASE,
    manifests,
    of_kind,
    one,
    operator_config,
    render,
)

# Validate against the oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
# kubernetes-validate knows.
KUBE_VERSIONS = ["1.25", kubernetes_validate.latest_version()]
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Every optional feature on: kuberay mode (RayJob RBAC), credentials, monitoring, two replicas.
ALL_ON = {
    "replicas": 2,
    "credentialsSecrets": ["laion-s3", "laion-minio"],
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {
        "config": {"mode": "kuberay"},
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        "rayAuthTokenSecret": {"name": "raycluster-auth"},
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
    "grafanaDashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "LAION"}},
    "podAnnotations": {"example.com/team": "data"},
    "podLabels": {"team": "data"},
    "priorityClassName": "laion-high",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}
                ]
            }
        }
    },
    "metrics": {"service": {"annotations": {"example.com/scrape": "true"}}},
    "serviceAccount": {"annotations": {"example.com/role": "laion"}},
}
# The same, restricted to two namespaces (Roles instead of a ClusterRole, KopfPeerings per namespace).
NAMESPACED = {**ALL_ON, "watchNamespaces": ["team-a", "team-b"]}
SCENARIOS = {"default": None, "all-on": ALL_ON, "namespaced": NAMESPACED}


def clean(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "__template__"}


_RENDERED: dict[str, dict[str, str]] = {}


def rendered(scenario: str) -> dict[str, str]:
    if scenario not in _RENDERED:
        _RENDERED[scenario] = render(SCENARIOS[scenario])
    return _RENDERED[scenario]


@pytest.fixture(params=list(SCENARIOS), scope="module")
def scenario(request):
    return request.param, manifests(rendered(request.param))


# --- one CRD source ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["LaionPart", "LaionDataset"])
def test_crd_copies_match_the_generator(kind):
    from laion_operator import cli

    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.cmd_crd(argparse.Namespace(kind=kind)) == 0
    name = f"{kind.lower()}.yaml"
    source = (ROOT / "crds" / name).read_text()
    chart_copy = (CHART / "crds" / name).read_text()
    assert source == out.getvalue(), f"crds/{name} is stale: run scripts/sync-crd"
    assert chart_copy == source, f"charts/laion-operator/crds/{name} differs from crds/: run scripts/sync-crd"


def test_chart_ships_the_crds_and_they_are_valid():
    with helm.Chart.load(CHART) as chart:
        crds = [doc for c in chart.crds for doc in yaml.safe_load_all(c["data"]) if doc]
    assert {c["metadata"]["name"] for c in crds} == {
        "laionparts.laion-operator.io",
        "laiondatasets.laion-operator.io",
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    }
    for crd in crds:
        for version in KUBE_VERSIONS:
            problem = None
            try:
                kubernetes_validate.validate(crd, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                problem = f"{err.message} at {'.'.join(map(str, err.absolute_path))}"
            assert problem is None, (
                f"{crd['metadata']['name']} is not a valid CRD for Kubernetes {version} (the API server speaks "
                f"OpenAPI v3.0: e.g. exclusiveMinimum is a boolean beside minimum): {problem}"
            )
    scopes = {c["spec"]["names"]["kind"]: (c["spec"]["group"], c["spec"]["scope"]) for c in crds}
    assert scopes["KopfPeering"] == ("kopf.dev", "Namespaced")
    assert scopes["ClusterKopfPeering"] == ("kopf.dev", "Cluster")


def test_sync_crd_script_is_executable():
    script = ROOT / "scripts" / "sync-crd"
    assert script.stat().st_mode & 0o111
    assert "charts/laion-operator/crds/$file" in script.read_text()
    assert "LaionPart LaionDataset" in script.read_text()


# --- what gets rendered -----------------------------------------------------------------------------


def test_default_values_render_the_operator_only():
    docs = manifests(rendered("default"))
    assert sorted(d["kind"] for d in docs) == sorted(
        [
            "ClusterKopfPeering",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "Service",
            "ServiceAccount",
        ]
    )
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "laion-operator"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == chart_metadata()["appVersion"]


def test_every_optional_feature_renders():
    docs = manifests(rendered("all-on"))
    service = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), "the ServiceMonitor must select the Service"
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": "laion-operator"} in endpoint["relabelings"]
    assert endpoint["honorLabels"] is True

    rule = one(docs, "PrometheusRule")
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    assert rule["metadata"]["labels"]["release"] == "prometheus"

    dashboard = next(d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "LAION"}
    ((name, text),) = dashboard["data"].items()
    assert name.endswith(".json")
    assert json.loads(text) == json.loads((CHART / "files" / "dashboard.json").read_text())

    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "data"
    assert pod["spec"]["priorityClassName"] == "laion-high"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    env = pod["spec"]["containers"][0]["env"]
    assert {"name": "HTTPS_PROXY", "value": "http://proxy:3128"} in env
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in env
    assert {
        "name": "RAY_AUTH_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "raycluster-auth", "key": "auth_token"}},
    } in env
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == operator_config(docs)["peeringName"]


def test_namespaced_install_peers_and_grants_per_namespace():
    docs = manifests(rendered("namespaced"))
    assert not of_kind(docs, "ClusterKopfPeering")
    config = operator_config(docs)
    peerings = of_kind(docs, "KopfPeering")
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings} == {
        ("team-a", config["peeringName"]),
        ("team-b", config["peeringName"]),
    }
    assert {r["metadata"]["namespace"] for r in of_kind(docs, "Role")} == {"team-a", "team-b"}
    assert {b["metadata"]["namespace"] for b in of_kind(docs, "RoleBinding")} == {"team-a", "team-b"}
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--namespace") :] == ["--namespace", "team-a", "--namespace", "team-b"]


def test_without_peering_the_operator_runs_standalone():
    docs = manifests(render({"peering": {"enabled": False}}))
    assert not of_kind(docs, "ClusterKopfPeering") and not of_kind(docs, "KopfPeering")
    assert "--standalone" in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "peeringName" not in operator_config(docs)
    assert not any("peering" in res for rule in rbac_rules(docs) for res in rule[1]["resources"])


def test_two_replicas_without_peering_fail_with_a_clear_message():
    with pytest.raises(HelmRenderError, match=r"replicas: 2 needs peering.enabled: true"):
        render({"replicas": 2, "peering": {"enabled": False}})


# --- the operator's configuration -------------------------------------------------------------------


def test_config_is_mounted_and_passed_with_config():
    docs = manifests(rendered("default"))
    config = operator_config(docs)
    assert config == {
        "mode": "jobs",
        "rayAddress": "http://raycluster-head-svc.ray.svc:8265",
        "maxConcurrentParts": 4,
        "pollSeconds": 10,
        "retryBackoffSeconds": 30,
        "retryBackoffMaxSeconds": 600,
        "allowCredentialsWithoutRayAuth": False,
        "metricsPort": 8080,
        "peeringName": FULLNAME,
    }
    pod = one(docs, "Deployment")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["args"][:2] == ["--config", "/etc/laion-operator/config.yaml"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/laion-operator")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == f"{FULLNAME}-config"
    assert container["ports"] == [{"name": "metrics", "containerPort": config["metricsPort"], "protocol": "TCP"}]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert re.fullmatch(r"[0-9a-f]{64}", pod["metadata"]["annotations"]["checksum/config"])


def test_config_changes_roll_the_pods():
    def checksum(values):
        return one(manifests(render(values)), "Deployment")["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]

    assert checksum(None) != checksum({"operator": {"config": {"maxConcurrentParts": 8}}})


def kuberay_schema() -> dict | None:
    for path in (
        ROOT / "shared" / "kuberay" / "ray.io_rayjobs.yaml",
        ROOT.parent / "shared" / "kuberay" / "ray.io_rayjobs.yaml",
    ):
        if path.exists():
            crd = yaml.load(path.read_text(), Loader=SafeLoader)
            return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return None


def test_kuberay_config_carries_a_valid_rayjob_template():
    docs = manifests(rendered("all-on"))
    config = operator_config(docs)
    assert config["mode"] == "kuberay" and "rayAddress" not in config
    template = config["rayJobTemplate"]
    cluster = template["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"], template["submitterPodTemplate"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert images == {f"laion-operator/ray-worker:{chart_metadata()['appVersion']}"}
    assert cluster["rayVersion"] == locked_version("ray")
    for pod in pods:  # the Ray pods are as restricted as Ray allows (Ray writes to its root filesystem)
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert c["resources"]["requests"] and c["resources"]["limits"]
    schema = kuberay_schema()
    if schema is None:
        pytest.skip("shared/kuberay/ray.io_rayjobs.yaml (KubeRay's RayJob CRD) is not beside the checkout")
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "part-00000"},
        "spec": {**template, "entrypoint": "laion-operator job"},
    }
    jsonschema.validate(rayjob, schema, cls=jsonschema.Draft4Validator)  # OpenAPI v3.0 is draft 4
    assert not pruned_fields(rayjob["spec"], schema["properties"]["spec"]), "the API server would drop these"


def test_a_part_with_latents_gets_the_gpu_worker_group_in_a_valid_rayjob():
    from laion_operator.control.rayjobs import build_rayjob
    from laion_operator.spec import PartSpec

    config = operator_config(manifests(rendered("all-on")))
    group = config["latentsWorkerGroup"]
    container = group["template"]["spec"]["containers"][0]
    assert container["image"] == f"laion-operator/ray-worker:{chart_metadata()['appVersion']}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # what Ray counts as the node's GPUs
    base = {
        "partId": "p",
        "source": {"urls": ["s3://b/p.parquet"]},
        "output": {"uri": "s3://b/out", "credentialsSecret": "laion-s3"},
    }
    latents = {
        **base,
        "latents": {
            "vae": "stabilityai/sdxl-vae",
            "textEncoder": "openai/clip-vit-large-patch14",
            "hubTokenSecret": "hf-token",
        },
    }
    owner = {"namespace": "ns", "name": "p", "uid": "0000-1111"}
    plain = build_rayjob(config["rayJobTemplate"], owner, "j", PartSpec.from_dict(base), "laion-operator job", group)
    assert group["groupName"] not in [g["groupName"] for g in plain["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    rayjob = build_rayjob(
        config["rayJobTemplate"], owner, "j", PartSpec.from_dict(latents), "laion-operator job", group
    )
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]][-1] == group["groupName"]
    containers = [
        c for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]
    ]
    for c in containers:  # the token comes from its Secret, as the storage credentials do
        assert c["envFrom"] == [{"secretRef": {"name": "laion-s3"}}, {"secretRef": {"name": "hf-token"}}]
    assert rayjob["spec"]["entrypoint"] == "laion-operator job"
    schema = kuberay_schema()
    if schema is None:
        pytest.skip("shared/kuberay/ray.io_rayjobs.yaml (KubeRay's RayJob CRD) is not beside the checkout")
    manifest = {k: rayjob[k] for k in ("apiVersion", "kind", "spec")} | {"metadata": {"name": "j"}}
    jsonschema.validate(manifest, schema, cls=jsonschema.Draft4Validator)
    assert not pruned_fields(rayjob["spec"], schema["properties"]["spec"]), "the API server would drop these"


def pruned_fields(obj, schema: dict, path: str = "spec") -> list[str]:
    """Fields of obj that a structural schema does not declare (the API server prunes them silently)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(obj, dict):
        if "properties" not in schema:
            extra = schema.get("additionalProperties")
            return (
                [p for k, v in obj.items() for p in pruned_fields(v, extra, f"{path}.{k}")]
                if isinstance(extra, dict)
                else []
            )
        out = []
        for key, value in obj.items():
            if key not in schema["properties"]:
                out.append(f"{path}.{key}")
            else:
                out.extend(pruned_fields(value, schema["properties"][key], f"{path}.{key}"))
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [p for i, v in enumerate(obj) for p in pruned_fields(v, schema["items"], f"{path}[{i}]")]
    return []


# --- values the schema refuses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, where",
    [
        ({"replicas": -1}, "/replicas"),
        ({"replicas": "two"}, "/replicas"),
        ({"replicaCount": 2}, "'replicaCount' not allowed"),
        ({"operator": {"config": {"mode": "nope"}}}, "/operator/config/mode"),
        ({"operator": {"config": {"maxConcurrentParts": "x"}}}, "/operator/config/maxConcurrentParts"),
        ({"operator": {"config": {"maxConcurrentParts": 0}}}, "/operator/config/maxConcurrentParts"),
        ({"operator": {"config": {"pollSeconds": 0}}}, "/operator/config/pollSeconds"),
        ({"operator": {"config": {"rayAddress": "raycluster-head-svc:8265"}}}, "/operator/config/rayAddress"),
        ({"operator": {"config": {"rayAddress": None}}}, "missing property 'rayAddress'"),
        (
            {"operator": {"config": {"mode": "kuberay", "rayJobTemplate": {"entrypoint": "python x.py"}}}},
            "/operator/config/rayJobTemplate/entrypoint",
        ),
        ({"operator": {"config": {"concurrency": 3}}}, "'concurrency' not allowed"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"repository": ""}}, "/image/repository"),
        ({"credentialsSecrets": ["Not_A_Secret"]}, "/credentialsSecrets/0"),
        ({"credentialsSecrets": "laion-s3"}, "/credentialsSecrets"),
        ({"watchNamespaces": ["Team A"]}, "/watchNamespaces/0"),
        ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "'runAsNonRoot' not allowed"),
        ({"resources": {"limits": None}}, "missing property 'limits'"),
        ({"resources": {"requests": {"cpu": "lots", "memory": "1Gi"}}}, "/resources/requests/cpu"),
        ({"metrics": {"port": 80}}, "/metrics/port"),
        ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
        ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
        ({"updateStrategy": {"type": "BlueGreen"}}, "/updateStrategy/type"),
        ({"operator": {"rayAuthTokenSecret": {"name": "Ray Token"}}}, "/operator/rayAuthTokenSecret/name"),
        ({"operator": {"rayAuthTokenSecret": {"key": ""}}}, "/operator/rayAuthTokenSecret/key"),
    ],
)
def test_schema_refuses_wrong_values(values, where):
    with pytest.raises(HelmValuesError) as err:
        render(values)
    assert where in str(err.value), str(err.value)


def test_helm_lint_finds_no_errors():
    report = helm.lint(CHART, strict=True)
    assert not report["errors"], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report


# --- valid Kubernetes objects -----------------------------------------------------------------------


def _all_manifests():
    for name in SCENARIOS:
        for doc in manifests(rendered(name)):
            yield pytest.param(
                doc, id=f"{name}:{doc['kind']}/{doc['metadata'].get('namespace', '')}/{doc['metadata']['name']}"
            )


CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "a Prometheus Operator CRD kind",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "a Prometheus Operator CRD kind",
    ("kopf.dev/v1", "KopfPeering"): "kopf's peering CRD kind (validated against crds/kopf-peering.yaml)",
    ("kopf.dev/v1", "ClusterKopfPeering"): "kopf's peering CRD kind (validated against crds/kopf-peering.yaml)",
}


@pytest.mark.parametrize("doc", list(_all_manifests()))
def test_manifest_is_valid_kubernetes(doc):
    obj = clean(doc)
    assert isinstance(obj.get("apiVersion"), str) and isinstance(obj.get("kind"), str)
    assert (
        re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63
    )
    key = (obj["apiVersion"], obj["kind"])
    if key in CUSTOM_KINDS:
        for version in KUBE_VERSIONS:
            with pytest.raises(SchemaNotFoundError):
                kubernetes_validate.validate(obj, version, strict=True)
        if obj["kind"].endswith("KopfPeering"):
            crd = next(
                c
                for c in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text())
                if c and c["spec"]["names"]["kind"] == obj["kind"]
            )
            jsonschema.validate(
                obj, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], cls=jsonschema.Draft4Validator
            )  # OpenAPI v3.0 is draft 4
            assert ("namespace" in obj["metadata"]) == (crd["spec"]["scope"] == "Namespaced")
            return
        # No schema for Prometheus Operator kinds offline: check what they carry instead.
        assert isinstance(obj.get("spec"), dict) and obj["metadata"]["namespace"] == NAMESPACE
        if obj["kind"] == "PrometheusRule":
            import subprocess
            import tempfile

            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as rules:
                yaml.safe_dump(obj["spec"], rules)
                rules.flush()
                check = subprocess.run(["promtool", "check", "rules", rules.name], capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
        else:
            endpoint = obj["spec"]["endpoints"][0]
            assert endpoint["path"] == "/metrics" and isinstance(endpoint["port"], str)
            assert obj["spec"]["selector"]["matchLabels"]
        return
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


# --- Pod Security "restricted" ----------------------------------------------------------------------


def test_operator_pod_is_restricted(scenario):
    _, docs = scenario
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] != 0
    assert not any(pod.get(field) for field in ("hostNetwork", "hostPID", "hostIPC"))
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= {"configMap", "emptyDir", "secret", "projected", "downwardAPI"}, volume
    containers = pod["containers"] + pod.get("initContainers", [])
    assert containers
    for c in containers:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc.get("privileged", False) is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sc["readOnlyRootFilesystem"] is True
        assert sc.get("runAsUser", 1) != 0
        assert all("hostPort" not in p for p in c.get("ports", []))
        for kind in ("requests", "limits"):
            assert c["resources"][kind]["cpu"] and c["resources"][kind]["memory"], (c["name"], kind)
        # The read-only root filesystem leaves /tmp (emptyDir) as the only writable place.
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


# --- RBAC: nothing beyond the operator's needs ------------------------------------------------------

# (apiGroup, resource) -> verbs the operator may hold, and why. A rule the templates add beyond these
# fails test_rbac_grants_nothing_beyond_the_allow_list.
ALLOWED = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},  # kopf: resource discovery
    ("", "namespaces"): {"list", "watch"},  # kopf: namespaces coming and going (all namespaces only)
    ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},  # kopf: peering, all namespaces
    ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},  # kopf: peering per namespace
    ("laion-operator.io", "laionparts"): {"get", "list", "watch", "patch", "update", "create", "delete"},  # datasets
    ("laion-operator.io", "laiondatasets"): {"get", "list", "watch", "patch", "update"},
    ("laion-operator.io", "laiondatasets/status"): {"get", "patch", "update"},
    ("laion-operator.io", "laiondatasets/finalizers"): {"update"},  # blockOwnerDeletion on the dataset's parts
    ("laion-operator.io", "laionparts/status"): {"get", "patch", "update"},
    ("laion-operator.io", "laionparts/finalizers"): {"update"},  # kuberay: blockOwnerDeletion on RayJobs
    ("", "events"): {"create"},
    ("", "secrets"): {"get"},  # only with resourceNames = credentialsSecrets
    ("ray.io", "rayjobs"): {"create", "get", "list", "watch", "patch", "delete"},  # kuberay mode only
}
CLUSTER_ONLY = {
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("", "namespaces"),
    ("kopf.dev", "clusterkopfpeerings"),
}


def rbac_rules(docs: list[dict]) -> list[tuple[dict, dict]]:
    return [
        (role, rule) for role in docs if role["kind"] in ("ClusterRole", "Role") for rule in role.get("rules") or []
    ]


def grants(docs: list[dict]) -> dict[tuple[str, str, str], set[str]]:
    """(role kind, group, resource) -> verbs."""
    out: dict[tuple[str, str, str], set[str]] = {}
    for role, rule in rbac_rules(docs):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((role["kind"], group, resource), set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize(
    "values",
    [*SCENARIOS.values(), {"operator": {"config": {"mode": "kuberay"}}}],
    ids=[*SCENARIOS, "kuberay-no-secrets"],
)
def test_rbac_grants_nothing_beyond_the_allow_list(values):
    values = values or {}
    docs = manifests(render(values))
    assert not [r for r in docs if r["kind"] in ("ClusterRole", "Role") and r.get("aggregationRule")]
    for role, rule in rbac_rules(docs):
        where = f"{role['kind']} {role['metadata']['name']}: {rule}"
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, where  # no nonResourceURLs
        assert rule["apiGroups"] and rule["resources"] and rule["verbs"], where
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in group + resource and "*" not in rule["verbs"], where
                allowed = ALLOWED.get((group, resource))
                assert allowed is not None, f"not on the allow-list: {where}"
                assert set(rule["verbs"]) <= allowed, f"verbs beyond {sorted(allowed)}: {where}"
                if (group, resource) == ("", "secrets"):
                    assert rule.get("resourceNames") == values.get("credentialsSecrets"), where
                else:
                    assert "resourceNames" not in rule, where
                if (group, resource) in CLUSTER_ONLY:
                    assert role["kind"] == "ClusterRole", where
                if (group, resource) == ("kopf.dev", "kopfpeerings"):
                    assert role["kind"] == "Role", where

    got = grants(docs)
    mode = values.get("operator", {}).get("config", {}).get("mode", "jobs")
    ray = {k for k in got if k[1] == "ray.io" or k[2] == "laionparts/finalizers"}
    assert bool(ray) == (mode == "kuberay"), "RayJob rights exactly in kuberay mode"
    assert any(k[2] == "secrets" for k in got) == bool(values.get("credentialsSecrets"))
    namespaces = values.get("watchNamespaces")
    if namespaces:
        # A ClusterRole for CRD discovery only; everything else is granted per watched namespace.
        assert {k for k in got if k[0] == "ClusterRole"} == {
            ("ClusterRole", "apiextensions.k8s.io", "customresourcedefinitions")
        }
        assert {r["metadata"]["namespace"] for r in of_kind(docs, "Role")} == set(namespaces)
    else:
        assert not of_kind(docs, "Role")
    # What the operator needs is there (the allow-list is not just an upper bound on nothing).
    scope = "Role" if namespaces else "ClusterRole"
    assert got[(scope, "laion-operator.io", "laionparts")] == {
        "get",
        "list",
        "watch",
        "patch",
        "update",
        "create",
        "delete",
    }
    assert got[(scope, "laion-operator.io", "laiondatasets")] == {"get", "list", "watch", "patch", "update"}
    assert got[(scope, "laion-operator.io", "laiondatasets/status")] == {"get", "patch", "update"}
    assert got[(scope, "laion-operator.io", "laionparts/status")] == {"get", "patch", "update"}
    assert got[(scope, "", "events")] == {"create"}
    assert got[("ClusterRole", "apiextensions.k8s.io", "customresourcedefinitions")] == {"list", "watch"}
    peering = (scope, "kopf.dev", "kopfpeerings" if namespaces else "clusterkopfpeerings")
    assert got[peering] == {"get", "list", "watch", "patch"}


def test_bindings_bind_only_the_chart_roles_to_its_service_account(scenario):
    _, docs = scenario
    account = one(docs, "ServiceAccount")
    roles = {
        (r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"])
        for r in docs
        if r["kind"] in ("ClusterRole", "Role")
    }
    bindings = of_kind(docs, "ClusterRoleBinding") + of_kind(docs, "RoleBinding")
    assert bindings
    for b in bindings:
        ref = b["roleRef"]
        namespace = b["metadata"].get("namespace") if ref["kind"] == "Role" else None
        assert (ref["kind"], namespace, ref["name"]) in roles, b
        assert b["subjects"] == [
            {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
        ]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


# --- NOTES.txt --------------------------------------------------------------------------------------


def test_notes_show_a_first_part_that_the_crd_accepts():
    notes = rendered("default")["laion-operator/templates/NOTES.txt"]
    block = re.search(r"kubectl apply -f - <<'EOF'\n(.*?)\n\s*EOF", notes, re.S)
    assert block, notes
    part = yaml.safe_load(textwrap.dedent(block.group(1)))
    assert part["apiVersion"] == "laion-operator.io/v1alpha1" and part["kind"] == "LaionPart"
    crd = yaml.safe_load((ROOT / "crds" / "laionpart.yaml").read_text())
    jsonschema.validate(
        part, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], cls=jsonschema.Draft4Validator
    )  # OpenAPI v3.0 is draft 4
    secret = part["spec"]["output"]["credentialsSecret"]
    assert f"create secret generic {secret}" in notes
    assert f"credentialsSecrets={{{secret}}}" in notes, "NOTES must say how to let the operator read it"
    assert "kubectl -n default get laionparts" in notes


# --- images -----------------------------------------------------------------------------------------


def chart_metadata() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def locked_version(package: str) -> str:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in requirements.lock")


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "images" / name / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def make_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(\S+)\s*$", (ROOT / "images" / "Makefile").read_text(), re.M)
    assert match, f"images/Makefile sets no {name}"
    return match.group(1)


def dockerfile_args(name: str) -> dict[str, str]:
    return {a.split("=", 1)[0]: a.split("=", 1)[1] for ins, a in dockerfile(name) if ins == "ARG" and "=" in a}


def stage_bases(name: str) -> list[str]:
    """Each stage's FROM, less the stages built on an earlier stage of the same Dockerfile."""
    bases, stages = [], set()
    for ins, args in dockerfile(name):
        if ins == "FROM":
            words = args.split()
            if words[0] not in stages:
                bases.append(words[0])
            if len(words) == 3:
                stages.add(words[2])
    return bases


def test_ray_image_follows_the_locked_ray_version():
    # RAY_IMAGE: scripts/build-images --local-bases passes a Ray base of its own (images/ray-base)
    base = dockerfile_args("ray-worker")["RAY_IMAGE"]
    assert base == f"rayproject/ray:{locked_version('ray')}-py{sys.version_info.major}{sys.version_info.minor}"
    assert set(stage_bases("ray-worker")) == {"${RAY_IMAGE}"}


def test_operator_image_base_is_pinned():
    base = dockerfile_args("operator")["PYTHON_IMAGE"]
    assert re.fullmatch(rf"python:{sys.version_info.major}\.{sys.version_info.minor}\.\d+-slim(-\w+)?", base), base
    assert set(stage_bases("operator")) == {"${PYTHON_IMAGE}"}


@pytest.mark.parametrize("name, uid", [("operator", 10001), ("ray-worker", 1000)])
def test_images_run_as_non_root_with_locked_packages(name, uid):
    instructions = dockerfile(name)
    users = [a for ins, a in instructions if ins == "USER"]
    assert users and users[-1].split(":")[0] == str(uid), users
    pip = [a for ins, a in instructions if ins == "RUN" and "pip install" in a]
    assert pip
    for command in pip:
        for install in re.findall(r"pip install[^&;]*", command):
            assert "-c " in install and "requirements.lock" in install, install
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if name == "operator":
        assert values["podSecurityContext"]["runAsUser"] == uid
        entrypoint = [a for ins, a in instructions if ins == "ENTRYPOINT"]
        assert [json.loads(e) for e in entrypoint] == [["laion-operator", "operator"]]
    else:
        template = values["operator"]["config"]["rayJobTemplate"]["rayClusterSpec"]
        job = values["operator"]["config"]["rayJobTemplate"]
        pods = [template["headGroupSpec"]["template"], job["submitterPodTemplate"]] + [
            g["template"] for g in template["workerGroupSpecs"]
        ]
        assert {p["spec"]["securityContext"]["runAsUser"] for p in pods} == {uid}


def test_chart_image_references_match_the_images():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["repository"] == make_variable("OPERATOR_IMAGE")
    assert values["rayWorkerImage"]["repository"] == make_variable("RAY_WORKER_IMAGE")
    assert values["image"]["tag"] == values["rayWorkerImage"]["tag"] == ""  # i.e. the appVersion
    version = re.search(r'^version = "(.*)"', (OPERATOR_DIR / "pyproject.toml").read_text(), re.M).group(1)
    assert chart_metadata()["appVersion"] == version
    docs = manifests(rendered("default"))
    image = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{make_variable('OPERATOR_IMAGE')}:{version}"
