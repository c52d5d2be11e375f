"""Validating a raw spec as the API server does: the schema (draft 4, unknown fields refused), its
defaults, and the cross-field rules through their Python twins of the CRD's CEL."""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable
from typing import Any

import jsonschema

from ..errors import InputError
from .schema import ENCODE_QUALITY, PNG_MAX_COMPRESSION, SCHEMA
from .schema_archives import JOIN_FIELDS, LOCATIONS, ONE_CAPTION_SOURCE, ONE_LOCATION
from .schema_source import EXACTLY_ONE, KINDS

# --- cross-field rules ----------------------------------------------------------------------------
# The CRD carries them as CEL (`x-kubernetes-validations`, evaluated by the API server); the CLI and
# the operator evaluate the same rules through the Python twin registered here under the rule's
# CEL text, and report the same message at the same field. A CEL library is not a dependency of the
# shared core (the ones on PyPI bring native regex and date libraries or a CLI along); instead
# tests/control/test_cel.py evaluates every rule with both a real CEL implementation and its twin on the
# same objects, so the two cannot drift apart.


def _has(obj: Any, key: str) -> bool:
    return isinstance(obj, dict) and obj.get(key) is not None


RULES: dict[str, Callable[[Any, Any], bool]] = {
    "self == oldSelf": lambda self, old: self == old,
    "has(self.urls) != has(self.pattern)": lambda self, old: _has(self, "urls") != _has(self, "pattern"),
    EXACTLY_ONE: lambda self, old: sum(_has(self, kind) for kind in KINDS) == 1,
    ONE_LOCATION: lambda self, old: sum(_has(self, name) for name in LOCATIONS) == 1,
    ONE_CAPTION_SOURCE: lambda self, old: _has(self, "sidecar") != _has(self, "annotations"),
    JOIN_FIELDS: lambda self, old: not _has(self, "annotations") or (_has(self, "key") and _has(self, "caption")),
    "has(self.urls) || (!has(self.format) && !has(self.header))": lambda self, old: (
        _has(self, "urls") or (not _has(self, "format") and not _has(self, "header"))
    ),
    "!has(self.pattern) || (self.pattern.contains('{part}') && has(self.first) && has(self.last))": lambda self, old: (
        not _has(self, "pattern") or ("{part}" in self["pattern"] and _has(self, "first") and _has(self, "last"))
    ),
    "!has(self.first) || !has(self.last) || self.first <= self.last": lambda self, old: (
        not _has(self, "first") or not _has(self, "last") or self["first"] <= self["last"]
    ),
    f"!has(self.first) || !has(self.last) || self.last - self.first < {1000}": lambda self, old: (
        not _has(self, "first") or not _has(self, "last") or self["last"] - self["first"] < 1000
    ),
    f"!has(self.encodeQuality) || self.encodeFormat != 'png' || self.encodeQuality <= {PNG_MAX_COMPRESSION}": lambda self, old: (
        not _has(self, "encodeQuality")
        or self.get("encodeFormat") != "png"
        or self["encodeQuality"] <= PNG_MAX_COMPRESSION
    ),
}


def rule_errors(value: Any, schema: dict, old: Any = None, path: str = "spec") -> list[str]:
    """Every failing `x-kubernetes-validations` rule under `schema`, as "field: message".

    As the API server: a rule runs only where its value is present, and a transition rule (one that
    reads oldSelf) only where an old value exists too."""
    errors: list[str] = []
    if value is None:
        return errors
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue
        if not RULES[rule["rule"]](value, old):
            errors.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors += rule_errors(
                    value[name], sub, old.get(name) if isinstance(old, dict) else None, f"{path}.{name}"
                )
    return errors


class SpecError(InputError):
    """A part spec that cannot run; the message names the field and what is allowed."""


def _describe(error: jsonschema.ValidationError) -> str:
    path = ".".join(["spec", *[str(p) for p in error.absolute_path]])
    if error.validator == "enum":
        allowed = ", ".join(str(v) for v in error.validator_value)  # type: ignore[union-attr]  # an enum error holds its list
        return f"{path}: {error.instance!r} is not one of the allowed values: {allowed}"
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f"{path}.{missing}: required field is missing"
    if error.validator == "additionalProperties":
        known = ", ".join(sorted(error.schema.get("properties", {})))  # type: ignore[union-attr]  # an object's schema
        return f"{path}: {error.message}; known fields: {known}"
    return f"{path}: {error.message}"


def _closed(schema: dict) -> dict:
    """The schema with unknown fields refused, as the API server prunes them silently, and a list of
    type set without repeats, as it refuses them."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
            stack.extend(node["properties"].values())
        if node.get("type") == "array":
            if node.get("x-kubernetes-list-type") == "set":  # what the API server checks of a set
                node["uniqueItems"] = True
            stack.append(node["items"])
    return schema


def closed_validator(schema: dict) -> jsonschema.Draft4Validator:
    """A validator of `schema` that refuses unknown fields. OpenAPI v3.0, the CRD's dialect, is JSON
    Schema draft 4 (boolean exclusiveMinimum and all)."""
    return jsonschema.Draft4Validator(_closed(schema))


def schema_errors(validator: jsonschema.Draft4Validator, data: Any) -> list[str]:
    """Every schema violation in `data`, as "field: message", in field order."""
    return [_describe(e) for e in sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))]


_VALIDATOR = closed_validator(SCHEMA)


def apply_defaults(data: dict, schema: dict = SCHEMA) -> dict:
    """Fill defaults as the API server does for structural schemas (objects first, then their fields)."""
    out = copy.deepcopy(data)
    for name, sub in schema.get("properties", {}).items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if isinstance(out.get(name), dict) and sub.get("type") == "object":
            out[name] = apply_defaults(out[name], sub)
    return out


def validate(data: Any) -> dict:
    """Validate a raw spec, return it with defaults applied; raise SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"spec: expected a mapping, got {type(data).__name__}")
    messages = schema_errors(_VALIDATOR, data)
    if messages:
        raise SpecError("invalid part spec:\n  " + "\n  ".join(messages))
    spec = apply_defaults(data)
    errors = rule_errors(spec, SCHEMA)  # after defaulting, as the API server evaluates them
    if errors:
        raise SpecError("invalid part spec:\n  " + "\n  ".join(errors))
    download = spec["download"]
    download.setdefault("encodeQuality", ENCODE_QUALITY[download["encodeFormat"]])
    problems = [
        f"spec.download.allowedNetworks[{i}]: {net!r} is not a network in CIDR notation (e.g. 10.0.0.0/8)"
        for i, net in enumerate(download["allowedNetworks"])
        if not _is_network(net)
    ]
    problems += [
        f"spec.download.dnsServers[{i}]: {server!r} is not an IP address, with an optional :port"
        for i, server in enumerate(download["dnsServers"])
        if not _is_server(server)
    ]
    if problems:
        raise SpecError("invalid part spec:\n  " + "\n  ".join(problems))
    return spec


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _is_server(text: str) -> bool:
    """An IP address, or IPv4:port, or [IPv6]:port (as c-ares takes them)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})|([0-9A-Fa-f:.]+)", text)
    if not m:
        return False
    address = m.group(1) or m.group(3) or m.group(5)
    port = m.group(2) or m.group(4)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return port is None or 0 < int(port) < 65536
