"""Helpers of the end-to-end tests: Tenants and OutboxPolicies on the real API server."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from typing import Any

import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families
from somabrain_operator.children import LABEL_MANAGED_BY, MANAGED_BY, TENANT_FILE, publisher_name
from somabrain_operator.config import RULE_CRD, RULE_GROUP, RULE_PLURAL, RULE_VERSION
from sqlalchemy import text

from devenv.mainjob import MainJob

GROUP, VERSION = "somabrain.io", "v1alpha1"


def tenant(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {"tenantId": name, **spec},
    }


def apply(job: MainJob, plural: str, obj: dict[str, Any]) -> None:
    obj = {**obj, "metadata": {**obj["metadata"], "namespace": job.namespace}}
    client.CustomObjectsApi(job.api).patch_namespaced_custom_object(
        GROUP,
        VERSION,
        job.namespace,
        plural,
        obj["metadata"]["name"],
        obj,
        field_manager="e2e-user",
        force=True,
        _content_type="application/apply-patch+yaml",
    )


def policy(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "OutboxPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def get(job: MainJob, name: str, plural: str = "tenants") -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = client.CustomObjectsApi(job.api).get_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, job.namespace, plural, name
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj


def condition(job: MainJob, name: str, kind: str) -> dict[str, Any] | None:
    obj = get(job, name) or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), None)


def has_condition(job: MainJob, name: str, kind: str, status: str, reason: str) -> bool:
    c = condition(job, name, kind)
    return c is not None and (c["status"], c["reason"]) == (status, reason)


def batch_size(job: MainJob, tenant_id: str) -> int | None:
    try:
        config = client.CoreV1Api(job.api).read_namespaced_config_map(
            publisher_name(tenant_id), job.namespace
        )
    except client.ApiException:
        return None
    entry = yaml.safe_load(config.data[TENANT_FILE])["tenants"].get(tenant_id)
    return None if entry is None else int(entry["batch_size"])


def clean_up(job: MainJob) -> None:
    """`clean_namespace` of the job's namespace, once its operator is stopped, and the
    outbox rows and publisher reports of its tenants: a later run of the same test on a
    kept stack starts from nothing."""
    listed: dict[str, Any] = client.CustomObjectsApi(job.api).list_namespaced_custom_object(  # type: ignore[assignment]
        GROUP, VERSION, job.namespace, "tenants"
    )
    tenant_ids = sorted({str(t["spec"]["tenantId"]) for t in listed["items"]})
    clean_namespace(job.api, job.namespace)
    if tenant_ids:
        with job.engine.begin() as conn:
            for table in ("outbox_events", "outbox_tenants"):
                conn.execute(
                    text(f"DELETE FROM {table} WHERE tenant_id = ANY(:ids)"),
                    {"ids": tenant_ids},
                )


def clean_namespace(api: client.ApiClient, namespace: str) -> None:
    """Delete the Tenants and OutboxPolicies of `namespace` (finalizers and all) and the
    children the operator made there: a later test's operator must not resume them, and
    the stack has no garbage collector to remove the children of a deleted Tenant."""
    custom = client.CustomObjectsApi(api)
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)

    def gone(delete: Any, *args: Any) -> None:
        try:
            delete(*args)
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    for plural in ("tenants", "outboxpolicies"):
        listed: dict[str, Any] = custom.list_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, namespace, plural
        )
        for obj in listed["items"]:
            name = obj["metadata"]["name"]
            if obj["metadata"].get("finalizers"):
                gone(
                    custom.patch_namespaced_custom_object,
                    GROUP, VERSION, namespace, plural, name, {"metadata": {"finalizers": None}},
                )  # fmt: skip
            gone(custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, plural, name)
    ours = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    for list_fn, delete_fn in (
        (apps.list_namespaced_deployment, apps.delete_namespaced_deployment),
        (core.list_namespaced_config_map, core.delete_namespaced_config_map),
        (core.list_namespaced_service, core.delete_namespaced_service),
        (core.list_namespaced_resource_quota, core.delete_namespaced_resource_quota),
    ):
        for item in list_fn(namespace, label_selector=ours).items:
            gone(delete_fn, item.metadata.name, namespace)
    try:
        rules: dict[str, Any] = custom.list_namespaced_custom_object(  # type: ignore[assignment]
            RULE_GROUP, RULE_VERSION, namespace, RULE_PLURAL, label_selector=ours
        )
    except client.ApiException as exc:
        if exc.status != 404:  # no PrometheusRule kind on this cluster
            raise
        return
    for rule in rules["items"]:
        gone(
            custom.delete_namespaced_custom_object,
            RULE_GROUP, RULE_VERSION, namespace, RULE_PLURAL, rule["metadata"]["name"],
        )  # fmt: skip


# The Prometheus Operator's PrometheusRule kind, as far as the operator uses it (K-11).
PROMETHEUS_RULE_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": RULE_CRD},
    "spec": {
        "group": "monitoring.coreos.com",
        "names": {
            "kind": "PrometheusRule",
            "listKind": "PrometheusRuleList",
            "plural": "prometheusrules",
            "singular": "prometheusrule",
        },
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


def operator_counter(port: int, name: str, **labels: str | tuple[str, ...]) -> float:
    """The sum of an operator counter's samples whose labels match `labels` (a value, or
    a tuple of accepted values), from its /metrics on `port`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text_ = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text_):
        for sample in family.samples:
            if sample.name != name:
                continue
            accepted = {k: v if isinstance(v, tuple) else (v,) for k, v in labels.items()}
            if all(sample.labels.get(k) in values for k, values in accepted.items()):
                total += sample.value
    return total


def exists(read: Callable[[], object]) -> bool:
    """Whether `read()` finds its object (False on 404)."""
    try:
        read()
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True
