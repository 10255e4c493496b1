"""The resource models in Python: the same refusals as the API server, unset stays unset,
settings resolve tenant over policy over defaults, rules between fields hold after that
merge (or are reported with where each value came from), and what the operator builds
from an accepted spec stays within what Kafka, Kubernetes and Prometheus accept."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pydantic
import pytest
from somabrain_operator import reconcile
from somabrain_operator.resources import (
    OutboxPolicySpec,
    OutboxPolicyStatus,
    ResolvedTenant,
    TenantSpec,
    TenantStatus,
    common,
    conflicts,
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


# Rules between fields after the merge ---------------------------------------------------


def _policy(**spec: Any) -> OutboxPolicySpec:
    return OutboxPolicySpec.from_body(spec)


CONFLICTS = [
    pytest.param(
        {"quotas": {"maxInFlight": 100}},
        None,
        "quotas.maxInFlight 100 (this Tenant) with quotas.batchSize 500 (the default): "
        "maxInFlight must be at least batchSize; raise maxInFlight or lower batchSize",
        id="tenant-in-flight-below-default-batch",
    ),
    pytest.param(
        {"quotas": {"batchSize": 50}},
        _policy(quotas={"maxInFlight": 40}),
        "quotas.maxInFlight 40 (OutboxPolicy standard) with quotas.batchSize 50 (this Tenant)",
        id="tenant-batch-above-policy-in-flight",
    ),
    pytest.param(
        {"alerts": {"thresholds": {"backlogWarning": 200_000}}},
        None,
        "alerts.thresholds.backlogCritical 100000 (the default) with "
        "alerts.thresholds.backlogWarning 200000 (this Tenant): backlogCritical must be "
        "greater than backlogWarning",
        id="tenant-warning-above-default-critical",
    ),
    pytest.param(
        {"alerts": {"thresholds": {"backlogWarning": 100}}},
        _policy(alerts={"thresholds": {"backlogCritical": 50}}),
        "alerts.thresholds.backlogCritical 50 (OutboxPolicy standard) with "
        "alerts.thresholds.backlogWarning 100 (this Tenant)",
        id="tenant-warning-above-policy-critical",
    ),
    pytest.param(
        {"alerts": {"thresholds": {"backlogWarning": 100_000}}},
        None,
        "alerts.thresholds.backlogCritical 100000 (the default) with "
        "alerts.thresholds.backlogWarning 100000 (this Tenant)",
        id="tenant-warning-equal-to-default-critical",
    ),
    pytest.param(
        {},
        _policy(retry={"backoffSeconds": 600}),
        "retry.backoffMaxSeconds 300 (the default) with retry.backoffSeconds 600 "
        "(OutboxPolicy standard): backoffMaxSeconds must be at least backoffSeconds",
        id="policy-backoff-above-default-max",
    ),
]


@pytest.mark.parametrize(("tenant", "policy", "message"), CONFLICTS)
def test_merged_settings_that_break_a_rule_of_one_object_are_named_with_their_origin(
    tenant: dict[str, Any], policy: OutboxPolicySpec | None, message: str
) -> None:
    spec = TenantSpec.from_body(
        {"tenantId": "acme", **({"policyRef": {"name": "standard"}} if policy else {}), **tenant}
    )

    [found] = conflicts(spec, policy)

    assert message in found


@pytest.mark.parametrize(
    ("tenant", "policy"),
    [
        pytest.param({}, None, id="defaults"),
        pytest.param(
            {"quotas": {"batchSize": 50}},
            _policy(quotas={"maxInFlight": 400}),
            id="tenant-batch-under-policy-in-flight",
        ),
        pytest.param(
            {"quotas": {"maxInFlight": 100, "batchSize": 100}},
            _policy(quotas={"batchSize": 500}),
            id="tenant-sets-both-over-policy",
        ),
        pytest.param(
            {"alerts": {"thresholds": {"backlogWarning": 40}}},
            _policy(alerts={"thresholds": {"backlogWarning": 8, "backlogCritical": 50}}),
            id="tenant-warning-under-policy-critical",
        ),
        pytest.param(
            {}, _policy(retry={"backoffSeconds": 300}), id="policy-backoff-equal-to-default-max"
        ),
    ],
)
def test_merged_settings_that_keep_the_rules_have_no_conflicts(
    tenant: dict[str, Any], policy: OutboxPolicySpec | None
) -> None:
    spec = TenantSpec.from_body({"tenantId": "acme", **tenant})

    assert conflicts(spec, policy) == []


def test_every_broken_rule_is_reported() -> None:
    spec = TenantSpec.from_body(
        {
            "tenantId": "acme",
            "policyRef": {"name": "standard"},
            "quotas": {"maxInFlight": 100},
            "alerts": {"thresholds": {"backlogCritical": 5}},
        }
    )
    policy = _policy(retry={"backoffSeconds": 3600})

    found = conflicts(spec, policy)

    assert [message.split(" ", 1)[0] for message in found] == [
        "quotas.maxInFlight",
        "alerts.thresholds.backlogCritical",
        "retry.backoffMaxSeconds",
    ]
    assert "alerts.thresholds.backlogWarning 10000 (the default)" in found[1]


def _body(spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "acme", "namespace": "team-a", "uid": "u1"}, "spec": spec}


def _policy_body(spec: dict[str, Any]) -> Callable[[str, str], dict[str, Any] | None]:
    return lambda namespace, name: {"metadata": {"name": name}, "spec": spec}


def test_a_tenant_whose_merged_settings_conflict_is_unresolved_with_a_reason() -> None:
    body = _body(
        {
            "tenantId": "acme",
            "policyRef": {"name": "standard"},
            "alerts": {"thresholds": {"backlogWarning": 100}},
        }
    )

    found = reconcile._resolve(
        body, _policy_body({"alerts": {"thresholds": {"backlogCritical": 50}}})
    )

    assert isinstance(found, reconcile._Unresolved)
    assert found.reason == "ConflictingSettings"
    assert found.message.startswith(
        "the settings in effect (this Tenant over OutboxPolicy standard over the defaults) "
        "break a rule: alerts.thresholds.backlogCritical 50 (OutboxPolicy standard) with "
        "alerts.thresholds.backlogWarning 100 (this Tenant)"
    )


def test_settings_in_effect_the_models_refuse_are_unresolved_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whatever bound the schema misses, a reconcile reports it instead of raising.
    def out_of_bounds(*args: Any, **kwargs: Any) -> ResolvedTenant:
        return ResolvedTenant.model_validate({"publisherMode": "elsewhere"})

    monkeypatch.setattr(reconcile, "resolve", out_of_bounds)

    found = reconcile._resolve(_body({"tenantId": "acme"}), _policy_body({}))

    assert isinstance(found, reconcile._Unresolved)
    assert found.reason == "InvalidSettings"
    assert "publisherMode" in found.message
    assert "\n" not in found.message


# Bounds of what the operator builds from the spec ---------------------------------------


def test_largest_tenant_under_the_largest_policy_resolves_within_kafka_s_limit() -> None:
    spec = TenantSpec.from_body(largest_tenant_spec())
    policy = OutboxPolicySpec.from_body(largest_policy_spec())

    resolved = resolve(spec, policy)

    assert resolved.dead_letter_topic is not None
    assert len(resolved.dead_letter_topic) == common.TOPIC_MAX_LENGTH
    assert conflicts(spec, policy) == []


def test_tenant_and_policy_labels_of_different_names_all_resolve() -> None:
    labels = largest_tenant_spec()["alerts"]["labels"]
    spec = TenantSpec.from_body({"tenantId": "acme", "alerts": {"labels": labels}})
    others = {"p" + name[1:]: value for name, value in labels.items()}

    resolved = resolve(spec, _policy(alerts={"labels": others}))

    assert resolved.alert_labels == {**others, **labels}
    assert len(resolved.alert_labels) == 2 * common.MAX_ALERT_LABELS


# Kubernetes' label key and value syntax, and Prometheus' label name syntax.
_K8S_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_PROMETHEUS_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@pytest.mark.parametrize(
    "name",
    ["team", "Team", "t", "team_2", "x" * 63, "x" * 64, "_team", "team_", "2team", "a-b", "a.b",
     "example.com/team", "__name__", ""],
)  # fmt: skip
def test_alert_label_names_are_accepted_when_both_kubernetes_and_prometheus_accept_them(
    name: str,
) -> None:
    kubernetes = len(name) <= 63 and _K8S_NAME.fullmatch(name) is not None
    prometheus = _PROMETHEUS_NAME.fullmatch(name) is not None

    try:
        TenantSpec.from_body({"tenantId": "acme", "alerts": {"labels": {name: "x"}}})
    except pydantic.ValidationError:
        accepted = False
    else:
        accepted = True

    assert accepted == (kubernetes and prometheus)


def test_longest_duration_the_schema_allows_is_within_prometheus_range() -> None:
    # Prometheus (model.ParseDuration) refuses durations beyond int64 nanoseconds.
    ms = {"y": 365 * 86_400_000, "w": 7 * 86_400_000, "d": 86_400_000, "h": 3_600_000,
          "m": 60_000, "s": 1000, "ms": 1}  # fmt: skip
    longest = sum(
        (10**digits - 1) * ms[unit] for unit, digits in common.DURATION_UNIT_DIGITS.items()
    )
    pattern = re.compile(common.DURATION_PATTERN)
    written = "".join(f"{'9' * n}{unit}" for unit, n in common.DURATION_UNIT_DIGITS.items())

    assert longest * 1_000_000 < 2**63
    assert pattern.fullmatch(written)
    assert not pattern.fullmatch("100y")
    assert not pattern.fullmatch("99999999999y")
