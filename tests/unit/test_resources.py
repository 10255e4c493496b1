"""The resource models in Python: the same refusals as the API server, unset stays unset,
and settings resolve tenant over policy over defaults."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
from somabrain_operator.resources import (
    OutboxPolicySpec,
    OutboxPolicyStatus,
    TenantSpec,
    TenantStatus,
    resolve,
)
from somabrain_operator.resources.base import ResourceModel

from somabrain.config.settings import PublisherSettings
from somabrain.delivery.alerts import Thresholds
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

CASES = [
    *[(TenantSpec, case) for case in INVALID_TENANTS],
    *[(OutboxPolicySpec, case) for case in INVALID_POLICIES],
]


@pytest.mark.parametrize(("model", "case"), CASES, ids=[c.name for _, c in CASES])
def test_model_refuses_what_the_api_server_refuses(
    model: type[ResourceModel], case: Invalid
) -> None:
    with pytest.raises(pydantic.ValidationError) as refused:
        model.from_body(case.spec)

    if case.rule:
        assert case.message in str(refused.value)


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (TenantSpec, largest_tenant_spec()),
        (TenantSpec, largest_shared_tenant_spec()),
        (OutboxPolicySpec, largest_policy_spec()),
        (TenantStatus, full_tenant_status()),
        (OutboxPolicyStatus, full_policy_status()),
        (TenantSpec, {"tenantId": "acme"}),
        (OutboxPolicySpec, {}),
    ],
    ids=[
        "largest-tenant",
        "largest-shared-tenant",
        "largest-policy",
        "tenant-status",
        "policy-status",
        "min-tenant",
        "no-policy",
    ],
)
def test_body_round_trips_unchanged(model: type[ResourceModel], body: dict[str, Any]) -> None:
    assert model.from_body(body).to_body() == body


def test_largest_tenant_leaves_room_under_the_annotation_limit() -> None:
    # Kopf's diff-base and kubectl's last-applied-configuration each keep a copy of the
    # spec in annotations, which share 256 KiB (case K-13).
    size = len(json.dumps(largest_tenant_spec()))

    assert size < 64 * 1024, f"largest Tenant spec is {size} bytes"


def test_unset_fields_resolve_to_the_publisher_and_alert_defaults() -> None:
    resolved = resolve(TenantSpec.from_body({"tenantId": "acme"}))
    publisher = PublisherSettings.model_fields

    assert resolved.publisher_mode == "dedicated"
    assert resolved.replicas == 1
    assert resolved.deletion_policy == "Retain"
    assert resolved.quotas.batch_size == publisher["batch_size"].default
    assert resolved.quotas.max_in_flight == publisher["max_in_flight"].default
    assert resolved.quotas.events_per_second is None
    assert resolved.delivery_mode == publisher["delivery_mode"].default
    assert resolved.poison_policy == publisher["poison_policy"].default
    assert resolved.max_attempts == publisher["max_attempts"].default
    assert resolved.alert_thresholds.backlog_warning == Thresholds().backlog_warning
    assert resolved.feature_flags == {}
    assert resolved.policy is None


def test_tenant_fields_win_over_policy_fields_over_defaults() -> None:
    spec = TenantSpec.from_body(
        {
            "tenantId": "acme",
            "policyRef": {"name": "standard"},
            "quotas": {"batchSize": 50},
            "featureFlags": {"dead-letter": False},
            "alerts": {"thresholds": {"backlogWarning": 7}},
            "deadLetterTopic": "{tenant}.dead",
        }
    )
    policy = OutboxPolicySpec.from_body(
        {
            "quotas": {"batchSize": 100, "maxInFlight": 400},
            "poisonPolicy": "skip",
            "retry": {"maxAttempts": 3},
            "featureFlags": {"dead-letter": True, "exactly-once": True},
            "alerts": {"thresholds": {"backlogWarning": 8, "backlogCritical": 9}},
        }
    )

    resolved = resolve(spec, policy, rollout_flags={"exactly-once": False, "canary": True})

    assert resolved.policy == "standard"
    assert (resolved.quotas.batch_size, resolved.quotas.max_in_flight) == (50, 400)
    assert resolved.poison_policy == "skip"
    assert resolved.max_attempts == 3
    assert resolved.feature_flags == {
        "dead-letter": False,
        "exactly-once": False,
        "canary": True,
    }
    assert resolved.alert_thresholds.backlog_warning == 7
    assert resolved.alert_thresholds.backlog_critical == 9
    assert resolved.dead_letter_topic == "acme.dead"


def test_shared_tenant_resolves_to_its_pool_without_replicas() -> None:
    spec = TenantSpec.from_body(
        {"tenantId": "acme", "publisher": {"mode": "shared", "pool": "small"}}
    )

    resolved = resolve(spec)

    assert (resolved.publisher_mode, resolved.pool, resolved.replicas) == ("shared", "small", 0)
