"""The settings in effect for a Tenant: its spec over its OutboxPolicy over defaults.

Defaults (`defaults`) apply here, never in the CRD schema, so the API server stores
a spec exactly as it was written (case K-16); the result goes to `status.resolved`,
where users see what applies. For every field the first value set
wins, in this order: the Tenant, the OutboxPolicy, the default. Feature flags are
merged by name: the policy's, then the rollout cohorts the caller computed, then the
Tenant's own.

A rule the schema enforces between two fields of one object (maxInFlight at least
batchSize, backlogCritical above backlogWarning, backoffMaxSeconds at least
backoffSeconds) can still break once the fields come from different places: a
Tenant's maxInFlight under the default batchSize. `conflicts` checks them on the merged
settings and says where each value came from.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping, Sequence
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


TENANT_ORIGIN = "this Tenant"
DEFAULT_ORIGIN = "the default"

# Sections of one part of the settings (quotas, thresholds, retry), in the order they
# win, each with where it comes from ("this Tenant", "OutboxPolicy <name>").
Sections = Sequence[tuple[str, ResourceModel | None]]


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """A value in effect and where it came from."""

    value: Any
    origin: str


def _setting(name: str, sections: Sections, default: Any = None) -> Setting:
    """Field `name` of the first section that sets it, else `default`, with its origin."""
    for origin, section in sections:
        value = getattr(section, name) if section is not None else None
        if value is not None:
            return Setting(value, origin)
    return Setting(default, DEFAULT_ORIGIN)


def _policy_origin(spec: TenantSpec, policy: OutboxPolicySpec | None) -> str:
    return f"OutboxPolicy {spec.policy_ref.name}" if spec.policy_ref and policy else "OutboxPolicy"


def _quota_sections(spec: TenantSpec, policy: OutboxPolicySpec | None) -> Sections:
    return (
        (TENANT_ORIGIN, spec.quotas),
        (_policy_origin(spec, policy), policy.quotas if policy else None),
    )


def _threshold_sections(spec: TenantSpec, policy: OutboxPolicySpec | None) -> Sections:
    return (
        (TENANT_ORIGIN, spec.alerts.thresholds if spec.alerts else None),
        (
            _policy_origin(spec, policy),
            policy.alerts.thresholds if policy and policy.alerts else None,
        ),
    )


def _retry_sections(spec: TenantSpec, policy: OutboxPolicySpec | None) -> Sections:
    return ((_policy_origin(spec, policy), policy.retry if policy else None),)


@dataclasses.dataclass(frozen=True, slots=True)
class _PairRule:
    """`low` op `high` must hold between two fields of one section, as the schema
    enforces it within one object; the message's fix is the schema's."""

    part: str
    low: str
    high: str
    holds: Callable[[Any, Any], bool]
    wanted: str
    fix: str
    sections: Callable[[TenantSpec, OutboxPolicySpec | None], Sections]
    default: Callable[[str], Any]


# Field names are snake_case; `_camel` gives the manifest's.
_PAIR_RULES = (
    _PairRule(
        "quotas",
        "batch_size",
        "max_in_flight",
        operator.le,
        "maxInFlight must be at least batchSize",
        "raise maxInFlight or lower batchSize",
        _quota_sections,
        defaults.publisher,
    ),
    _PairRule(
        "alerts.thresholds",
        "backlog_warning",
        "backlog_critical",
        operator.lt,
        "backlogCritical must be greater than backlogWarning",
        "raise backlogCritical or lower backlogWarning",
        _threshold_sections,
        defaults.alert,
    ),
    _PairRule(
        "retry",
        "backoff_seconds",
        "backoff_max_seconds",
        operator.le,
        "backoffMaxSeconds must be at least backoffSeconds",
        "raise backoffMaxSeconds or lower backoffSeconds",
        _retry_sections,
        lambda name: defaults.publisher(f"retry_{name}"),
    ),
)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _shown(setting: Setting) -> str:
    return f"{defaults.shown(setting.value)} ({setting.origin})"


def conflicts(spec: TenantSpec, policy: OutboxPolicySpec | None = None) -> list[str]:
    """The rules between two fields that the schema enforces within one object and that
    the merge of the Tenant `spec`, its OutboxPolicy and the defaults breaks, one
    message each, naming each value and where it came from; empty when none. Pure."""
    found = []
    for rule in _PAIR_RULES:
        sections = rule.sections(spec, policy)
        low = _setting(rule.low, sections, rule.default(rule.low))
        high = _setting(rule.high, sections, rule.default(rule.high))
        if rule.holds(low.value, high.value):
            continue
        found.append(
            f"{rule.part}.{_camel(rule.high)} {_shown(high)} with {rule.part}."
            f"{_camel(rule.low)} {_shown(low)}: {rule.wanted}; {rule.fix}"
        )
    return found


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
    quotas = _quota_sections(spec, policy)
    retry = _retry_sections(spec, policy)
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
            events_per_second=_setting("events_per_second", quotas).value,
            batch_size=_setting("batch_size", quotas, defaults.publisher("batch_size")).value,
            max_in_flight=_setting(
                "max_in_flight", quotas, defaults.publisher("max_in_flight")
            ).value,
            max_pending=_setting("max_pending", quotas).value,
        ),
        # An explicit deliveryMode wins over the exactly-once flag (and its rollout).
        delivery_mode=first(spec.delivery_mode, flagged_mode, defaults.publisher("delivery_mode")),
        poison_policy=first(
            spec.poison_policy,
            policy.poison_policy if policy else None,
            defaults.publisher("poison_policy"),
        ),
        max_attempts=_setting("max_attempts", retry, defaults.publisher("max_attempts")).value,
        retry_backoff_seconds=_setting(
            "backoff_seconds", retry, defaults.publisher("retry_backoff_seconds")
        ).value,
        retry_backoff_max_seconds=_setting(
            "backoff_max_seconds", retry, defaults.publisher("retry_backoff_max_seconds")
        ).value,
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
    sections = _threshold_sections(spec, policy)
    return ResolvedThresholds(
        **{
            name: _setting(name, sections, defaults.alert(name)).value
            for name in ResolvedThresholds.model_fields
        }
    )
