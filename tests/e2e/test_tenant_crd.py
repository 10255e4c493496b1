"""The Tenant CRD on the real API server: bad input is refused with the field named."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes import config as kube_config

from devenv.mainjob import apply_crds

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def custom(stack_env: dict[str, str]) -> Iterator[client.CustomObjectsApi]:
    api = kube_config.new_client_from_config(config_file=stack_env["KUBECONFIG"])  # type: ignore[no-untyped-call]
    apply_crds(api)
    namespace = client.V1Namespace(metadata=client.V1ObjectMeta(name="crd-tests"))
    try:
        client.CoreV1Api(api).create_namespace(namespace)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    yield client.CustomObjectsApi(api)
    api.close()


def _tenant(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "somabrain.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": f"t-{uuid.uuid4().hex[:8]}"},
        "spec": spec,
    }


def _create(custom: client.CustomObjectsApi, body: dict[str, Any]) -> Any:
    return custom.create_namespaced_custom_object(
        "somabrain.io", "v1alpha1", "crd-tests", "tenants", body
    )


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"tenantId": "Not_Valid"}, "spec.tenantId"),
        ({}, "spec.tenantId"),
        ({"tenantId": "acme", "publisher": {"batchSize": 0}}, "spec.publisher.batchSize"),
        ({"tenantId": "acme", "publisher": {"mode": "sideways"}}, "spec.publisher.mode"),
        ({"tenantId": "acme", "topics": ["has space"]}, "spec.topics[0]"),
    ],
)
def test_invalid_tenant_is_refused_naming_the_field(
    custom: client.CustomObjectsApi, spec: dict[str, Any], field: str
) -> None:
    with pytest.raises(client.ApiException) as refused:
        _create(custom, _tenant(spec))

    assert refused.value.status == 422
    assert field in str(refused.value.body)


def test_tenant_id_cannot_change_after_creation(custom: client.CustomObjectsApi) -> None:
    body = _tenant({"tenantId": "acme"})
    _create(custom, body)

    with pytest.raises(client.ApiException) as refused:
        custom.patch_namespaced_custom_object(
            "somabrain.io",
            "v1alpha1",
            "crd-tests",
            "tenants",
            body["metadata"]["name"],
            {"spec": {"tenantId": "other"}},
            _content_type="application/merge-patch+json",
        )

    assert refused.value.status == 422
    assert "tenantId is immutable" in str(refused.value.body)
