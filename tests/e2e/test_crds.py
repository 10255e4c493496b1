"""The Tenant and OutboxPolicy CRDs on the real API server.

Bad input is refused with the field named and the fix; the largest allowed objects
are accepted and stored exactly as written, with no defaults added, so GitOps tools
see no drift (cases K-13, K-16); a full status survives the status subresource
(K-1); `kubectl explain` and `kubectl get` have what they need.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes import config as kube_config
from somabrain_operator.config import GROUP, VERSION
from somabrain_operator.resources import KINDS, OUTBOX_POLICY, TENANT, Kind

from devenv.mainjob import apply_crds
from tests.e2e.helpers import clean_namespace
from tests.resource_examples import (
    INVALID_POLICIES,
    INVALID_TENANTS,
    Invalid,
    full_policy_status,
    full_tenant_status,
    largest_policy_spec,
    largest_shared_tenant_spec,
    largest_tenant_spec,
)

pytestmark = pytest.mark.e2e
NAMESPACE = "crd-tests"
TABLE = "application/json;as=Table;g=meta.k8s.io;v=v1"


@pytest.fixture(scope="module")
def api(stack_env: dict[str, str]) -> Iterator[client.ApiClient]:
    api = kube_config.new_client_from_config(config_file=stack_env["KUBECONFIG"])  # type: ignore[no-untyped-call]
    apply_crds(api)
    namespace = client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE))
    try:
        client.CoreV1Api(api).create_namespace(namespace)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    yield api
    clean_namespace(api, NAMESPACE)
    api.close()


@pytest.fixture(scope="module")
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def _body(kind: Kind, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind.kind,
        "metadata": {"name": f"{kind.short_names[0]}-{uuid.uuid4().hex[:8]}"},
        "spec": spec,
    }


def _create(
    custom: client.CustomObjectsApi, kind: Kind, body: dict[str, Any], **options: Any
) -> Any:
    return custom.create_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, kind.plural, body, **options
    )


def _get(custom: client.CustomObjectsApi, kind: Kind, name: str) -> Any:
    return custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, kind.plural, name)


def _server_side_apply(custom: client.CustomObjectsApi, kind: Kind, body: dict[str, Any]) -> Any:
    return custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        NAMESPACE,
        kind.plural,
        body["metadata"]["name"],
        body,
        field_manager="crd-tests",
        _content_type="application/apply-patch+yaml",
    )


def _raw_get(api: client.ApiClient, path: str, accept: str = "application/json") -> Any:
    method, url, headers, _, _ = api.param_serialize(
        "GET", path, header_params={"Accept": accept}, auth_settings=["BearerToken"]
    )
    response = api.call_api(method, url, header_params=headers)
    response.read()
    assert response.status == 200, response.data
    return json.loads(response.data)


def _causes(refused: client.ApiException) -> list[tuple[str, str]]:
    details = json.loads(refused.body).get("details") or {}
    return [(c.get("field", ""), c.get("message", "")) for c in details.get("causes", [])]


INVALID = [(TENANT, case) for case in INVALID_TENANTS] + [
    (OUTBOX_POLICY, case) for case in INVALID_POLICIES
]


@pytest.mark.parametrize(("kind", "case"), INVALID, ids=[c.name for _, c in INVALID])
def test_invalid_resource_is_refused_naming_the_field_and_the_fix(
    custom: client.CustomObjectsApi, kind: Kind, case: Invalid
) -> None:
    with pytest.raises(client.ApiException) as refused:
        _create(custom, kind, _body(kind, case.spec))

    assert refused.value.status == 422
    causes = _causes(refused.value)
    assert any(field == case.field and case.message in message for field, message in causes), causes
    # No rule fails on input another check refuses (CEL's own errors name no fix).
    assert not any("evaluating rule" in message for _, message in causes), causes


def test_tenant_id_cannot_change_after_creation(custom: client.CustomObjectsApi) -> None:
    body = _body(TENANT, {"tenantId": "acme"})
    _create(custom, TENANT, body)

    with pytest.raises(client.ApiException) as refused:
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NAMESPACE,
            TENANT.plural,
            body["metadata"]["name"],
            {"spec": {"tenantId": "other"}},
            _content_type="application/merge-patch+json",
        )

    assert refused.value.status == 422
    [(field, message)] = _causes(refused.value)
    assert field == "spec.tenantId"
    assert message.startswith("Forbidden: tenantId is immutable")


def test_unknown_field_is_refused_under_strict_field_validation(
    custom: client.CustomObjectsApi,
) -> None:
    # batchSize moved from publisher to quotas: an old manifest must not pass silently.
    body = _body(TENANT, {"tenantId": "acme", "publisher": {"batchSize": 100}})

    with pytest.raises(client.ApiException) as refused:
        _create(custom, TENANT, body, field_validation="Strict")

    assert refused.value.status == 400
    assert 'unknown field "spec.publisher.batchSize"' in json.loads(refused.value.body)["message"]


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        (TENANT, largest_tenant_spec()),
        (TENANT, largest_shared_tenant_spec()),
        (OUTBOX_POLICY, largest_policy_spec()),
        (TENANT, {"tenantId": "acme"}),
        (OUTBOX_POLICY, {}),
    ],
    ids=["largest-tenant", "largest-shared-tenant", "largest-policy", "min-tenant", "no-policy"],
)
def test_resource_is_stored_exactly_as_applied(
    custom: client.CustomObjectsApi, kind: Kind, spec: dict[str, Any]
) -> None:
    body = _body(kind, spec)
    name = body["metadata"]["name"]

    _server_side_apply(custom, kind, body)
    applied = _get(custom, kind, name)
    _server_side_apply(custom, kind, body)
    again = _get(custom, kind, name)

    assert applied["spec"] == spec
    # Nothing for a GitOps tool to see as drift: re-applying changes nothing.
    assert again["metadata"]["resourceVersion"] == applied["metadata"]["resourceVersion"]
    assert again["metadata"]["generation"] == 1


@pytest.mark.parametrize(
    ("kind", "spec", "status"),
    [
        (TENANT, {"tenantId": "acme"}, full_tenant_status()),
        (OUTBOX_POLICY, {}, full_policy_status()),
    ],
    ids=[k.kind for k in KINDS],
)
def test_full_status_is_kept_by_the_status_subresource(
    custom: client.CustomObjectsApi, kind: Kind, spec: dict[str, Any], status: dict[str, Any]
) -> None:
    name = _create(custom, kind, _body(kind, spec))["metadata"]["name"]

    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        NAMESPACE,
        kind.plural,
        name,
        {"status": status},
        _content_type="application/merge-patch+json",
    )

    assert _get(custom, kind, name)["status"] == status


@pytest.mark.parametrize("kind", KINDS, ids=[k.kind for k in KINDS])
def test_published_openapi_describes_every_field(api: client.ApiClient, kind: Kind) -> None:
    # What `kubectl explain tenant.spec.quotas` reads.
    document = _raw_get(api, f"/openapi/v3/apis/{GROUP}/{VERSION}")
    schema = document["components"]["schemas"][f"io.somabrain.{VERSION}.{kind.kind}"]

    def undescribed(node: dict[str, Any], path: str) -> list[str]:
        found = [] if node.get("description") else [path]
        for name, child in node.get("properties", {}).items():
            found += undescribed(child, f"{path}.{name}")
        if "items" in node:
            found += [p for p in undescribed(node["items"], path + "[*]") if p != path + "[*]"]
        return found

    for part in ("spec", "status"):
        assert undescribed(schema["properties"][part], part) == []
    quotas = schema["properties"]["spec"]["properties"]["quotas"]
    if kind is TENANT:
        assert "Default 500" in quotas["properties"]["batchSize"]["description"]


def test_kubectl_get_shows_mode_ready_pending_and_circuit(
    api: client.ApiClient, custom: client.CustomObjectsApi
) -> None:
    name = _create(custom, TENANT, _body(TENANT, {"tenantId": "acme"}))["metadata"]["name"]
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        NAMESPACE,
        TENANT.plural,
        name,
        {"status": full_tenant_status()},
        _content_type="application/merge-patch+json",
    )

    table = _raw_get(
        api, f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{TENANT.plural}/{name}", TABLE
    )

    columns = [c["name"] for c in table["columnDefinitions"] if c["priority"] == 0]
    assert columns == ["Name", "Tenant", "Mode", "Ready", "Publisher", "Pending", "Circuit", "Age"]
    [row] = table["rows"]
    cells = dict(zip((c["name"] for c in table["columnDefinitions"]), row["cells"], strict=True))
    assert (cells["Tenant"], cells["Mode"], cells["Ready"]) == ("acme", "dedicated", "True")
    assert (cells["Pending"], cells["Circuit"]) == (12, "half-open")
    # The reason of PublisherAvailable (this example's is the one its helper gives all).
    assert cells["Publisher"] == "ChildrenApplied"


def test_kinds_have_short_names_and_the_somabrain_category(api: client.ApiClient) -> None:
    resources = _raw_get(api, f"/apis/{GROUP}/{VERSION}")["resources"]
    names = {r["name"]: (r.get("shortNames"), r.get("categories")) for r in resources}

    assert names["tenants"] == (["tn"], ["somabrain"])
    assert names["outboxpolicies"] == (["obp"], ["somabrain"])
    assert {"tenants/status", "outboxpolicies/status"} <= set(names)


def test_reapplying_the_crds_keeps_existing_resources(
    api: client.ApiClient, custom: client.CustomObjectsApi
) -> None:
    spec = largest_tenant_spec()
    name = _create(custom, TENANT, _body(TENANT, spec))["metadata"]["name"]

    apply_crds(api)

    assert _get(custom, TENANT, name)["spec"] == spec
