"""The LaionDataset spec: many parts from one template, each part's spec made from it."""

from __future__ import annotations

import copy
from typing import Any

from ..contract import part_dir
from . import patterns
from .schema import SCHEMA, boolean
from .schema_source import SOURCE
from .validation import SpecError, apply_defaults, closed_validator, rule_errors, schema_errors

MAX_DATASET_PARTS = 1000
SHARED_SOURCE_FIELDS = ("format", "header")  # copied into each part's source


def _template_schema() -> dict:
    """The part spec without what differs per part (partId, source) or is the dataset's (suspend)."""
    template = copy.deepcopy(SCHEMA)
    for name in ("partId", "source", "suspend"):
        template["properties"].pop(name)
    template["required"] = ["output"]
    template["description"] = (
        "The spec of every part; each part's output goes to <output.uri>/part_<id>, "
        "and a change reaches the parts as a change of their own spec would."
    )
    template["properties"]["output"]["properties"]["uri"]["description"] = (
        "The dataset's folder (local path or s3://bucket/prefix): part <id> writes to <uri>/part_<id>."
    )
    return template


DATASET_SCHEMA: dict = {
    "type": "object",
    "required": ["source", "template"],
    "properties": {
        "source": {
            "type": "object",
            "description": "One part per metadata file: a list of files, or a pattern with a range.",
            "properties": {
                "urls": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_DATASET_PARTS,
                    "description": "Metadata files, one part each; part ids are the positions, from 0.",
                    "items": {"type": "string", "minLength": 1},
                },
                # The pattern's numbers are the part ids.
                **patterns.properties("a metadata file such as s3://laion/2B-en-4.5_{part}.parquet, a part each"),
                # Every part's files are alike: what a part's source says of its files, said once.
                **{name: SOURCE["properties"][name] for name in SHARED_SOURCE_FIELDS},
            },
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.urls) != has(self.pattern)",
                    "message": "set either urls or pattern (with first and last), not both",
                },
                *patterns.rules(),
                {
                    "rule": f"!has(self.first) || !has(self.last) || self.last - self.first < {MAX_DATASET_PARTS}",
                    "message": f"a dataset has at most {MAX_DATASET_PARTS} parts (first to last)",
                },
            ],
        },
        "template": _template_schema(),
        "suspend": boolean(
            "true suspends every part (their jobs stop, finished shards stay); false resumes them.", False
        ),
    },
}

_DATASET_VALIDATOR = closed_validator(DATASET_SCHEMA)


def validate_dataset(data: Any) -> dict:
    """Validate a raw LaionDataset spec, return it with defaults applied; SpecError names every bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"spec: expected a mapping, got {type(data).__name__}")
    errors = schema_errors(_DATASET_VALIDATOR, data)
    if not errors:
        data = apply_defaults(data, DATASET_SCHEMA)
        errors = rule_errors(data, DATASET_SCHEMA)
    if errors:
        raise SpecError("invalid dataset spec:\n  " + "\n  ".join(errors))
    return data


def dataset_parts(data: dict) -> dict[str, dict]:
    """The part specs of a (validated) dataset spec, by part id, in order."""
    source = data["source"]
    digits = source.get("digits", 0)
    if source.get("urls"):
        urls = {f"{i:0{digits}d}": url for i, url in enumerate(source["urls"])}
    else:
        ids = (f"{n:0{digits}d}" for n in range(source["first"], source["last"] + 1))
        urls = dict(zip(ids, patterns.numbered(source["pattern"], source["first"], source["last"], digits)))
    base = data["template"]["output"]["uri"].rstrip("/")
    parts = {}
    for part_id, url in urls.items():
        part = copy.deepcopy(data["template"])
        part["partId"] = part_id
        part["source"] = {"urls": [url], **{k: source[k] for k in SHARED_SOURCE_FIELDS if k in source}}
        part["output"]["uri"] = f"{base}/{part_dir(part_id)}"
        part["suspend"] = bool(data.get("suspend"))
        parts[part_id] = part
    return parts
