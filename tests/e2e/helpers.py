"""Helpers of the end-to-end tests: Tenants and OutboxPolicies on the real API server."""

from __future__ import annotations

from typing import Any

import yaml
from kubernetes import client
from somabrain_operator.children import TENANT_FILE, publisher_name
from somabrain_operator.config import RULE_CRD

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
    """Delete the Tenants and OutboxPolicies of the job's namespace, finalizers and all,
    once its operator is stopped: a later test's operator must not inherit them."""
    custom = client.CustomObjectsApi(job.api)
    for plural in ("tenants", "outboxpolicies"):
        listed: dict[str, Any] = custom.list_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, job.namespace, plural
        )
        for obj in listed["items"]:
            name = obj["metadata"]["name"]
            try:
                if obj["metadata"].get("finalizers"):
                    custom.patch_namespaced_custom_object(
                        GROUP, VERSION, job.namespace, plural, name,
                        {"metadata": {"finalizers": None}},
                    )  # fmt: skip
                custom.delete_namespaced_custom_object(GROUP, VERSION, job.namespace, plural, name)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise


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
