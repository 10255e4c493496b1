"""Example Tenants and OutboxPolicies shared by the unit and end-to-end CRD tests.

- the largest allowed specs: every list and map at its maximum, every string at its
  maximum length, every optional field set (case K-13; a Tenant in each publisher mode,
  as some fields exclude others), and still valid for what the operator makes of them
  (the dead-letter topic at Kafka's limit once {tenant} is expanded, alert labels valid
  on the PrometheusRule object too);
- statuses with every field the schema declares (case K-1);
- invalid specs, each with the field the API server names and the message it gives.

Sizes come from the models' own bounds, so a changed bound changes the examples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from somabrain_operator.resources import common, policy, tenant

from somabrain.config.types import TENANT_ID_MAX_LENGTH

TIME = "2025-01-02T03:04:05Z"


def _fill(prefix: str, length: int, pad: str = "x") -> str:
    return prefix + pad * (length - len(prefix))


def _flags() -> dict[str, bool]:
    return {name: i % 2 == 0 for i, name in enumerate(common.KNOWN_FLAG_NAMES)}


def _labels() -> dict[str, str]:
    return {
        # Both a Prometheus label name and a Kubernetes label key: no '_' at the end.
        _fill(f"l{i:02d}_", 63): "v" * common.LABEL_VALUE_MAX_LENGTH
        for i in range(common.MAX_ALERT_LABELS)
    }


def _thresholds() -> dict[str, Any]:
    return {
        "backlogWarning": 999_999_999,
        "backlogCritical": 1_000_000_000,
        "oldestPendingSeconds": 604_800,
        "publisherDownFor": "10y1w1d1h1m1s1ms",
        "backlogFor": "10y1w1d1h1m1s1ms",
        "circuitOpenFor": "10y1w1d1h1m1s1ms",
    }


def _quotas() -> dict[str, Any]:
    return {
        "eventsPerSecond": 1_000_000,
        "batchSize": 10_000,
        "maxInFlight": 1_000_000,
        "maxPending": 1_000_000_000,
    }


_LONGEST_DEAD_LETTER_TEMPLATE = common.TOPIC_MAX_LENGTH - TENANT_ID_MAX_LENGTH + len("{tenant}")


def largest_tenant_spec() -> dict[str, Any]:
    """The largest Tenant spec the schema accepts."""
    quantity = common.QUANTITY_MAX_LENGTH
    return {
        "tenantId": "t" * TENANT_ID_MAX_LENGTH,
        "policyRef": {"name": "p" * common.OBJECT_NAME_MAX_LENGTH},
        "topics": [_fill(f"{i:02d}.", common.TOPIC_MAX_LENGTH) for i in range(common.MAX_TOPICS)],
        "publisher": {
            "mode": "dedicated",
            "replicas": tenant.MAX_PUBLISHER_REPLICAS,
            "resources": {
                "requests": {"cpu": _fill("1.", quantity - 1, "0") + "m", "memory": "1" * quantity},
                "limits": {"cpu": _fill("2.", quantity, "0"), "memory": "2" * quantity},
            },
        },
        "quotas": _quotas(),
        "deliveryMode": "at-least-once",
        "poisonPolicy": "skip",
        # Kafka's longest topic name once {tenant} is replaced by the tenant id.
        "deadLetterTopic": _fill("{tenant}.", _LONGEST_DEAD_LETTER_TEMPLATE, "d"),
        "featureFlags": _flags(),
        "alerts": {"labels": _labels(), "thresholds": _thresholds()},
        "deletionPolicy": "Drain",
        "resourceQuota": {
            "hard": {
                # Qualified names of requested extended resources: no whole number needed.
                _fill(f"requests.r{i:02d}.example/", tenant.RESOURCE_NAME_MAX_LENGTH): "9"
                * quantity
                for i in range(tenant.MAX_QUOTA_RESOURCES)
            }
        },
    }


def largest_shared_tenant_spec() -> dict[str, Any]:
    """The largest Tenant spec in shared mode (pool excludes replicas and resources)."""
    return {
        **largest_tenant_spec(),
        "publisher": {"mode": "shared", "pool": "p" * TENANT_ID_MAX_LENGTH},
    }


def largest_policy_spec() -> dict[str, Any]:
    """The largest OutboxPolicy spec the schema accepts."""
    steps = list(range(100 - policy.MAX_ROLLOUT_STEPS + 1, 101))
    return {
        "retry": {"maxAttempts": 1000, "backoffSeconds": 3600, "backoffMaxSeconds": 86_400},
        "poisonPolicy": "block",
        "quotas": _quotas(),
        "circuit": {"failureThreshold": 1000, "openSeconds": 3600},
        "alerts": {"labels": _labels(), "thresholds": _thresholds()},
        "featureFlags": _flags(),
        "retentionSeconds": 366 * 24 * 3600,
        "rollouts": [
            {
                "flag": name,
                "steps": steps,
                "dwellSeconds": 604_800,
                "healthGate": {
                    "maxBacklog": 1_000_000_000,
                    "maxOldestPendingSeconds": 604_800,
                    "circuitClosed": True,
                },
            }
            for name in common.KNOWN_FLAG_NAMES
        ],
    }


def _condition(kind: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True",
        "reason": "ChildrenApplied",
        "message": "publisher Deployment somabrain-publisher-acme applied",
        "lastTransitionTime": TIME,
        "observedGeneration": 3,
    }


def full_tenant_status() -> dict[str, Any]:
    """A Tenant status with every field the schema declares."""
    return {
        "observedGeneration": 3,
        "conditions": [_condition("Ready"), _condition("PublisherAvailable")],
        "publisherMode": "dedicated",
        "children": {
            "deployment": "somabrain-publisher-acme",
            "configMap": "somabrain-publisher-acme",
            "service": "somabrain-publisher-acme",
            "prometheusRule": "somabrain-tenant-acme",
            "resourceQuota": "somabrain-tenant-acme",
        },
        "backlog": {
            "pending": 12,
            "oldestPendingSeconds": 1.5,
            "circuit": "half-open",
            "updatedAt": TIME,
        },
        "resolved": {
            "policy": "standard",
            "publisherMode": "dedicated",
            "pool": "small",
            "replicas": 1,
            "quotas": {
                "eventsPerSecond": 200.5,
                "batchSize": 500,
                "maxInFlight": 10_000,
                "maxPending": 50_000,
            },
            "deliveryMode": "exactly-once",
            "poisonPolicy": "block",
            "maxAttempts": 10,
            "retryBackoffSeconds": 1,
            "retryBackoffMaxSeconds": 300,
            "circuitFailureThreshold": 3,
            "circuitOpenSeconds": 30,
            "retentionSeconds": 86_400,
            "deadLetterTopic": "acme.dead-letter",
            "featureFlags": {"dead-letter": True},
            "alertLabels": {"team": "payments"},
            "alertThresholds": {
                "backlogWarning": 10_000,
                "backlogCritical": 100_000,
                "oldestPendingSeconds": 300,
                "publisherDownFor": "1m",
                "backlogFor": "10m",
                "circuitOpenFor": "5m",
            },
            "deletionPolicy": "Retain",
        },
    }


def full_policy_status() -> dict[str, Any]:
    """An OutboxPolicy status with every field the schema declares."""
    return {
        "observedGeneration": 2,
        "conditions": [_condition("Ready")],
        "tenants": 7,
        "rollouts": [
            {
                "flag": "dead-letter",
                "step": 1,
                "percent": 25,
                "phase": "Progressing",
                "reason": "step 1 held its health gate for 600 s",
                "stepStartedAt": TIME,
            }
        ],
    }


@dataclasses.dataclass(frozen=True)
class Invalid:
    """A spec the API server refuses: `field` is the path it names, `message` part of
    what it says. `rule` marks a CEL rule of ours, whose message the model gives too."""

    name: str
    spec: dict[str, Any]
    field: str
    message: str
    rule: bool = True


def _tenant(**fields: Any) -> dict[str, Any]:
    return {"tenantId": "acme", **fields}


def _rollout(steps: list[int]) -> dict[str, Any]:
    return {"rollouts": [{"flag": "dead-letter", "steps": steps}]}


INVALID_TENANTS = [
    Invalid(
        "bad-tenant-id",
        {"tenantId": "Acme_EU"},
        "spec.tenantId",
        "tenantId must be 1-40 lowercase letters, digits or '-'",
    ),
    Invalid("no-tenant-id", {}, "spec.tenantId", "Required value", rule=False),
    Invalid(
        "shared-without-pool",
        _tenant(publisher={"mode": "shared"}),
        "spec.publisher.pool",
        "pool is required when mode is shared",
    ),
    Invalid(
        "pool-with-dedicated",
        _tenant(publisher={"mode": "dedicated", "pool": "small"}),
        "spec.publisher.pool",
        "pool applies to mode shared only",
    ),
    Invalid(
        "pool-without-mode",
        _tenant(publisher={"pool": "small"}),
        "spec.publisher.pool",
        "pool applies to mode shared only",
    ),
    Invalid(
        "shared-with-replicas",
        _tenant(publisher={"mode": "shared", "pool": "small", "replicas": 2}),
        "spec.publisher",
        "replicas and resources apply to mode dedicated only",
    ),
    Invalid(
        "request-above-limit",
        _tenant(publisher={"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "500m"}}}),
        "spec.publisher.resources.requests.cpu",
        "requests.cpu cannot exceed limits.cpu",
    ),
    Invalid(
        "negative-quota",
        _tenant(quotas={"batchSize": -1}),
        "spec.quotas.batchSize",
        "should be greater than or equal to 1",
        rule=False,
    ),
    Invalid(
        "zero-rate",
        _tenant(quotas={"eventsPerSecond": 0}),
        "spec.quotas.eventsPerSecond",
        "should be greater than 0",
        rule=False,
    ),
    Invalid(
        "in-flight-below-batch",
        _tenant(quotas={"batchSize": 500, "maxInFlight": 100}),
        "spec.quotas.maxInFlight",
        "maxInFlight must be at least batchSize",
    ),
    Invalid(
        "too-many-topics",
        _tenant(topics=[f"t{i}" for i in range(common.MAX_TOPICS + 1)]),
        "spec.topics",
        f"must have at most {common.MAX_TOPICS} items",
        rule=False,
    ),
    Invalid(
        "topic-with-space",
        _tenant(topics=["has space"]),
        "spec.topics[0]",
        "should match",
        rule=False,
    ),
    Invalid(
        "dead-letter-topic-among-topics",
        _tenant(topics=["acme.orders", "acme.dead"], deadLetterTopic="{tenant}.dead"),
        "spec.deadLetterTopic",
        "deadLetterTopic cannot be one of topics",
    ),
    Invalid(
        "dead-letter-topic-too-long-once-expanded",
        {
            "tenantId": "t" * TENANT_ID_MAX_LENGTH,
            "deadLetterTopic": _fill("{tenant}.", _LONGEST_DEAD_LETTER_TEMPLATE + 1, "d"),
        },
        "spec.deadLetterTopic",
        "deadLetterTopic, with {tenant} replaced by the tenant id, must be at most 249",
    ),
    Invalid(
        "dead-letter-topic-too-long-with-two-tenants",
        # Each {tenant} grows by 12 characters: 226 + 2 * 12 = 250.
        {"tenantId": "t" * 20, "deadLetterTopic": _fill("{tenant}.{tenant}.", 226, "d")},
        "spec.deadLetterTopic",
        "deadLetterTopic, with {tenant} replaced by the tenant id, must be at most 249",
    ),
    Invalid(
        "bad-flag-name",
        _tenant(featureFlags={"fast-encode": True}),
        "spec.featureFlags",
        "featureFlags names must be among tenant-quotas, dead-letter, exactly-once",
    ),
    Invalid(
        "too-many-flags",
        _tenant(featureFlags={f"f{i}": True for i in range(common.MAX_FEATURE_FLAGS + 1)}),
        "spec.featureFlags",
        f"must have at most {common.MAX_FEATURE_FLAGS}",
        rule=False,
    ),
    Invalid(
        "reserved-alert-label",
        _tenant(alerts={"labels": {"tenant": "other"}}),
        "spec.alerts.labels",
        "labels cannot set tenant, alertname or severity",
    ),
    Invalid(
        # Every rule sets its own severity, which would replace the Tenant's silently.
        "reserved-severity-label",
        _tenant(alerts={"labels": {"severity": "page"}}),
        "spec.alerts.labels",
        "labels cannot set tenant, alertname or severity",
    ),
    Invalid(
        "alert-label-name-starting-with-underscore",
        _tenant(alerts={"labels": {"_team": "payments"}}),
        "spec.alerts.labels",
        "alert label names must be both Prometheus label names and Kubernetes label keys",
    ),
    Invalid(
        "alert-label-name-ending-with-underscore",
        _tenant(alerts={"labels": {"team_": "payments"}}),
        "spec.alerts.labels",
        "alert label names must be both Prometheus label names and Kubernetes label keys",
    ),
    Invalid(
        "alert-label-name-with-a-prefix",
        _tenant(alerts={"labels": {"example.com/team": "payments"}}),
        "spec.alerts.labels",
        "alert label names must be both Prometheus label names and Kubernetes label keys",
    ),
    Invalid(
        "alert-label-value-not-a-kubernetes-label-value",
        _tenant(alerts={"labels": {"team": "pay ments"}}),
        "spec.alerts.labels[team]",
        "alert label values must be Kubernetes label values",
    ),
    Invalid(
        "alert-duration-out-of-prometheus-range",
        _tenant(alerts={"thresholds": {"backlogFor": "99999999999y"}}),
        "spec.alerts.thresholds.backlogFor",
        "backlogFor must be a Prometheus duration",
    ),
    Invalid(
        "alert-duration-units-out-of-order",
        _tenant(alerts={"thresholds": {"publisherDownFor": "1m1h"}}),
        "spec.alerts.thresholds.publisherDownFor",
        "publisherDownFor must be a Prometheus duration",
    ),
    Invalid(
        "warning-above-critical",
        _tenant(alerts={"thresholds": {"backlogWarning": 500, "backlogCritical": 100}}),
        "spec.alerts.thresholds.backlogCritical",
        "backlogCritical must be greater than backlogWarning",
    ),
    Invalid(
        "quota-resource-not-standard",
        _tenant(resourceQuota={"hard": {"r00.example": "1"}}),
        "spec.resourceQuota.hard",
        "hard keys must be resource names a ResourceQuota accepts",
    ),
    Invalid(
        "quota-count-not-whole",
        _tenant(resourceQuota={"hard": {"count/deployments.apps": "1500m"}}),
        "spec.resourceQuota.hard",
        "must be whole numbers of at most 9223372036854775",
    ),
    Invalid(
        "quota-count-too-large",
        _tenant(resourceQuota={"hard": {"pods": "9223372036854776"}}),
        "spec.resourceQuota.hard",
        "must be whole numbers of at most 9223372036854775",
    ),
    Invalid(
        "unknown-deletion-policy",
        _tenant(deletionPolicy="Purge"),
        "spec.deletionPolicy",
        "Unsupported value",
        rule=False,
    ),
]

INVALID_POLICIES = [
    Invalid(
        "no-steps",
        _rollout([]),
        "spec.rollouts[0].steps",
        "should have at least 1 items",
        rule=False,
    ),
    Invalid(
        "steps-not-ending-at-100",
        _rollout([5, 25, 50]),
        "spec.rollouts[0].steps",
        "steps must end at 100",
    ),
    Invalid(
        "steps-not-increasing",
        _rollout([50, 25, 100]),
        "spec.rollouts[0].steps",
        "steps must be strictly increasing",
    ),
    Invalid(
        "steps-repeated",
        _rollout([25, 25, 100]),
        "spec.rollouts[0].steps",
        "steps must be strictly increasing",
    ),
    Invalid(
        "step-above-100",
        _rollout([50, 150]),
        "spec.rollouts[0].steps[1]",
        "should be less than or equal to 100",
        rule=False,
    ),
    Invalid(
        "backoff-max-below-backoff",
        {"retry": {"backoffSeconds": 60, "backoffMaxSeconds": 10}},
        "spec.retry.backoffMaxSeconds",
        "backoffMaxSeconds must be at least backoffSeconds",
    ),
    Invalid(
        "policy-alert-label-name-starting-with-underscore",
        {"alerts": {"labels": {"_team": "payments"}}},
        "spec.alerts.labels",
        "alert label names must be both Prometheus label names and Kubernetes label keys",
    ),
    Invalid(
        "policy-alert-duration-out-of-prometheus-range",
        {"alerts": {"thresholds": {"circuitOpenFor": "300y"}}},
        "spec.alerts.thresholds.circuitOpenFor",
        "circuitOpenFor must be a Prometheus duration",
    ),
    Invalid(
        "negative-policy-quota",
        {"quotas": {"maxPending": -5}},
        "spec.quotas.maxPending",
        "should be greater than or equal to 1",
        rule=False,
    ),
]
