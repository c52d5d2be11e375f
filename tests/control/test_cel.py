"""The CRDs' CEL validation rules: the API server (the test API server, with a real CEL library) and the
CLI (spec/validation.py's Python twin of each rule) accept and refuse the same specs, with the same message at
the same field."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import cel
import pytest
import yaml

from laion_operator import spec as specs

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION = "laion-operator.io", "v1alpha1"


def rules_of(schema: dict, path: str = "spec"):
    """(field path, rule) for every x-kubernetes-validations rule under a schema."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule
    for name, sub in schema.get("properties", {}).items():
        yield from rules_of(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from rules_of(schema["items"], f"{path}[]")


ALL_RULES = list(rules_of(specs.SCHEMA)) + list(rules_of(specs.DATASET_SCHEMA, "dataset.spec"))

# Values each rule's node can hold: every combination that matters to the rules there.
SAMPLES = {
    "download": [
        dict(d, encodeFormat=f)
        for f in specs.ENCODE_FORMATS
        for d in ({}, {"encodeQuality": 0}, {"encodeQuality": 9}, {"encodeQuality": 10}, {"encodeQuality": 95})
    ],
    "partId": ["0", "00001", "a.b"],
    "source": [
        {"urls": ["a"]},
        {"pattern": "x_{part}.parquet", "first": 1, "last": 64},
        {"pattern": "x.parquet", "first": 1, "last": 64},
        {"pattern": "x_{part}", "first": 1},
        {"pattern": "x_{part}", "last": 3},
        {"urls": ["a"], "pattern": "x_{part}", "first": 0, "last": 0},
        {},
        {"pattern": "x_{part}", "first": 5, "last": 4},
        {"pattern": "x_{part}", "first": 0, "last": 999},
        {"pattern": "x_{part}", "first": 0, "last": 1000},
        {"urls": ["a"], "first": 3, "last": 1},
        {"dataset": {"uri": "/d"}},
        {"urls": ["a"], "dataset": {"uri": "/d"}},
        {"urls": ["a"], "format": "tsv", "header": ["url", "caption"]},
        {"dataset": {"uri": "/d"}, "format": "csv"},
        {"dataset": {"uri": "/d"}, "header": ["url"]},
        {"archives": {"urls": ["a.tar"]}},
        {"archives": {"urls": ["a.tar"]}, "urls": ["a"]},
    ],
    "archives": [
        {"urls": ["a.tar"]},
        {"links": "l.tsv"},
        {"urls": ["a.tar"], "links": "l.tsv"},
        {},
        {"pattern": "imgs/{part}.tgz", "first": 0, "last": 199},
        {"pattern": "imgs/{part}.tgz", "first": 5, "last": 4},
        {"pattern": "imgs/all.tgz", "first": 0, "last": 1},
        {"pattern": "imgs/{part}.tgz", "first": 0},
    ],
    "embedded": [
        {"urls": ["a.parquet"]},
        {"pattern": "train-{part}.parquet", "first": 0, "last": 12},
        {"urls": ["a.parquet"], "pattern": "train-{part}.parquet", "first": 0, "last": 1},
        {},
        {"pattern": "train-{part}.parquet", "first": 3, "last": 1},
        {"pattern": "train.parquet", "first": 0, "last": 1},
    ],
    "captions": [
        {"sidecar": "txt"},
        {"annotations": "a.jsonl", "key": "img_path", "caption": "prompt"},
        {"annotations": "a.jsonl", "key": "img_path"},
        {"sidecar": "json", "annotations": "a.jsonl"},
        {},
    ],
}


def test_every_rule_has_a_python_twin_and_samples():
    assert len(ALL_RULES) >= 6
    for path, rule in ALL_RULES:
        assert rule["rule"] in specs.RULES, f"{path}: rule {rule['rule']!r} has no Python twin in spec.RULES"
        assert rule.get("message"), f"{path}: rule {rule['rule']!r} has no message"
        assert path.rsplit(".", 1)[-1] in SAMPLES, f"{path}: no sample values to check its rules with"


@pytest.mark.parametrize("path,rule", ALL_RULES, ids=[f"{p}:{r['rule'][:40]}" for p, r in ALL_RULES])
def test_cel_and_its_python_twin_agree(path, rule):
    samples = SAMPLES[path.rsplit(".", 1)[-1]]
    verdicts = set()
    for value, old in itertools.product(samples, samples if "oldSelf" in rule["rule"] else [None]):
        context = {"self": value} if old is None else {"self": value, "oldSelf": old}
        expected = cel.evaluate(rule["rule"], context)
        assert specs.RULES[rule["rule"]](value, old) == expected, f"{rule['rule']} on {context}"
        verdicts.add(expected)
    assert verdicts == {True, False}, f"the samples of {path} do not exercise {rule['rule']!r} both ways"


def part(name: str, **download) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LaionPart",
        "metadata": {"name": name},
        "spec": {
            "partId": "00001",
            "source": {"urls": ["/data/p.parquet"]},
            "output": {"uri": "/tmp/out"},
            "download": download,
        },
    }


@pytest.fixture(scope="module")
def api(kube_api):
    kube_api.install_crd(ROOT / "crds" / "laionpart.yaml")
    kube_api.install_crd(ROOT / "crds" / "laiondataset.yaml")
    return kube_api


def test_api_server_and_cli_refuse_png_quality_above_9_with_the_same_message(api, kube_namespace, tmp_path):
    doc = part("png", encodeFormat="png", encodeQuality=50)
    result = api.kubectl("apply", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(doc), check=False)
    rule = specs.SCHEMA["properties"]["download"]["x-kubernetes-validations"][0]
    assert result.returncode != 0
    assert f'The LaionPart "png" is invalid: spec.download: Invalid value: {rule["message"]}' in result.stderr
    path = tmp_path / "png.yaml"
    path.write_text(yaml.safe_dump(doc))
    cli = subprocess.run(
        [sys.executable, "-m", "laion_operator.cli", "run", str(path), "--dry-run"], capture_output=True, text=True
    )
    assert cli.returncode == 2
    assert f"spec.download: {rule['message']}" in cli.stderr
    # The same rule lets a PNG level and a JPEG quality through.
    for name, download in (
        ("png-ok", {"encodeFormat": "png", "encodeQuality": 9}),
        ("jpg-ok", {"encodeFormat": "jpg", "encodeQuality": 50}),
    ):
        ok = api.kubectl(
            "apply", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(part(name, **download)), check=False
        )
        assert ok.returncode == 0, ok.stderr


def test_part_id_is_immutable(api, kube_namespace):
    doc = part("fixed")
    assert api.kubectl("apply", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(doc)).returncode == 0
    result = api.kubectl(
        "patch",
        "-n",
        kube_namespace,
        "laionpart",
        "fixed",
        "--type=merge",
        "-p",
        '{"spec": {"partId": "00002"}}',
        check=False,
    )
    assert result.returncode != 0
    assert 'spec.partId: Invalid value: "00002": partId is immutable' in result.stderr
    assert api.get(GROUP, VERSION, "laionparts", kube_namespace, "fixed")["spec"]["partId"] == "00001"
    # Other fields still change (the rule compares partId only).
    ok = api.kubectl(
        "patch",
        "-n",
        kube_namespace,
        "laionpart",
        "fixed",
        "--type=merge",
        "-p",
        '{"spec": {"priority": 5}}',
        check=False,
    )
    assert ok.returncode == 0, ok.stderr


def dataset(name: str, source: dict) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LaionDataset",
        "metadata": {"name": name},
        "spec": {"source": source, "template": {"output": {"uri": "/tmp/ds"}}},
    }


@pytest.mark.parametrize(
    "source,field,message",
    [
        (
            {"urls": ["a"], "pattern": "x_{part}", "first": 1, "last": 2},
            "spec.source",
            "set either urls or pattern (with first and last), not both",
        ),
        (
            {"pattern": "x.parquet", "first": 1, "last": 2},
            "spec.source",
            "a pattern needs {part} in it, and first and last",
        ),
        ({"pattern": "x_{part}.parquet", "first": 9, "last": 2}, "spec.source", "first must not be above last"),
        (
            {"pattern": "x_{part}.parquet", "first": 0, "last": 5000},
            "spec.source",
            "a dataset has at most 1000 parts (first to last)",
        ),
    ],
)
def test_dataset_source_rules(api, kube_namespace, source, field, message):
    result = api.kubectl(
        "apply", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(dataset("bad", source)), check=False
    )
    assert result.returncode != 0
    assert f"{field}: Invalid value: {message}" in result.stderr
    with pytest.raises(specs.SpecError) as err:
        specs.validate_dataset(dataset("bad", source)["spec"])
    assert f"{field}: {message}" in str(err.value)


def test_api_server_answers_422_with_causes(api, kube_namespace):
    from tests.support.cluster import KubeAPIError

    with pytest.raises(KubeAPIError) as err:
        api.create(
            GROUP,
            VERSION,
            "laiondatasets",
            dataset("bad", {"pattern": "x_{part}", "first": 3, "last": 1}),
            namespace=kube_namespace,
        )
    assert err.value.code == 422
    body = err.value.body
    assert body["reason"] == "Invalid"
    assert body["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "field": "spec.source",
            "message": "Invalid value: first must not be above last",
        }
    ]


def test_dataset_example_is_valid_and_makes_64_parts(api, kube_namespace):
    doc = yaml.safe_load((ROOT / "examples" / "datasets" / "laion2b-en-aesthetics.yaml").read_text())
    parts = specs.dataset_parts(specs.validate_dataset(doc["spec"]))
    assert list(parts) == [str(n) for n in range(64)]
    assert parts["7"]["source"]["urls"] == ["s3://laion-metadata/laion2B-en-aesthetic/2B-en-4.5_7.parquet"]
    assert parts["7"]["output"]["uri"] == "s3://laion-datasets/2B-en-4.5/part_7"
    assert all(specs.PartSpec.from_dict(p).part_id == i for i, p in parts.items())
    result = api.kubectl(
        "apply", "--dry-run=server", "-n", kube_namespace, "-f", "-", input=yaml.safe_dump(doc), check=False
    )
    assert result.returncode == 0, result.stderr
