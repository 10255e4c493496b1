"""Desired children of a Tenant, computed by pure functions from its spec.

Nothing here talks to the API server: given the same Tenant and settings, the same
manifests come out, which is what makes reconciliation level-based and testable.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from somabrain_operator.config import GROUP, VERSION, OperatorSettings
from somabrain_operator.resources import TenantSpec, defaults, resolve

LABEL_TENANT = f"{GROUP}/tenant"
LABEL_COMPONENT = "app.kubernetes.io/component"
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"


def publisher_name(tenant_id: str) -> str:
    return f"somabrain-publisher-{tenant_id}"


def owner_reference(*, name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Tenant",
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(spec: TenantSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "somabrain-publisher",
        "app.kubernetes.io/managed-by": "somabrain-operator",
        LABEL_COMPONENT: "publisher",
        LABEL_TENANT: spec.tenant_id,
    }


def config_map(spec: TenantSpec, *, namespace: str, owner: dict[str, Any]) -> dict[str, Any]:
    """The tenant's publisher settings, read by the publisher as environment variables."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": publisher_name(spec.tenant_id),
            "namespace": namespace,
            "labels": _labels(spec),
            "ownerReferences": [owner],
        },
        "data": {
            "SOMABRAIN_TENANT": spec.tenant_id,
            "SOMABRAIN_BATCH_SIZE": str(resolve(spec).quotas.batch_size),
        },
    }


def config_hash(config: dict[str, Any]) -> str:
    """Content hash of a ConfigMap's data; in the pod template so a change rolls the pods."""
    canonical = json.dumps(config["data"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def deployment(
    spec: TenantSpec,
    *,
    namespace: str,
    owner: dict[str, Any],
    settings: OperatorSettings,
    config: dict[str, Any],
) -> dict[str, Any]:
    """The tenant's publisher; a second replica only waits as a standby."""
    labels = _labels(spec)
    selector = {LABEL_TENANT: spec.tenant_id, LABEL_COMPONENT: "publisher"}
    secret = settings.connection_secret
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": publisher_name(spec.tenant_id),
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "replicas": resolve(spec).replicas,
            # Recreate: the old pod releases the tenant's lock before the new one starts.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {ANNOTATION_CONFIG_HASH: config_hash(config)},
                },
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [
                        {
                            "name": "publisher",
                            "image": settings.publisher_image,
                            "command": ["somabrain", "publisher", "run"],
                            "args": ["--tenant", spec.tenant_id],
                            "envFrom": [{"configMapRef": {"name": config["metadata"]["name"]}}],
                            "env": [
                                _secret_env("SOMABRAIN_DATABASE_URL", secret, "DATABASE_URL"),
                                _secret_env(
                                    "SOMABRAIN_KAFKA_BOOTSTRAP_SERVERS",
                                    secret,
                                    "KAFKA_BOOTSTRAP_SERVERS",
                                ),
                            ],
                            "resources": _resources(spec),
                            "securityContext": {
                                "runAsNonRoot": True,
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                },
            },
        },
    }


def _resources(spec: TenantSpec) -> dict[str, Any]:
    """The Tenant's requests and limits as written, or defaults when it sets none (never
    a mix, which could put a default limit below the Tenant's request)."""
    if spec.publisher is not None and spec.publisher.resources is not None:
        return spec.publisher.resources.to_body()
    return copy.deepcopy(defaults.PUBLISHER_RESOURCES)


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
