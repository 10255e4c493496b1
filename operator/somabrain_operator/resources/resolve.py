"""The settings in effect for a Tenant: its spec over its OutboxPolicy over defaults.

Defaults (`defaults`) apply here, never in the CRD schema, so the API server stores
a spec exactly as it was written (case K-16); the result goes to `status.resolved`,
where users see what applies. For every field the first value set
wins, in this order: the Tenant, the OutboxPolicy, the default. Feature flags are
merged by name: the policy's, then the rollout cohorts the caller computed, then the
Tenant's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from somabrain.config import flags
from somabrain_operator.resources import defaults
from somabrain_operator.resources.base import ResourceModel
from somabrain_operator.resources.policy import OutboxPolicySpec
from somabrain_operator.resources.tenant import (
    ResolvedQuotas,
    ResolvedTenant,
    ResolvedThresholds,
    TenantSpec,
)

T = TypeVar("T")


def first(*values: T | None) -> T | None:
    """The first value that is set."""
    return next((v for v in values if v is not None), None)


def _field(name: str, *sections: ResourceModel | None, default: Any = None) -> Any:
    """Field `name` of the first section that sets it, else `default`."""
    return first(*(getattr(s, name) for s in sections if s is not None), default)


def resolve(
    spec: TenantSpec,
    policy: OutboxPolicySpec | None = None,
    *,
    rollout_flags: Mapping[str, bool] | None = None,
) -> ResolvedTenant:
    """What applies to the tenant of `spec`, given its OutboxPolicy (None when it has
    none, or the referenced one does not exist) and the flags its rollout cohorts turn
    on or off."""
    publisher = spec.publisher
    mode = _field("mode", publisher, default=defaults.PUBLISHER_MODE)
    # A shared pool's publisher serves the tenant: it has no pods of its own.
    replicas = 0 if mode == "shared" else _field("replicas", publisher, default=defaults.REPLICAS)
    quotas = (spec.quotas, policy.quotas if policy else None)
    retry = policy.retry if policy else None
    circuit = policy.circuit if policy else None
    dead_letter = spec.dead_letter_topic

    feature_flags = {
        **((policy.feature_flags or {}) if policy else {}),
        **(rollout_flags or {}),
        **(spec.feature_flags or {}),
    }
    eos_flag = feature_flags.get(flags.EXACTLY_ONCE.name)
    flagged_mode = None if eos_flag is None else "exactly-once" if eos_flag else "at-least-once"

    return ResolvedTenant(
        policy=spec.policy_ref.name if spec.policy_ref and policy else None,
        publisher_mode=mode,
        pool=_field("pool", publisher),
        replicas=replicas,
        quotas=ResolvedQuotas(
            events_per_second=_field("events_per_second", *quotas),
            batch_size=_field("batch_size", *quotas, default=defaults.publisher("batch_size")),
            max_in_flight=_field(
                "max_in_flight", *quotas, default=defaults.publisher("max_in_flight")
            ),
            max_pending=_field("max_pending", *quotas),
        ),
        # An explicit deliveryMode wins over the exactly-once flag (and its rollout).
        delivery_mode=first(spec.delivery_mode, flagged_mode, defaults.publisher("delivery_mode")),
        poison_policy=first(
            spec.poison_policy,
            policy.poison_policy if policy else None,
            defaults.publisher("poison_policy"),
        ),
        max_attempts=_field("max_attempts", retry, default=defaults.publisher("max_attempts")),
        retry_backoff_seconds=_field(
            "backoff_seconds", retry, default=defaults.publisher("retry_backoff_seconds")
        ),
        retry_backoff_max_seconds=_field(
            "backoff_max_seconds", retry, default=defaults.publisher("retry_backoff_max_seconds")
        ),
        circuit_failure_threshold=_field(
            "failure_threshold", circuit, default=defaults.publisher("circuit_failure_threshold")
        ),
        circuit_open_seconds=_field(
            "open_seconds", circuit, default=defaults.publisher("circuit_open_seconds")
        ),
        retention_seconds=first(
            policy.retention_seconds if policy else None, defaults.publisher("retention_seconds")
        ),
        dead_letter_topic=dead_letter.replace("{tenant}", spec.tenant_id) if dead_letter else None,
        feature_flags=feature_flags,
        alert_labels={
            **((policy.alerts.labels or {}) if policy and policy.alerts else {}),
            **((spec.alerts.labels or {}) if spec.alerts else {}),
        },
        alert_thresholds=_thresholds(spec, policy),
        deletion_policy=first(spec.deletion_policy, defaults.DELETION_POLICY),
    )


def _thresholds(spec: TenantSpec, policy: OutboxPolicySpec | None) -> ResolvedThresholds:
    sections = (
        spec.alerts.thresholds if spec.alerts else None,
        policy.alerts.thresholds if policy and policy.alerts else None,
    )
    return ResolvedThresholds(
        **{
            name: _field(name, *sections, default=defaults.alert(name))
            for name in ResolvedThresholds.model_fields
        }
    )
