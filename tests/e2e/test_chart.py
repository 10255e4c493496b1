"""The operator's Helm chart on a real API server (RBAC on): install, upgrade, uninstall,
and what its ServiceAccount may do.

K-15: the CRDs are templates with helm.sh/resource-policy: keep, so upgrades apply
them and nothing Helm does deletes them or the Tenants. K-10: the ServiceAccount is
granted exactly the operator's permissions, events in both API groups among them, and
never Secrets.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes import config as kube_config

from tests.chart_support import (
    DENIED,
    OPERATOR_RULES,
    PEERING_RULES,
    allowed,
    container_env,
    granted,
    impersonating_client,
    permissions,
)
from tests.e2e.conftest import ChartCluster, Release
from tests.e2e.helpers import exists

pytestmark = pytest.mark.e2e
CRDS = ("tenants.somabrain.io", "outboxpolicies.somabrain.io")
# Where the tests' Tenants live; namespaces are never deleted here (no controller-manager
# would finish the deletion).
TENANT_NAMESPACE = "chart-tenants"


def _ensure_namespace(api: client.ApiClient, name: str) -> None:
    try:
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
        )
    except client.ApiException as exc:
        if exc.status != 409:
            raise


def _crds(api: client.ApiClient) -> dict[str, Any]:
    ext = client.ApiextensionsV1Api(api)
    return {name: ext.read_custom_resource_definition(name) for name in CRDS}


def _create_tenant(api: client.ApiClient, prefix: str) -> dict[str, Any]:
    """A new Tenant (its name unique, as Tenants outlive releases and kept stacks)."""
    _ensure_namespace(api, TENANT_NAMESPACE)
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": "somabrain.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {"tenantId": name, "topics": [f"{name}.orders"]},
    }
    created: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(  # type: ignore[assignment]
        "somabrain.io", "v1alpha1", TENANT_NAMESPACE, "tenants", body
    )
    return created


def _tenant(api: client.ApiClient, name: str) -> dict[str, Any]:
    found: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(  # type: ignore[assignment]
        "somabrain.io", "v1alpha1", TENANT_NAMESPACE, "tenants", name
    )
    return found


def _as_dict(api: client.ApiClient, obj: object) -> dict[str, Any]:
    """A client model as the API's JSON (camelCase keys, unset fields left out)."""
    serialized: dict[str, Any] = api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
    return serialized


# --------------------------------------------------------------------------------------------
# Install, upgrade, uninstall
# --------------------------------------------------------------------------------------------


def test_helm_install_creates_the_operator_s_objects(operator_release: Release) -> None:
    api = operator_release.cluster.api
    name, namespace = operator_release.service_account, operator_release.namespace
    rbac = client.RbacAuthorizationV1Api(api)

    client.CoreV1Api(api).read_namespaced_service_account(name, namespace)
    role = _as_dict(api, rbac.read_cluster_role(name))
    binding = _as_dict(api, rbac.read_cluster_role_binding(name))
    deployment = _as_dict(api, client.AppsV1Api(api).read_namespaced_deployment(name, namespace))

    assert permissions(role["rules"]) == permissions(OPERATOR_RULES)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == name
    for crd in _crds(api).values():
        assert crd.metadata.annotations["helm.sh/resource-policy"] == "keep"
        assert crd.metadata.annotations["meta.helm.sh/release-name"] == operator_release.name
        assert any(c.type == "Established" and c.status == "True" for c in crd.status.conditions)


def test_helm_upgrade_with_a_changed_value_keeps_tenants_and_crds(
    operator_release: Release,
) -> None:
    api = operator_release.cluster.api
    tenant = _create_tenant(api, "upgraded")
    crds_before = {name: crd.metadata.uid for name, crd in _crds(api).items()}

    operator_release.upgrade("--set", "prometheusRule.labels.release=kube-prometheus-stack")

    deployment = client.AppsV1Api(api).read_namespaced_deployment(
        operator_release.name, operator_release.namespace
    )
    env = container_env(_as_dict(api, deployment))
    assert json.loads(env["SOMABRAIN_OPERATOR_RULE_LABELS"]) == {"release": "kube-prometheus-stack"}
    assert {name: crd.metadata.uid for name, crd in _crds(api).items()} == crds_before
    after = _tenant(api, tenant["metadata"]["name"])
    assert after["metadata"]["uid"] == tenant["metadata"]["uid"]
    assert after["spec"] == tenant["spec"]


def test_helm_upgrade_that_stops_installing_the_crds_keeps_them_and_the_tenants(
    operator_release: Release,
) -> None:
    # K-15: CRDs leaving a release (moved, or managed elsewhere from now on) are not deleted.
    api = operator_release.cluster.api
    tenant = _create_tenant(api, "moved-crds")
    crds_before = {name: crd.metadata.uid for name, crd in _crds(api).items()}

    operator_release.upgrade("--set", "crds.install=false")

    manifest = operator_release.cluster.helm.run(
        "get", "manifest", operator_release.name, "-n", operator_release.namespace
    ).stdout
    assert "kind: CustomResourceDefinition" not in manifest
    assert {name: crd.metadata.uid for name, crd in _crds(api).items()} == crds_before
    assert _tenant(api, tenant["metadata"]["name"])["metadata"]["uid"] == tenant["metadata"]["uid"]


def test_helm_uninstall_leaves_the_crds_and_tenants_and_a_reinstall_adopts_them(
    install_chart: Callable[..., Release],
) -> None:
    release = install_chart()
    api = release.cluster.api
    tenant = _create_tenant(api, "uninstalled")
    crds_before = {name: crd.metadata.uid for name, crd in _crds(api).items()}

    release.uninstall()

    assert not exists(
        lambda: client.AppsV1Api(api).read_namespaced_deployment(release.name, release.namespace)
    )
    assert not exists(lambda: client.RbacAuthorizationV1Api(api).read_cluster_role(release.name))
    assert {name: crd.metadata.uid for name, crd in _crds(api).items()} == crds_before
    assert _tenant(api, tenant["metadata"]["name"])["metadata"]["uid"] == tenant["metadata"]["uid"]

    install_chart()

    assert {name: crd.metadata.uid for name, crd in _crds(api).items()} == crds_before
    assert _tenant(api, tenant["metadata"]["name"])["spec"] == tenant["spec"]


# --------------------------------------------------------------------------------------------
# The ServiceAccount's permissions (K-10)
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["impersonation", "token"])
def as_operator(
    request: pytest.FixtureRequest, operator_release: Release
) -> Iterator[client.ApiClient]:
    """An API client acting as the chart's ServiceAccount: impersonated by the admin, or
    with the ServiceAccount's own token (what the operator's pod presents)."""
    api: client.ApiClient
    if request.param == "impersonation":
        api = impersonating_client(
            operator_release.cluster.kubeconfig,
            namespace=operator_release.namespace,
            name=operator_release.service_account,
        )
    else:
        kubeconfig = request.getfixturevalue("operator_kubeconfig")
        api = kube_config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    with api:
        yield api


def test_chart_s_service_account_is_the_identity_used(
    as_operator: client.ApiClient, operator_release: Release
) -> None:
    review = client.AuthenticationV1Api(as_operator).create_self_subject_review(
        client.V1SelfSubjectReview()
    )

    user = _as_dict(as_operator, review)["status"]["userInfo"]
    namespace = operator_release.namespace
    assert user["username"] == f"system:serviceaccount:{namespace}:somabrain-operator"
    assert f"system:serviceaccounts:{namespace}" in user["groups"]


def test_chart_s_service_account_may_do_everything_the_operator_needs(
    as_operator: client.ApiClient,
) -> None:
    needed = sorted(permissions(OPERATOR_RULES))

    refused = [str(p) for p in needed if not allowed(as_operator, p, namespace=TENANT_NAMESPACE)]

    assert refused == []


def test_chart_s_service_account_may_not_read_secrets_nor_act_beyond_its_kinds(
    as_operator: client.ApiClient,
) -> None:
    permitted = [str(p) for p in DENIED if allowed(as_operator, p, namespace=TENANT_NAMESPACE)]

    assert permitted == []


def test_chart_grants_nothing_beyond_the_operator_s_permissions(
    operator_release: Release,
) -> None:
    # What the ServiceAccount holds, less what every authenticated ServiceAccount of its
    # namespace holds anyway (discovery, access reviews), is exactly the chart's grant.
    cluster = operator_release.cluster
    namespace = operator_release.namespace
    name = operator_release.service_account
    with impersonating_client(cluster.kubeconfig, namespace=namespace, name=name) as operator:
        held = granted(operator, namespace=TENANT_NAMESPACE)
    with impersonating_client(cluster.kubeconfig, namespace=namespace, name="other") as other:
        baseline = granted(other, namespace=TENANT_NAMESPACE)

    assert held - baseline == permissions(OPERATOR_RULES)


def test_helm_install_with_the_admin_api_creates_its_objects_and_grants_it_nothing(
    install_chart: Callable[..., Release],
) -> None:
    # No kubelet here: the API server accepting the objects is what is checked, not the pod.
    release = install_chart(
        "--set", "admin.enabled=true", "--set", "admin.tokensSecret=admin-tokens"
    )  # fmt: skip
    api, namespace = release.cluster.api, release.namespace
    name = f"{release.name}-admin"
    core = client.CoreV1Api(api)

    account = _as_dict(api, core.read_namespaced_service_account(name, namespace))
    service = _as_dict(api, core.read_namespaced_service(name, namespace))
    deployment = _as_dict(api, client.AppsV1Api(api).read_namespaced_deployment(name, namespace))
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    kubeconfig = release.cluster.kubeconfig
    with impersonating_client(kubeconfig, namespace=namespace, name=name) as admin:
        held = granted(admin, namespace=TENANT_NAMESPACE)
    with impersonating_client(kubeconfig, namespace=namespace, name="other") as other:
        baseline = granted(other, namespace=TENANT_NAMESPACE)

    assert account["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == name
    assert pod["automountServiceAccountToken"] is False
    assert container["command"] == ["somabrain", "admin", "serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "tokens", "mountPath": "/etc/somabrain/admin", "readOnly": True} in (
        container["volumeMounts"]
    )
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8081, "targetPort": "http", "protocol": "TCP"}
    ]
    # It never calls the Kubernetes API: nothing beyond what every ServiceAccount holds.
    assert held - baseline == set()


def test_peering_permissions_are_granted_only_with_peering(
    install_chart: Callable[..., Release], chart_cluster: ChartCluster
) -> None:
    peerings = sorted(permissions(PEERING_RULES))
    release = install_chart()
    with impersonating_client(
        chart_cluster.kubeconfig, namespace=release.namespace, name=release.service_account
    ) as operator:
        standalone = [p for p in peerings if allowed(operator, p, namespace=TENANT_NAMESPACE)]

        release.upgrade("--set", "peering.enabled=true")

        peering = [p for p in peerings if allowed(operator, p, namespace=TENANT_NAMESPACE)]

    assert standalone == []
    assert peering == peerings


def test_chart_s_service_account_cannot_read_the_connection_secret(
    as_operator: client.ApiClient, chart_cluster: ChartCluster
) -> None:
    # A real call, not only an access review: the Secret exists and is still refused.
    _ensure_namespace(chart_cluster.api, TENANT_NAMESPACE)
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name="somabrain-connection"),
        string_data={"DATABASE_URL": "postgresql://example", "KAFKA_BOOTSTRAP_SERVERS": "k:9092"},
    )
    core = client.CoreV1Api(chart_cluster.api)
    if not exists(lambda: core.read_namespaced_secret("somabrain-connection", TENANT_NAMESPACE)):
        core.create_namespaced_secret(TENANT_NAMESPACE, secret)

    with pytest.raises(client.ApiException) as refused:
        client.CoreV1Api(as_operator).read_namespaced_secret(
            "somabrain-connection", TENANT_NAMESPACE
        )

    assert refused.value.status == 403
    # ...while listing its own kinds works.
    client.CustomObjectsApi(as_operator).list_namespaced_custom_object(
        "somabrain.io", "v1alpha1", TENANT_NAMESPACE, "tenants"
    )
