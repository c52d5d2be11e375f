"""The operator on a real control plane: the chart's RBAC enforced by kube-apiserver, the CRDs as the
API server admits them, printer columns and Events through the real kubectl, and garbage collection
by kube-controller-manager."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from laion_operator.testbed.demo_data import write_metadata
from tests.support.chart import NAMESPACE, installed, one
from tests.support.cluster import KubeAPIError
from tests.support.kinds import GROUP, PLURAL, VERSION
from tests.support.operator_proc import operator_starter
from tests.support.specs import laionpart

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def metadata(tmp_path_factory, image_server):
    path = tmp_path_factory.mktemp("meta") / "part.parquet"
    write_metadata(path, 30, image_server.base_url, seed=61, failure_mix={"ok": 0.8, "http_4xx": 0.2})
    return path


def test_the_operator_acts_as_the_charts_service_account_only(kube_api, kube_namespace):
    kubeconfig = Path(kube_api.operator_env["KUBECONFIG"])
    who = json.loads(kube_api.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{NAMESPACE}:laion-laion-operator"

    def can(*args: str) -> bool:
        out = kube_api.kubectl("auth", "can-i", *args, "-n", kube_namespace, kubeconfig=kubeconfig, check=False)
        return out.stdout.strip() == "yes"

    assert can("patch", "laionparts.laion-operator.io/status") and can("create", "events")
    assert not can("get", "secrets") and not can("delete", "pods") and not can("create", "rayjobs.ray.io")


def without_verb(resource: str, verb: str):
    """An edit of the rendered chart: `verb` taken away from the ClusterRole rule for `resource`."""

    def edit(docs: list[dict]) -> None:
        role = one(docs, "ClusterRole")
        for rule in role["rules"]:
            if resource in rule.get("resources", []):
                rule["verbs"] = [v for v in rule["verbs"] if v != verb]

    return edit


def test_a_verb_the_cluster_role_lacks_fails_with_a_message_naming_it(
    kube_api, ray_cluster, kube_namespace, metadata, tmp_path
):
    with (
        installed(kube_api, edit=without_verb("laionparts/status", "patch")) as env,
        operator_starter(tmp_path, kube_api, ray_cluster) as start,
    ):
        op = start(env=env)
        kube_api.kubectl(
            "apply",
            "-n",
            kube_namespace,
            "-f",
            "-",
            input=yaml.safe_dump(laionpart("forbidden", metadata, tmp_path / "out")),
        )
        deadline = time.monotonic() + 60
        while "cannot patch resource" not in op.logs():
            assert time.monotonic() < deadline, op.logs()
            time.sleep(0.5)
        line = next(entry for entry in op.logs().splitlines() if "cannot patch resource" in entry)
        assert '"laionparts/status"' in line and "forbidden" in line.lower(), line
        assert f"system:serviceaccount:{NAMESPACE}:laion-laion-operator" in line, line
        # Nothing was written that the role does not allow: the part has no status.
        assert not (kube_api.get(GROUP, VERSION, PLURAL, kube_namespace, "forbidden").get("status") or {}).get("phase")


def test_the_api_server_admits_the_crds_as_written(kube_api):
    """A schema the API server prunes, defaults it drops or a CEL rule over its cost budget would show
    here: the stored CRD is the file, and both kinds are served."""
    for name in ("laionpart", "laiondataset"):
        written = yaml.safe_load((ROOT / "crds" / f"{name}.yaml").read_text())
        stored = kube_api.get(
            "apiextensions.k8s.io", "v1", "customresourcedefinitions", None, written["metadata"]["name"]
        )
        conditions = {c["type"]: c for c in stored["status"]["conditions"]}
        assert conditions["Established"]["status"] == "True", conditions
        assert conditions["NamesAccepted"]["status"] == "True", conditions
        assert "NonStructuralSchema" not in conditions, conditions["NonStructuralSchema"]["message"]
        assert stored["spec"]["versions"] == written["spec"]["versions"]
        dry = kube_api.kubectl("apply", "--dry-run=server", "--server-side", "-f", str(ROOT / "crds" / f"{name}.yaml"))
        assert "serverside-applied" in dry.stdout or "unchanged" in dry.stdout, dry.stdout


def test_a_crd_the_api_server_refuses_is_refused(kube_api):
    """The check above is not vacuous: the same API server refuses a CEL rule without a cost bound."""
    crd = yaml.safe_load((ROOT / "crds" / "laionpart.yaml").read_text())
    crd["metadata"]["name"] = "costlyparts.laion-operator.io"
    crd["spec"]["names"] = {
        "kind": "CostlyPart",
        "plural": "costlyparts",
        "singular": "costlypart",
        "listKind": "CostlyPartList",
    }
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    schema["properties"]["tags"] = {"type": "array", "items": {"type": "string"}}
    schema.setdefault("x-kubernetes-validations", []).append(
        {"rule": "self.tags.all(a, self.tags.all(b, self.tags.all(c, a + b + c != '')))", "message": "costly"}
    )
    with pytest.raises(KubeAPIError) as err:
        kube_api.install_crd(crd)
    assert err.value.code == 422 and "cost" in json.dumps(err.value.body).lower(), err.value.body


def test_printer_columns_and_events_through_kubectl(kube_api, ray_cluster, kube_namespace, metadata, tmp_path):
    with operator_starter(tmp_path, kube_api, ray_cluster) as start:
        start()
        kube_api.kubectl(
            "apply",
            "-n",
            kube_namespace,
            "-f",
            "-",
            input=yaml.safe_dump(laionpart("shown", metadata, tmp_path / "out")),
        )
        kube_api.wait_for(
            GROUP,
            VERSION,
            PLURAL,
            kube_namespace,
            "shown",
            lambda o: (o.get("status") or {}).get("phase") in ("Succeeded", "Failed"),
            timeout=240,
        )
        table = kube_api.kubectl("get", "lp", "-n", kube_namespace).stdout.splitlines()
        crd = yaml.safe_load((ROOT / "crds" / "laionpart.yaml").read_text())
        columns = [
            c["name"].upper() for c in crd["spec"]["versions"][0]["additionalPrinterColumns"] if not c.get("priority")
        ]  # the others show with -o wide
        assert table[0].split() == ["NAME", *[w for c in columns for w in c.split()]], table[0]
        assert table[1].split()[0] == "shown" and "Succeeded" in table[1].split(), table
        # Events posted by the operator show in `kubectl describe`, from the real events API.
        described = kube_api.kubectl("describe", "lp", "shown", "-n", kube_namespace).stdout
        events = described.split("Events:", 1)[1]
        assert "Submitted" in events or "Succeeded" in events, described


def test_a_deleted_dataset_takes_its_parts_by_garbage_collection(
    kube_api, ray_cluster, kube_namespace, metadata, tmp_path
):
    """The controller-manager's garbage collector deletes a dataset's parts (their ownerReferences):
    the operator's handler of a dataset's deletion deletes nothing."""
    doc = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LaionDataset",
        "metadata": {"name": "gc"},
        "spec": {
            "source": {"urls": [str(metadata)]},
            "suspend": True,
            "template": {
                "output": {"uri": str(tmp_path / "ds")},
                "filter": {"samplesPerShard": 10},
                "download": {"allowedNetworks": ["127.0.0.0/8"]},
            },
        },
    }
    with operator_starter(tmp_path, kube_api, ray_cluster) as start:
        start()
        kube_api.kubectl("apply", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(doc))
        deadline = time.monotonic() + 60
        while not kube_api.list(GROUP, VERSION, PLURAL, kube_namespace, label_selector=f"{GROUP}/dataset=gc"):
            assert time.monotonic() < deadline, "the dataset made no part"
            time.sleep(0.5)
        parts = kube_api.list(GROUP, VERSION, PLURAL, kube_namespace, label_selector=f"{GROUP}/dataset=gc")
        owner = parts[0]["metadata"]["ownerReferences"][0]
        crd = yaml.safe_load((ROOT / "crds" / "laiondataset.yaml").read_text())
        columns = [
            c["name"].upper() for c in crd["spec"]["versions"][0]["additionalPrinterColumns"] if not c.get("priority")
        ]  # the others show with -o wide
        header = kube_api.kubectl("get", "lds", "-n", kube_namespace).stdout.splitlines()[0]
        assert header.split() == ["NAME", *[w for c in columns for w in c.split()]], header
        assert owner["kind"] == "LaionDataset" and owner["name"] == "gc"
        kube_api.kubectl("delete", "lds", "gc", "-n", kube_namespace, "--wait=false")
        deadline = time.monotonic() + 90
        while kube_api.list(GROUP, VERSION, PLURAL, kube_namespace):
            assert time.monotonic() < deadline, kube_api.list(GROUP, VERSION, PLURAL, kube_namespace)
            time.sleep(0.5)
