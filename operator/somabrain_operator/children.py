"""Desired children of a Tenant, computed by pure functions from what is in effect for it.

Nothing here talks to the API server: given the same Tenant, policy and settings, the
same manifests come out, which is what makes reconciliation level-based and testable.

A dedicated Tenant gets a publisher Deployment, ConfigMap and Service of its own. The
Tenants of a shared pool (`spec.publisher.pool`) get one of each for the whole pool,
named after the pool and owned by every member it serves (`pool_*`); each Tenant keeps
its own PrometheusRule and ResourceQuota.

The publisher's ConfigMap holds two kinds of settings:
- environment variables the publisher reads once at start (tenant, delivery mode,
  retries, retention, port); their hash is in the pod template, so a change rolls the
  publisher;
- `tenants.yaml`, the per-tenant file the publisher re-reads when it changes (quotas,
  circuit, poison policy, dead-letter topic): mounted as a volume, so such a change
  reaches the running publisher without a restart.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any

import yaml

from somabrain.delivery.alerts import Thresholds, rule_group
from somabrain_operator.config import (
    GROUP,
    RULE_GROUP,
    RULE_VERSION,
    VERSION,
    OperatorSettings,
)
from somabrain_operator.resources import ResolvedTenant, TenantSpec, defaults

LABEL_TENANT = f"{GROUP}/tenant"
LABEL_POOL = f"{GROUP}/pool"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "somabrain-operator"
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"
TENANT_FILE = "tenants.yaml"
TENANT_FILE_DIR = "/etc/somabrain/tenant"
PORT_NAME = "metrics"


def publisher_name(tenant_id: str) -> str:
    return f"somabrain-publisher-{tenant_id}"


def pool_publisher_name(pool: str) -> str:
    return f"somabrain-pool-{pool}"


def pool_identity(namespace: str, pool: str) -> str:
    """The name a pool's publisher runs under (`SOMABRAIN_POOL`): its Kafka
    transactional id derives from it, so pools of one name in two namespaces must not
    share it. The pool's name, cut to 31 characters, and 8 hex digits of a hash of
    namespace and pool (a valid pool name, at most 40 characters)."""
    digest = hashlib.sha256(f"{namespace}/{pool}".encode()).hexdigest()[:8]
    return f"{pool[:31].rstrip('-')}-{digest}"


def rule_name(tenant_id: str) -> str:
    return f"somabrain-tenant-{tenant_id}"


def owner_reference(*, name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Tenant",
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(tenant_id: str, component: str = "publisher") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "somabrain-publisher",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_COMPONENT: component,
        LABEL_TENANT: tenant_id,
    }


def _metadata(
    name: str, *, namespace: str, owner: dict[str, Any], tenant_id: str, component: str
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(tenant_id, component),
        "ownerReferences": [owner],
    }


def _publisher_metadata(
    spec: TenantSpec, *, namespace: str, owner: dict[str, Any]
) -> dict[str, Any]:
    """Metadata of the dedicated publisher's Deployment, ConfigMap and Service."""
    return _metadata(
        publisher_name(spec.tenant_id),
        namespace=namespace,
        owner=owner,
        tenant_id=spec.tenant_id,
        component="publisher",
    )


def _publisher_selector(tenant_id: str) -> dict[str, str]:
    return {LABEL_TENANT: tenant_id, LABEL_COMPONENT: "publisher"}


def _pool_selector(pool: str) -> dict[str, str]:
    return {LABEL_POOL: pool, LABEL_COMPONENT: "publisher"}


def _number(value: float) -> str:
    return f"{value:g}"


def tenant_file(spec: TenantSpec, resolved: ResolvedTenant) -> str:
    """The publisher's per-tenant settings file for this tenant (see
    `somabrain.config.settings.load_tenant_overrides`)."""
    return yaml.safe_dump({"tenants": {spec.tenant_id: _file_entry(resolved)}}, sort_keys=True)


def _file_entry(resolved: ResolvedTenant) -> dict[str, Any]:
    q = resolved.quotas
    entry: dict[str, Any] = {
        "batch_size": q.batch_size,
        "max_in_flight": q.max_in_flight,
        "circuit_failure_threshold": resolved.circuit_failure_threshold,
        "circuit_open_seconds": resolved.circuit_open_seconds,
        "poison_policy": resolved.poison_policy,
        "dead_letter_topic": resolved.dead_letter_topic or "",
        "feature_flags": dict(sorted(resolved.feature_flags.items())),
    }
    if q.events_per_second is not None:
        entry["events_per_second"] = q.events_per_second
    if q.max_pending is not None:
        entry["max_pending"] = q.max_pending
    return entry


def start_settings(resolved: ResolvedTenant) -> dict[str, str]:
    """The tenant's settings a publisher reads once at start and applies to every tenant
    it serves: the members of a shared pool must agree on them."""
    return {
        "SOMABRAIN_DELIVERY_MODE": resolved.delivery_mode,
        "SOMABRAIN_MAX_ATTEMPTS": str(resolved.max_attempts),
        "SOMABRAIN_RETRY_BACKOFF_SECONDS": _number(resolved.retry_backoff_seconds),
        "SOMABRAIN_RETRY_BACKOFF_MAX_SECONDS": _number(resolved.retry_backoff_max_seconds),
        "SOMABRAIN_RETENTION_SECONDS": _number(resolved.retention_seconds),
    }


def _process_settings(settings: OperatorSettings) -> dict[str, str]:
    return {
        "SOMABRAIN_METRICS_PORT": str(settings.publisher_metrics_port),
        "SOMABRAIN_TENANT_CONFIG_FILE": f"{TENANT_FILE_DIR}/{TENANT_FILE}",
    }


def publisher_environment(
    spec: TenantSpec, resolved: ResolvedTenant, settings: OperatorSettings
) -> dict[str, str]:
    """What the publisher reads once at start; a change restarts it."""
    return {
        "SOMABRAIN_TENANT": spec.tenant_id,
        **start_settings(resolved),
        **_process_settings(settings),
    }


def config_map(
    spec: TenantSpec,
    resolved: ResolvedTenant,
    *,
    namespace: str,
    owner: dict[str, Any],
    settings: OperatorSettings,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _publisher_metadata(spec, namespace=namespace, owner=owner),
        "data": {
            **publisher_environment(spec, resolved, settings),
            TENANT_FILE: tenant_file(spec, resolved),
        },
    }


def config_hash(config: dict[str, Any]) -> str:
    """Hash of the settings a publisher reads only at start (not the re-read file); in
    the pod template, so a change of those rolls the pods."""
    data = {k: v for k, v in config["data"].items() if k != TENANT_FILE}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def deployment(
    spec: TenantSpec,
    resolved: ResolvedTenant,
    *,
    namespace: str,
    owner: dict[str, Any],
    settings: OperatorSettings,
    config: dict[str, Any],
) -> dict[str, Any]:
    """The tenant's publisher; a second replica only waits as a standby."""
    return _publisher_deployment(
        _publisher_metadata(spec, namespace=namespace, owner=owner),
        selector=_publisher_selector(spec.tenant_id),
        args=["--tenant", spec.tenant_id],
        replicas=resolved.replicas,
        resources=_resources(spec),
        settings=settings,
        config=config,
    )


def _publisher_deployment(
    metadata: dict[str, Any],
    *,
    selector: dict[str, str],
    args: list[str],
    replicas: int,
    resources: dict[str, Any],
    settings: OperatorSettings,
    config: dict[str, Any],
) -> dict[str, Any]:
    secret = settings.connection_secret
    config_name = config["metadata"]["name"]
    env = [
        {"name": name, "valueFrom": {"configMapKeyRef": {"name": config_name, "key": name}}}
        for name in sorted(k for k in config["data"] if k != TENANT_FILE)
    ]
    env += [
        _secret_env("SOMABRAIN_DATABASE_URL", secret, "DATABASE_URL"),
        _secret_env("SOMABRAIN_KAFKA_BOOTSTRAP_SERVERS", secret, "KAFKA_BOOTSTRAP_SERVERS"),
    ]

    def probe(path: str, period: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": PORT_NAME},
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        }

    container = {
        "name": "publisher",
        "image": settings.publisher_image,
        "command": ["somabrain", "publisher", "run"],
        "args": args,
        "env": env,
        "ports": [
            {"name": PORT_NAME, "containerPort": settings.publisher_metrics_port, "protocol": "TCP"}
        ],
        # Liveness: the drain loop runs. Readiness: this pod is the active publisher
        # (a standby replica is alive and not ready).
        "livenessProbe": probe("/healthz", 10),
        "readinessProbe": probe("/readyz", 5),
        "resources": resources,
        "volumeMounts": [{"name": "tenant-config", "mountPath": TENANT_FILE_DIR, "readOnly": True}],
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": replicas,
            # Recreate: the old pod releases the tenants' locks before the new one starts.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": dict(metadata["labels"]),
                    "annotations": {ANNOTATION_CONFIG_HASH: config_hash(config)},
                },
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "tenant-config",
                            "configMap": {
                                "name": config_name,
                                "items": [{"key": TENANT_FILE, "path": TENANT_FILE}],
                            },
                        }
                    ],
                },
            },
        },
    }


def service(
    spec: TenantSpec, *, namespace: str, owner: dict[str, Any], settings: OperatorSettings
) -> dict[str, Any]:
    """The publisher's metrics and health endpoints, for Prometheus and people."""
    return _publisher_service(
        _publisher_metadata(spec, namespace=namespace, owner=owner),
        selector=_publisher_selector(spec.tenant_id),
        settings=settings,
    )


def _publisher_service(
    metadata: dict[str, Any], *, selector: dict[str, str], settings: OperatorSettings
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": settings.publisher_metrics_port,
                    "targetPort": PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


@dataclasses.dataclass(frozen=True)
class PoolMember:
    """A Tenant served by a shared pool's publisher, with what is in effect for it."""

    name: str
    uid: str
    tenant_id: str
    resolved: ResolvedTenant


def pool_owner_reference(member: PoolMember) -> dict[str, Any]:
    """An owner reference to one member: the pool's objects have one per member and no
    controller, so they go (garbage collection) with the last member."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Tenant",
        "name": member.name,
        "uid": member.uid,
    }


def _pool_metadata(pool: str, *, namespace: str, members: list[PoolMember]) -> dict[str, Any]:
    return {
        "name": pool_publisher_name(pool),
        "namespace": namespace,
        "labels": pool_labels(pool),
        "ownerReferences": [pool_owner_reference(m) for m in members],
    }


def pool_labels(pool: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "somabrain-publisher",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_COMPONENT: "publisher",
        LABEL_POOL: pool,
    }


def pool_config_map(
    pool: str, *, namespace: str, members: list[PoolMember], settings: OperatorSettings
) -> dict[str, Any]:
    """The pool publisher's settings: its tenants and the start-time settings they share
    (from the first member; the members given must agree on them), and one entry per
    tenant in the re-read file. Adding or removing a tenant restarts the pool."""
    if not members:
        raise ValueError(f"pool {pool} has no members")
    tenants = sorted(m.tenant_id for m in members)
    entries = {m.tenant_id: _file_entry(m.resolved) for m in members}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _pool_metadata(pool, namespace=namespace, members=members),
        "data": {
            "SOMABRAIN_POOL": pool_identity(namespace, pool),
            "SOMABRAIN_TENANTS": ",".join(tenants),
            **start_settings(members[0].resolved),
            **_process_settings(settings),
            TENANT_FILE: yaml.safe_dump({"tenants": entries}, sort_keys=True),
        },
    }


def pool_deployment(
    pool: str,
    *,
    namespace: str,
    members: list[PoolMember],
    settings: OperatorSettings,
    config: dict[str, Any],
) -> dict[str, Any]:
    """The pool's publisher, serving its tenants in turns (one replica: a standby of a
    pool waits for every tenant's lock and gains little)."""
    return _publisher_deployment(
        _pool_metadata(pool, namespace=namespace, members=members),
        selector=_pool_selector(pool),
        args=["--pool", pool_identity(namespace, pool)],
        replicas=1,
        resources=copy.deepcopy(defaults.PUBLISHER_RESOURCES),
        settings=settings,
        config=config,
    )


def pool_service(
    pool: str, *, namespace: str, members: list[PoolMember], settings: OperatorSettings
) -> dict[str, Any]:
    return _publisher_service(
        _pool_metadata(pool, namespace=namespace, members=members),
        selector=_pool_selector(pool),
        settings=settings,
    )


def prometheus_rule(
    spec: TenantSpec,
    resolved: ResolvedTenant,
    *,
    namespace: str,
    owner: dict[str, Any],
    settings: OperatorSettings,
) -> dict[str, Any]:
    """The tenant's alerts, with its thresholds, and its labels on every alert and on
    the object (with the operator's configured labels, for Prometheus's rule selector)."""
    t = resolved.alert_thresholds
    thresholds = Thresholds(
        backlog_warning=t.backlog_warning,
        backlog_critical=t.backlog_critical,
        oldest_pending_seconds=t.oldest_pending_seconds,
        publisher_down_for=t.publisher_down_for,
        backlog_for=t.backlog_for,
        circuit_open_for=t.circuit_open_for,
    )
    group = rule_group(tenant=spec.tenant_id, thresholds=thresholds)
    for rule in group["rules"]:
        rule["labels"] = {**resolved.alert_labels, **rule["labels"]}
    metadata = _metadata(
        rule_name(spec.tenant_id),
        namespace=namespace,
        owner=owner,
        tenant_id=spec.tenant_id,
        component="alerts",
    )
    metadata["labels"] = {**settings.rule_labels, **resolved.alert_labels, **metadata["labels"]}
    return {
        "apiVersion": f"{RULE_GROUP}/{RULE_VERSION}",
        "kind": "PrometheusRule",
        "metadata": metadata,
        "spec": {"groups": [group]},
    }


def resource_quota(
    spec: TenantSpec, *, namespace: str, owner: dict[str, Any]
) -> dict[str, Any] | None:
    """The ResourceQuota the Tenant asks for, if it asks for one."""
    if spec.resource_quota is None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": _metadata(
            f"somabrain-tenant-{spec.tenant_id}",
            namespace=namespace,
            owner=owner,
            tenant_id=spec.tenant_id,
            component="quota",
        ),
        "spec": {"hard": dict(spec.resource_quota.hard)},
    }


def _resources(spec: TenantSpec) -> dict[str, Any]:
    """The Tenant's requests and limits as written, or defaults when it sets none (never
    a mix, which could put a default limit below the Tenant's request)."""
    if spec.publisher is not None and spec.publisher.resources is not None:
        return spec.publisher.resources.to_body()
    return copy.deepcopy(defaults.PUBLISHER_RESOURCES)


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
