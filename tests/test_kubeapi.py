# ruff: noqa: F811 -- the fixtures imported from tests.support.kube_fixtures are redefined as arguments
"""
The test Kubernetes API (kmock's emulator + tests/support/kubeapi.py) behaves like a real API server
for what kopf, kubectl, and the operator rely on.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import kmock
import kopf
import pytest
import yaml
from kopf._core.intents.registries import SmartOperatorRegistry
from kopf.testing import KopfRunner

from tests.support.kubeapi import KubeAPIError, TestAPIServer, kubectl_path

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO.parent / 'shared' / 'kuberay'

GROUP, VERSION, PLURAL = 'kubeapitest.example.com', 'v1', 'widgets'
WIDGET_CRD = {
    'apiVersion': 'apiextensions.k8s.io/v1',
    'kind': 'CustomResourceDefinition',
    'metadata': {'name': f'{PLURAL}.{GROUP}'},
    'spec': {
        'group': GROUP,
        'scope': 'Namespaced',
        'names': {'plural': PLURAL, 'singular': 'widget', 'kind': 'Widget', 'shortNames': ['wd']},
        'versions': [{
            'name': VERSION, 'served': True, 'storage': True,
            'subresources': {'status': {}},
            'additionalPrinterColumns': [
                {'name': 'Phase', 'type': 'string', 'jsonPath': '.status.phase'},
                {'name': 'Width', 'type': 'integer', 'jsonPath': '.spec.filter.minWidth'},
                {'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'},
            ],
            'schema': {'openAPIV3Schema': {
                'type': 'object',
                'required': ['spec'],
                'properties': {
                    'spec': {
                        'type': 'object',
                        'required': ['source'],
                        'properties': {
                            'source': {'type': 'string', 'minLength': 1},
                            'replicas': {'type': 'integer', 'minimum': 0, 'default': 1},
                            'mode': {'type': 'string', 'enum': ['fast', 'slow'], 'default': 'fast'},
                            'size': {'x-kubernetes-int-or-string': True,
                                     'anyOf': [{'type': 'integer'}, {'type': 'string'}]},
                            'note': {'type': 'string', 'nullable': True},
                            'filter': {
                                'type': 'object',
                                'default': {},
                                'properties': {
                                    'minWidth': {'type': 'integer', 'minimum': 0, 'default': 64},
                                    'formats': {'type': 'array', 'items': {'type': 'string'}, 'maxItems': 3},
                                },
                            },
                            'extra': {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True},
                        },
                    },
                    'status': {'type': 'object', 'x-kubernetes-preserve-unknown-fields': True,
                               'properties': {'phase': {'type': 'string'}}},
                },
            }},
        }],
    },
}


def widget(name: str, **spec: object) -> dict:
    return {'apiVersion': f'{GROUP}/{VERSION}', 'kind': 'Widget', 'metadata': {'name': name},
            'spec': {'source': 's3://bucket/part-00000', **spec}}


@pytest.fixture(scope='module')
def widgets(kube_api: TestAPIServer) -> TestAPIServer:
    kube_api.install_crd(WIDGET_CRD)
    return kube_api


def test_discovery_and_openapi(widgets: TestAPIServer) -> None:
    resources = widgets.kubectl('api-resources', '-o', 'name').stdout.split()
    for name in ('namespaces', 'events', 'secrets', 'configmaps', 'customresourcedefinitions.apiextensions.k8s.io',
                 f'{PLURAL}.{GROUP}'):
        assert name in resources
    core = widgets.request('GET', '/api/v1')
    assert core['groupVersion'] == 'v1'
    assert {'name': 'widgets/status'}.items() <= next(
        r for r in widgets.request('GET', f'/apis/{GROUP}/{VERSION}')['resources'] if r['name'] == 'widgets/status'
    ).items()
    index = widgets.request('GET', '/openapi/v3')['paths']
    doc = widgets.request('GET', index[f'apis/{GROUP}/{VERSION}']['serverRelativeURL'])
    schema = doc['components']['schemas'][f'com.example.kubeapitest.{VERSION}.Widget']
    assert schema['x-kubernetes-group-version-kind'] == [{'group': GROUP, 'version': VERSION, 'kind': 'Widget'}]


def test_kubectl_apply_get_delete(widgets: TestAPIServer, kube_namespace: str) -> None:
    ns = kube_namespace
    manifest = yaml.safe_dump(widget('w1', replicas=2))
    out = widgets.kubectl('apply', '-f', '-', '-n', ns, input=manifest)  # no --validate=false needed
    assert 'widget.kubeapitest.example.com/w1 created' in out.stdout

    obj = json.loads(widgets.kubectl('get', 'widget', 'w1', '-n', ns, '-o', 'json').stdout)
    meta = obj['metadata']
    assert meta['generation'] == 1
    assert meta['uid'] and meta['creationTimestamp'] and int(meta['resourceVersion']) > 0
    assert obj['spec'] == {'source': 's3://bucket/part-00000', 'replicas': 2, 'mode': 'fast',
                           'filter': {'minWidth': 64}}  # the schema defaults are applied

    listed = json.loads(widgets.kubectl('get', 'wd', '-n', ns, '-o', 'json').stdout)
    assert listed['kind'] == 'List' and [i['metadata']['name'] for i in listed['items']] == ['w1']
    raw = widgets.request('GET', widgets.path(GROUP, VERSION, PLURAL, ns))
    assert raw['kind'] == 'WidgetList' and raw['apiVersion'] == f'{GROUP}/{VERSION}'
    assert int(raw['metadata']['resourceVersion']) >= int(meta['resourceVersion'])

    table = widgets.kubectl('get', 'widgets', '-n', ns).stdout.splitlines()
    assert table[0].split() == ['NAME', 'PHASE', 'WIDTH', 'AGE']  # the CRD's printer columns
    assert table[1].split()[:2] == ['w1', '64']

    # Re-applying a changed manifest merge-patches it (bumping the generation); unchanged -> no write.
    widgets.kubectl('apply', '-f', '-', '-n', ns, input=yaml.safe_dump(widget('w1', replicas=3)))
    obj2 = widgets.get(GROUP, VERSION, PLURAL, ns, 'w1')
    assert obj2['spec']['replicas'] == 3 and obj2['metadata']['generation'] == 2
    out = widgets.kubectl('apply', '-f', '-', '-n', ns, input=yaml.safe_dump(widget('w1', replicas=3)))
    assert 'unchanged' in out.stdout
    assert widgets.get(GROUP, VERSION, PLURAL, ns, 'w1')['metadata']['resourceVersion'] == \
        obj2['metadata']['resourceVersion']

    assert 'deleted' in widgets.kubectl('delete', 'widget', 'w1', '-n', ns).stdout
    assert widgets.get(GROUP, VERSION, PLURAL, ns, 'w1') is None
    assert 'No resources found' in widgets.kubectl('get', 'wd', '-n', ns).stderr
    assert widgets.kubectl('get', 'wd', 'w1', '-n', ns, check=False).returncode != 0


def test_schema_violation_is_rejected_with_422(widgets: TestAPIServer, kube_namespace: str) -> None:
    ns = kube_namespace
    bad = widget('bad', filter={'minWidth': -1}, mode='medium')
    result = widgets.kubectl('apply', '-f', '-', '-n', ns, input=yaml.safe_dump(bad), check=False)
    assert result.returncode != 0
    assert 'spec.filter.minWidth: Invalid value: -1: spec.filter.minWidth in body should be greater ' \
           'than or equal to 0' in result.stderr
    assert 'spec.mode: Unsupported value: "medium": supported values: "fast", "slow"' in result.stderr
    assert widgets.get(GROUP, VERSION, PLURAL, ns, 'bad') is None

    with pytest.raises(KubeAPIError) as err:
        widgets.create(GROUP, VERSION, PLURAL, widget('bad', filter={'minWidth': -1}), ns)
    status = err.value.body
    assert err.value.code == 422
    assert status['kind'] == 'Status' and status['status'] == 'Failure' and status['reason'] == 'Invalid'
    assert status['message'] == ('Widget.kubeapitest.example.com "bad" is invalid: spec.filter.minWidth: '
                                 'Invalid value: -1: spec.filter.minWidth in body should be greater than or equal to 0')
    assert status['details']['causes'] == [{
        'reason': 'FieldValueInvalid', 'field': 'spec.filter.minWidth',
        'message': 'Invalid value: -1: spec.filter.minWidth in body should be greater than or equal to 0'}]

    # More kinds of violations, all reported at once with their field paths.
    with pytest.raises(KubeAPIError) as err:
        widgets.create(GROUP, VERSION, PLURAL, {**widget('bad'), 'spec': {
            'replicas': 'many', 'size': 1.5, 'filter': {'formats': ['a', 'b', 'c', 'd']}}}, ns)
    fields = {c['field']: c['message'] for c in err.value.body['details']['causes']}
    assert fields['spec.source'] == 'Required value'
    assert fields['spec.replicas'].endswith('spec.replicas in body must be of type integer: "string"')
    assert 'spec.size' in fields
    assert fields['spec.filter.formats'] == 'Too many: 4: must have at most 3 items'

    # int-or-string & nullable are understood; invalid names are rejected like the apiserver does.
    widgets.create(GROUP, VERSION, PLURAL, widget('ok1', size='10Gi', note=None), ns)
    widgets.create(GROUP, VERSION, PLURAL, widget('ok2', size=10), ns)
    with pytest.raises(KubeAPIError) as err:
        widgets.create(GROUP, VERSION, PLURAL, widget('Bad_Name'), ns)
    assert err.value.code == 422 and 'metadata.name' in err.value.body['message']


def test_unknown_fields_are_pruned_or_rejected(widgets: TestAPIServer, kube_namespace: str) -> None:
    ns = kube_namespace
    body = widget('w', bogus=1, extra={'free': {'form': True}})
    result = widgets.kubectl('apply', '-f', '-', '-n', ns, input=yaml.safe_dump(body), check=False)
    assert result.returncode != 0 and 'unknown field "spec.bogus"' in result.stderr  # kubectl: Strict
    created = widgets.create(GROUP, VERSION, PLURAL, body, ns)  # no fieldValidation: Warn & prune
    assert 'bogus' not in created['spec'] and created['spec']['extra'] == {'free': {'form': True}}


def test_status_subresource_and_generation(widgets: TestAPIServer, kube_namespace: str) -> None:
    ns = kube_namespace
    created = widgets.create(GROUP, VERSION, PLURAL, {**widget('w'), 'status': {'phase': 'Ignored'}}, ns)
    assert 'status' not in created  # status is ignored on create
    rv0 = int(created['metadata']['resourceVersion'])

    # Writes to /status change only the status, not the generation.
    after_status = widgets.patch(GROUP, VERSION, PLURAL, ns, 'w', {'status': {'phase': 'Running'},
                                                                    'spec': {'replicas': 9}}, subresource='status')
    assert after_status['status'] == {'phase': 'Running'}
    assert after_status['spec']['replicas'] == 1
    assert after_status['metadata']['generation'] == 1
    rv1 = int(after_status['metadata']['resourceVersion'])
    assert rv1 > rv0

    # Main-resource writes ignore the status; spec changes bump the generation.
    after_spec = widgets.patch(GROUP, VERSION, PLURAL, ns, 'w', {'status': {'phase': 'Hacked'},
                                                                  'spec': {'replicas': 5}})
    assert after_spec['status'] == {'phase': 'Running'}
    assert after_spec['spec']['replicas'] == 5 and after_spec['metadata']['generation'] == 2
    rv2 = int(after_spec['metadata']['resourceVersion'])
    assert rv2 > rv1

    # Metadata-only changes bump the resourceVersion, not the generation; no-op writes bump nothing.
    labelled = widgets.patch(GROUP, VERSION, PLURAL, ns, 'w', {'metadata': {'labels': {'a': 'b'}}})
    assert labelled['metadata']['generation'] == 2 and int(labelled['metadata']['resourceVersion']) > rv2
    same = widgets.patch(GROUP, VERSION, PLURAL, ns, 'w', {'metadata': {'labels': {'a': 'b'}}})
    assert same['metadata']['resourceVersion'] == labelled['metadata']['resourceVersion']

    # kubectl sees the status in its printer columns and can patch the status subresource too.
    widgets.kubectl('patch', 'wd', 'w', '-n', ns, '--subresource=status', '--type=merge',
                    '-p', '{"status": {"phase": "Done"}}')
    assert widgets.kubectl('get', 'wd', 'w', '-n', ns, '--no-headers').stdout.split()[:2] == ['w', 'Done']
    assert widgets.patch_status(GROUP, VERSION, PLURAL, ns, 'w', {'phase': 'Final'})['status']['phase'] == 'Final'


def test_optimistic_concurrency_and_conflicts(widgets: TestAPIServer, kube_namespace: str) -> None:
    ns = kube_namespace
    obj = widgets.create(GROUP, VERSION, PLURAL, widget('w'), ns)
    rv = obj['metadata']['resourceVersion']
    with pytest.raises(KubeAPIError) as err:
        widgets.create(GROUP, VERSION, PLURAL, widget('w'), ns)
    assert err.value.code == 409 and err.value.reason == 'AlreadyExists'

    # kopf's way: a JSON-patch guarded by a `test` of the resourceVersion.
    ops = [{'op': 'test', 'path': '/metadata/resourceVersion', 'value': rv},
           {'op': 'add', 'path': '/metadata/finalizers', 'value': ['example.com/x']}]
    patched = widgets.patch(GROUP, VERSION, PLURAL, ns, 'w', ops, patch_type='json')
    assert patched['metadata']['finalizers'] == ['example.com/x']
    with pytest.raises(KubeAPIError) as err:
        widgets.patch(GROUP, VERSION, PLURAL, ns, 'w', ops, patch_type='json')  # the rv is stale now
    assert err.value.code == 422

    stale = {**obj, 'spec': {**obj['spec'], 'replicas': 7}}
    with pytest.raises(KubeAPIError) as err:
        widgets.replace(GROUP, VERSION, PLURAL, ns, 'w', stale)
    assert err.value.code == 409 and err.value.reason == 'Conflict'
    fresh = widgets.get(GROUP, VERSION, PLURAL, ns, 'w')
    replaced = widgets.replace(GROUP, VERSION, PLURAL, ns, 'w', {**fresh, 'spec': {**fresh['spec'], 'replicas': 7}})
    assert replaced['spec']['replicas'] == 7 and replaced['metadata']['generation'] == 2

    # A namespace must exist for the objects in it.
    with pytest.raises(KubeAPIError) as err:
        widgets.create(GROUP, VERSION, PLURAL, widget('w'), 'no-such-namespace')
    assert err.value.code == 404 and err.value.body['message'] == 'namespaces "no-such-namespace" not found'


def test_finalizers_and_kubectl_watch(widgets: TestAPIServer, kube_namespace: str) -> None:
    ns = kube_namespace
    watcher = subprocess.Popen(
        [kubectl_path(), f'--kubeconfig={widgets.kubeconfig_path}', 'get', 'widgets', '-n', ns,
         '--watch', '--output-watch-events', '--no-headers'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, '')), daemon=True)
    reader.start()
    try:
        widgets.wait_for_request(lambda r: r.params.get('watch') == 'true' and r.namespace == ns, timeout=60)
        widgets.create(GROUP, VERSION, PLURAL, {**widget('w'), 'metadata': {'name': 'w', 'finalizers': ['a/b']}}, ns)

        deleting = widgets.delete(GROUP, VERSION, PLURAL, ns, 'w')  # held by the finalizer
        assert deleting['metadata']['deletionTimestamp'] and deleting['metadata']['generation'] == 2
        held = widgets.get(GROUP, VERSION, PLURAL, ns, 'w')
        assert held is not None and held['metadata']['deletionTimestamp']
        assert widgets.delete(GROUP, VERSION, PLURAL, ns, 'w')['metadata']['deletionTimestamp'] == \
            held['metadata']['deletionTimestamp']  # a repeated delete changes nothing
        with pytest.raises(KubeAPIError) as err:  # no new finalizers on a deleted object
            widgets.patch(GROUP, VERSION, PLURAL, ns, 'w', {'metadata': {'finalizers': ['a/b', 'c/d']}})
        assert err.value.code == 422

        waiter = widgets.kubectl('delete', 'widget', 'w', '-n', ns, '--timeout=1s', check=False)
        assert waiter.returncode != 0 and 'timed out' in waiter.stderr  # kubectl waits for the finalizers

        widgets.patch(GROUP, VERSION, PLURAL, ns, 'w', {'metadata': {'finalizers': None}})  # release it
        assert widgets.get(GROUP, VERSION, PLURAL, ns, 'w') is None
        deadline = time.monotonic() + 10
        while not any(line.startswith('DELETED') for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)
        reader.join(timeout=10)
    events = [line.split()[:2] for line in lines]
    assert events[0] == ['ADDED', 'w'] and events[-1] == ['DELETED', 'w']
    assert ['MODIFIED', 'w'] in events


def test_watch_resumes_from_resource_version(widgets: TestAPIServer, kube_namespace: str) -> None:
    ns = kube_namespace
    widgets.create(GROUP, VERSION, PLURAL, widget('w1'), ns)
    since = widgets.request('GET', widgets.path(GROUP, VERSION, PLURAL, ns))['metadata']['resourceVersion']
    widgets.create(GROUP, VERSION, PLURAL, {**widget('w2'), 'metadata': {'name': 'w2', 'labels': {'x': 'y'}}}, ns)
    widgets.patch_status(GROUP, VERSION, PLURAL, ns, 'w1', {'phase': 'Running'})
    widgets.delete(GROUP, VERSION, PLURAL, ns, 'w2')

    events = widgets.watch(GROUP, VERSION, PLURAL, ns, resource_version=since, timeout=1)
    assert [(e['type'], e['object']['metadata']['name']) for e in events] == \
        [('ADDED', 'w2'), ('MODIFIED', 'w1'), ('DELETED', 'w2')]
    versions = [int(e['object']['metadata']['resourceVersion']) for e in events]
    assert versions == sorted(versions) and versions[0] > int(since)

    initial = widgets.watch(GROUP, VERSION, PLURAL, ns, timeout=1)  # no version: the current state first
    assert [(e['type'], e['object']['metadata']['name']) for e in initial] == [('ADDED', 'w1')]
    selected = widgets.watch(GROUP, VERSION, PLURAL, ns, resource_version=since, label_selector='x=y', timeout=1)
    assert [e['type'] for e in selected] == ['ADDED', 'DELETED']


def test_secrets_configmaps_events_gc_and_namespaces(widgets: TestAPIServer) -> None:
    ns = 'kubeapi-builtins'
    widgets.kubectl('create', 'namespace', ns)
    widgets.kubectl('create', 'configmap', 'cm', '--from-literal=a=1', '-n', ns)
    widgets.kubectl('create', 'secret', 'generic', 'sec', '--from-literal=pw=s3cr3t', '-n', ns)
    assert widgets.get('', 'v1', 'configmaps', ns, 'cm')['data'] == {'a': '1'}
    assert widgets.get('', 'v1', 'secrets', ns, 'sec')['data'] == {'pw': 'czNjcjN0'}
    widgets.create('', 'v1', 'secrets', {'metadata': {'name': 's2'}, 'stringData': {'k': 'v'}}, ns)
    assert widgets.get('', 'v1', 'secrets', ns, 's2')['data'] == {'k': 'dg=='}  # stringData -> data
    widgets.patch('', 'v1', 'configmaps', ns, 'cm', {'data': {'b': '2'}})
    assert widgets.kubectl('get', 'cm', 'cm', '-n', ns, '-o', 'jsonpath={.data.b}').stdout == '2'
    widgets.kubectl('apply', '-n', ns, '-f', '-', input='apiVersion: v1\nkind: ConfigMap\nmetadata:\n'
                                                         '  name: cm3\ndata:\n  k: v\n')
    event = widgets.create('', 'v1', 'events', {'metadata': {'generateName': 'ev-'}, 'reason': 'Test',
                                                'involvedObject': {'name': 'cm', 'kind': 'ConfigMap'}}, ns)
    assert event['metadata']['name'].startswith('ev-') and len(event['metadata']['name']) == 8
    assert widgets.events(ns, involved_name='cm')[0]['reason'] == 'Test'

    # Garbage collection of dependents (background cascading deletion by ownerReferences).
    owner = widgets.create(GROUP, VERSION, PLURAL, widget('owner'), ns)
    ref = {'apiVersion': f'{GROUP}/{VERSION}', 'kind': 'Widget', 'name': 'owner', 'uid': owner['metadata']['uid'],
           'controller': True}
    widgets.create('', 'v1', 'configmaps', {'metadata': {'name': 'child', 'ownerReferences': [ref]}}, ns)
    widgets.delete(GROUP, VERSION, PLURAL, ns, 'owner')
    assert widgets.get('', 'v1', 'configmaps', ns, 'child') is None

    # Deleting a namespace deletes its content.
    widgets.kubectl('delete', 'namespace', ns)
    assert widgets.get('', 'v1', 'namespaces', None, ns) is None
    assert widgets.get('', 'v1', 'configmaps', ns, 'cm') is None


def test_fault_injection_with_kmock_reactions(widgets: TestAPIServer, kube_namespace: str) -> None:
    ns = kube_namespace
    widgets.create(GROUP, VERSION, PLURAL, widget('w'), ns)
    resource = kmock.resource(GROUP, VERSION, PLURAL)
    # NB: kmock's slices count all past requests matching the filter, hence the fresh namespace in it.
    widgets.call(lambda: widgets.emulator['get', resource, kmock.namespace(ns), kmock.name('w')][:1] << 503)
    with pytest.raises(KubeAPIError) as err:
        widgets.get(GROUP, VERSION, PLURAL, ns, 'w')
    assert err.value.code == 503
    assert widgets.get(GROUP, VERSION, PLURAL, ns, 'w') is not None  # only once, then emulated again


@pytest.mark.skipif(not (KUBERAY / 'ray.io_rayjobs.yaml').exists(), reason='no shared/kuberay')
def test_kuberay_rayjob_crd(kube_api: TestAPIServer, kube_namespace: str) -> None:
    ns = kube_namespace
    assert kube_api.install_crd(KUBERAY / 'ray.io_rayjobs.yaml') == ['rayjobs.ray.io']
    rayjob = {
        'apiVersion': 'ray.io/v1', 'kind': 'RayJob', 'metadata': {'name': 'job'},
        'spec': {
            'entrypoint': 'python -c "print(1)"',
            'rayClusterSpec': {'headGroupSpec': {'rayStartParams': {}, 'template': {'spec': {'containers': [
                {'name': 'ray-head', 'image': 'rayproject/ray:2.9.0'}]}}}},
        },
    }
    out = kube_api.kubectl('apply', '-n', ns, '-f', '-', input=yaml.safe_dump(rayjob))
    assert 'rayjob.ray.io/job created' in out.stdout
    created = kube_api.get('ray.io', 'v1', 'rayjobs', ns, 'job')
    assert created['spec']['submissionMode'] == 'K8sJobMode'  # a CRD default
    assert kube_api.kubectl('get', 'rayjobs', '-n', ns).stdout.split()[:3] == ['NAME', 'JOB', 'STATUS']

    bad = json.loads(json.dumps(rayjob))
    bad['metadata']['name'] = 'bad'
    bad['spec']['backoffLimit'] = -1.5
    del bad['spec']['rayClusterSpec']['headGroupSpec']['template']['spec']['containers'][0]['name']
    result = kube_api.kubectl('apply', '-n', ns, '-f', '-', input=yaml.safe_dump(bad), check=False)
    assert result.returncode != 0
    assert 'spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].name: Required value' in result.stderr
    with pytest.raises(KubeAPIError) as err:
        kube_api.create('ray.io', 'v1', 'rayjobs', bad, ns)
    assert err.value.code == 422
    assert {c['field'] for c in err.value.body['details']['causes']} == {
        'spec.backoffLimit', 'spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].name'}


@pytest.mark.skipif(not (REPO / 'crds' / 'laionpart.yaml').exists(), reason='no LaionPart CRD yet')
def test_laionpart_crd_rejects_invalid_objects(kube_api: TestAPIServer, kube_namespace: str) -> None:
    kube_api.install_crd(REPO / 'crds' / 'laionpart.yaml')
    bad = {'apiVersion': 'laion-operator.io/v1alpha1', 'kind': 'LaionPart', 'metadata': {'name': 'bad'},
           'spec': {'filter': {'minWidth': -1}}}
    with pytest.raises(KubeAPIError) as err:
        kube_api.create('laion-operator.io', 'v1alpha1', 'laionparts', bad, kube_namespace)
    assert err.value.code == 422 and err.value.body['reason'] == 'Invalid'
    assert err.value.body['message'].startswith('LaionPart.laion-operator.io "bad" is invalid: ')


@pytest.mark.parametrize('scope', ['namespace', 'glob', 'cluster'])
def test_kopf_operator_end_to_end(widgets: TestAPIServer, kube_env: TestAPIServer,
                                  kube_namespace: str, scope: str) -> None:
    ns = kube_namespace
    # A glob makes kopf list & watch the namespaces; -A watches the resources cluster-wide.
    scope_args = {'namespace': ['--namespace', ns], 'glob': ['--namespace', f'{ns[:-3]}*'], 'cluster': ['-A']}[scope]
    registry = SmartOperatorRegistry()  # NB: a plain kopf.OperatorRegistry has no default logins
    settings = kopf.OperatorSettings()
    handled: list[str] = []

    @kopf.on.create(GROUP, VERSION, PLURAL, id='on_create', registry=registry)
    def on_create(name: str, body: kopf.Body, spec: dict, patch: kopf.Patch, **_: object) -> dict:
        handled.append(f'create:{name}')
        patch.status['phase'] = 'Ready'
        kopf.info(body, reason='Ready', message=f'Widget {name} is ready')  # posted as a k8s Event
        return {'width': spec['filter']['minWidth']}

    @kopf.on.update(GROUP, VERSION, PLURAL, field='spec.replicas', id='on_replicas', registry=registry)
    def on_replicas(name: str, old: object, new: object, patch: kopf.Patch, **_: object) -> None:
        handled.append(f'replicas:{name}:{old}->{new}')
        patch.status['replicas'] = new

    @kopf.on.delete(GROUP, VERSION, PLURAL, id='on_delete', registry=registry)
    def on_delete(name: str, **_: object) -> None:
        handled.append(f'delete:{name}')

    previous_registry = kopf.get_default_registry()  # KopfRunner replaces the global default registry
    try:
        # Default kopf login: via the kubernetes client and $KUBECONFIG (see the kube_env fixture).
        with KopfRunner(['run', '--standalone', *scope_args, '--verbose'],
                        registry=registry, settings=settings, timeout=30) as runner:
            widgets.create(GROUP, VERSION, PLURAL, widget('w', replicas=1), ns)
            obj = widgets.wait_for(GROUP, VERSION, PLURAL, ns, 'w',
                                   lambda o: o and o.get('status', {}).get('phase') == 'Ready', timeout=20)
            assert obj['status']['on_create'] == {'width': 64}  # the handler's result
            assert 'kopf.zalando.org/KopfFinalizerMarker' in obj['metadata']['finalizers']
            assert obj['metadata']['generation'] == 1

            widgets.patch(GROUP, VERSION, PLURAL, ns, 'w', {'spec': {'replicas': 4}})
            widgets.wait_for(GROUP, VERSION, PLURAL, ns, 'w',
                             lambda o: o and o.get('status', {}).get('replicas') == 4, timeout=20)
            deadline = time.monotonic() + 10
            while not widgets.events(ns, involved_name='w') and time.monotonic() < deadline:
                time.sleep(0.1)  # kopf posts the events in the background
            [event] = widgets.events(ns, involved_name='w')
            assert event['reason'] == 'Ready' and event['message'] == 'Widget w is ready'
            assert event['involvedObject']['uid'] == obj['metadata']['uid']

            widgets.delete(GROUP, VERSION, PLURAL, ns, 'w')  # kopf handles it & releases its finalizer
            widgets.wait_for_deletion(GROUP, VERSION, PLURAL, ns, 'w', timeout=20)
    finally:
        kopf.set_default_registry(previous_registry)

    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output
    assert handled == ['create:w', 'replicas:w:1->4', 'delete:w']
    assert 'Traceback' not in runner.output and 'Patching failed' not in runner.output, runner.output
    assert "Handler 'on_create' succeeded" in runner.output
