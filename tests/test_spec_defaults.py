"""One source for every default: a part parses to the same PartSpec whether the CLI reads it as
written or the Kubernetes API server defaults it first (from the shipped CRD) and the operator
parses what the server stored."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laion_operator.spec import SCHEMA, PartSpec, SpecError
from tests.support.cluster import KubeAPIError

ROOT = Path(__file__).resolve().parents[1]


class ServerRefused(Exception):
    """The API server refused the object at admission (422), with this message."""


_API = []


@pytest.fixture(scope="module", autouse=True)
def api_server(kube_api):
    """The real API server, which applies the shipped CRD's structural defaults (and CEL rules)."""
    kube_api.install_crd(ROOT / "crds" / "laionpart.yaml")
    _API.append(kube_api)
    yield kube_api
    _API.remove(kube_api)


def server_defaulted(spec: dict) -> dict:
    """The spec as the API server would store it: a server-side dry-run create returns it defaulted."""
    api = _API[-1]
    obj = {
        "apiVersion": "laion-operator.io/v1alpha1",
        "kind": "LaionPart",
        "metadata": {"name": "p"},
        "spec": copy.deepcopy(spec),
    }
    try:
        return api.request(
            "POST", api.path("laion-operator.io", "v1alpha1", "laionparts", "default"), obj, params={"dryRun": "All"}
        )["spec"]
    except KubeAPIError as err:
        if err.code == 422:
            raise ServerRefused(err.body.get("message", "")) from None
        raise


def both_parses(spec: dict) -> tuple[PartSpec, PartSpec]:
    return PartSpec.from_dict(spec), PartSpec.from_dict(server_defaulted(spec))


def value_for(schema: dict):
    """A strategy for a valid value of one leaf field of the part schema."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum", 0), min(schema.get("maximum", 10_000), 10_000))
    if kind == "number":
        low, high = schema.get("minimum", 0), schema.get("maximum", 1_000)
        return st.floats(low, high, exclude_min=bool(schema.get("exclusiveMinimum")), allow_nan=False)
    if kind == "array":
        return st.lists(st.sampled_from(["en", "de", "noai", "aesthetic", "url"]), max_size=3, unique=True)
    return st.sampled_from(["a", "b1", "http://127.0.0.1:9/x"])


def section(name: str):
    props = SCHEMA["properties"][name]["properties"]
    leaves = {k: v for k, v in props.items() if v.get("type") != "object"}
    return st.fixed_dictionaries({}, optional={k: value_for(v) for k, v in leaves.items()})


partial_specs = st.fixed_dictionaries(
    {
        "partId": st.sampled_from(["0", "part-7"]),
        "source": st.just({"urls": ["/data/part.parquet"]}),
        "output": st.fixed_dictionaries({"uri": st.sampled_from(["/out", "s3://bucket/prefix"])}),
    },
    optional={"filter": section("filter"), "download": section("download"), "maxRetries": st.integers(0, 100)},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(partial_specs)
def test_cli_and_api_server_paths_give_the_same_part(spec):
    try:
        cli = PartSpec.from_dict(spec)
    except SpecError as err:
        # Refused on the operator's path too: by the API server's admission (a CEL rule), or else
        # with the same message when the operator parses what the server stored.
        try:
            stored = server_defaulted(spec)
        except ServerRefused:
            return
        with pytest.raises(SpecError) as server:
            PartSpec.from_dict(stored)
        assert str(server.value) == str(err)
        return
    assert PartSpec.from_dict(server_defaulted(spec)) == cli


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_parses_the_same_on_both_paths(path):
    spec = yaml.safe_load(path.read_text())["spec"]
    cli, operator = both_parses(spec)
    assert cli == operator


def base(**download) -> dict:
    return {"partId": "0", "source": {"urls": ["/m.parquet"]}, "output": {"uri": "/out"}, "download": download}


def test_png_quality_defaults_to_the_png_level_on_both_paths():
    cli, operator = both_parses(base(encodeFormat="png"))
    assert cli.download.encode_quality == operator.download.encode_quality == 9
    cli, operator = both_parses(base())
    assert cli.download.encode_quality == operator.download.encode_quality == 95


def test_png_quality_above_nine_is_refused_on_both_paths():
    message = "encodeQuality must be at most 9 when encodeFormat is png"
    with pytest.raises(SpecError, match=rf"spec.download: {message}"):
        PartSpec.from_dict(base(encodeFormat="png", encodeQuality=95))
    with pytest.raises(ServerRefused, match=rf"spec.download: Invalid value: {message}"):
        server_defaulted(base(encodeFormat="png", encodeQuality=95))


def test_a_png_part_applied_with_kubectl_parses_as_png(kube_env, kube_namespace, tmp_path):
    """The defect: the API server used to fill encodeQuality 95 into every PNG part."""
    api = kube_env
    api.kubectl("apply", "-f", str(ROOT / "crds" / "laionpart.yaml"))
    manifest = {
        "apiVersion": "laion-operator.io/v1alpha1",
        "kind": "LaionPart",
        "metadata": {"name": "png", "namespace": kube_namespace},
        "spec": base(encodeFormat="png"),
    }
    path = tmp_path / "png.yaml"
    path.write_text(yaml.safe_dump(manifest))
    api.kubectl("apply", "-f", str(path))
    stored = api.get("laion-operator.io", "v1alpha1", "laionparts", kube_namespace, "png")
    assert "encodeQuality" not in stored["spec"]["download"]
    assert PartSpec.from_dict(stored["spec"]).download.encode_quality == 9


def test_dataclasses_carry_no_defaults_of_their_own():
    import dataclasses

    from laion_operator import spec as specs

    for kind in (specs.Filter, specs.Download, specs.Output, specs.PartSpec):
        defaults = [
            f.name
            for f in dataclasses.fields(kind)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        ]
        assert defaults == [], f"{kind.__name__} writes defaults of its own: {defaults}"


def test_a_datasets_parts_read_their_files_as_its_source_says():
    """CC12M-style header-less TSV parts: format and header are said once, for every part."""
    from laion_operator.spec import dataset_parts, validate_dataset

    data = validate_dataset(
        {
            "source": {"pattern": "s3://m/cc12m_{part}.tsv.gz", "first": 0, "last": 2, "format": "tsv"}
            | {"header": ["url", "caption"]},
            "template": {"output": {"uri": "s3://d/cc12m"}},
        }
    )
    parts = {i: PartSpec.from_dict(p) for i, p in dataset_parts(data).items()}
    assert [(p.source, p.source_format, p.source_header) for p in parts.values()] == [
        ((f"s3://m/cc12m_{n}.tsv.gz",), "tsv", ("url", "caption")) for n in range(3)
    ]
    with pytest.raises(SpecError, match="spec.source.format"):
        validate_dataset({"source": {"urls": ["a.csv"], "format": "xlsx"}, "template": {"output": {"uri": "/d"}}})
