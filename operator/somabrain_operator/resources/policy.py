"""The OutboxPolicy kind: defaults shared by many tenants, and staged flag rollouts.

A Tenant refers to a policy by name (spec.policyRef); a field a Tenant sets wins over
the policy's. Rollout steps are validated so that a rollout that finishes covers
every tenant (case K-17): strictly increasing percents ending at 100.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Annotated, Literal

from pydantic import Field

from somabrain_operator.resources import defaults
from somabrain_operator.resources.base import Kind, PrinterColumn, ResourceModel, Rule
from somabrain_operator.resources.common import (
    KNOWN_FLAGS_SHOWN,
    MAX_ROLLOUTS,
    Alerts,
    Conditions,
    FeatureFlags,
    FlagName,
    PoisonPolicy,
    Quotas,
)

MAX_ROLLOUT_STEPS = 20
_SECONDS_PER_WEEK = 7 * 24 * 3600
_SECONDS_PER_YEAR = 366 * 24 * 3600

RolloutPhase = Literal["Progressing", "Paused", "RolledBack", "Complete"]

Steps = Annotated[
    list[Annotated[int, Field(ge=1, le=100)]],
    Field(
        min_length=1,
        max_length=MAX_ROLLOUT_STEPS,
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    ),
    Rule(
        "self.isSorted() && self.all(step, self.indexOf(step) == self.lastIndexOf(step))",
        "steps must be strictly increasing percents of tenants, for example [5, 25, 50, 100]",
        check=lambda steps: all(a < b for a, b in itertools.pairwise(steps)),
    ),
    Rule(
        # An empty list is minItems' to refuse (CEL still runs this rule on it).
        "self.size() == 0 || self[self.size() - 1] == 100",
        "steps must end at 100 so that a finished rollout covers every tenant: add 100 as "
        "the last step, for example [5, 25, 50, 100]",
        check=lambda steps: not steps or steps[-1] == 100,
    ),
]


class Retry(ResourceModel):
    """How a failed event is retried before it goes dead."""

    max_attempts: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Failed attempts before an event goes dead. Default "
        f"{defaults.publisher('max_attempts')}.",
    )
    backoff_seconds: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="First wait before a retry; each next wait doubles, with jitter. Default "
        f"{defaults.shown(defaults.publisher('retry_backoff_seconds'))}.",
    )
    backoff_max_seconds: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="Longest wait between two attempts; at least backoffSeconds. Default "
        f"{defaults.shown(defaults.publisher('retry_backoff_max_seconds'))}.",
    )

    validations = (
        Rule(
            "!has(self.backoffSeconds) || !has(self.backoffMaxSeconds) "
            "|| self.backoffMaxSeconds >= self.backoffSeconds",
            "backoffMaxSeconds must be at least backoffSeconds: raise backoffMaxSeconds or "
            "lower backoffSeconds",
            check=lambda r: (
                r.backoff_seconds is None
                or r.backoff_max_seconds is None
                or r.backoff_max_seconds >= r.backoff_seconds
            ),
            field_path=".backoffMaxSeconds",
        ),
    )


class Circuit(ResourceModel):
    """The per-tenant circuit breaker: pause a tenant whose batches keep failing."""

    failure_threshold: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Consecutive failed batches that open the circuit. Default "
        f"{defaults.publisher('circuit_failure_threshold')}.",
    )
    open_seconds: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="Pause of an open circuit before one probe batch. Default "
        f"{defaults.shown(defaults.publisher('circuit_open_seconds'))}.",
    )


class HealthGate(ResourceModel):
    """What canary tenants must satisfy for the rollout to go on; otherwise it rolls
    back. An unset field is not checked."""

    max_backlog: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000_000,
        description="Most pending events any canary tenant may have.",
    )
    max_oldest_pending_seconds: float | None = Field(
        default=None,
        ge=0,
        le=_SECONDS_PER_WEEK,
        description="Oldest pending event age, in seconds, any canary tenant may have.",
    )
    circuit_closed: bool | None = Field(
        default=None,
        description="true: a canary tenant whose circuit opens fails the gate.",
    )


class Rollout(ResourceModel):
    """A staged rollout of one feature flag across the policy's tenants. Tenants fall
    into cohorts by a stable hash of (flag, tenant id): a tenant in the first N percent
    gets the flag on at step N and keeps it at every later step."""

    flag: FlagName = Field(description="The feature flag turned on step by step.")
    steps: Steps = Field(
        description="Percents of tenants with the flag on, one per step: strictly "
        "increasing, ending at 100 (for example [5, 25, 50, 100])."
    )
    dwell_seconds: int | None = Field(
        default=None,
        ge=0,
        le=_SECONDS_PER_WEEK,
        description="How long each step must hold the health gate before the next one. "
        f"Default {defaults.ROLLOUT_DWELL_SECONDS}.",
    )
    health_gate: HealthGate | None = Field(
        default=None,
        description="What canary tenants must satisfy; unset: their circuit must stay closed.",
    )


class OutboxPolicySpec(ResourceModel):
    """Defaults for the Tenants that reference this policy, and rollouts of feature
    flags across them. A Tenant's own fields win over the policy's."""

    retry: Retry | None = Field(default=None, description="Retries of failed events.")
    poison_policy: PoisonPolicy | None = Field(
        default=None,
        description="block: a dead event holds back later events of its key; skip: they go "
        f"ahead. Default {defaults.publisher('poison_policy')}.",
    )
    quotas: Quotas | None = Field(default=None, description="Default quotas of the tenants.")
    circuit: Circuit | None = Field(default=None, description="The circuit breaker.")
    alerts: Alerts | None = Field(
        default=None, description="Default routing labels and thresholds of alerts."
    )
    feature_flags: FeatureFlags | None = Field(
        default=None,
        description="Flags set for every tenant of the policy, by name (a rollout of the "
        f"same flag overrides it for its cohort). Known flags: {KNOWN_FLAGS_SHOWN}.",
    )
    retention_seconds: int | None = Field(
        default=None,
        ge=60,
        le=_SECONDS_PER_YEAR,
        description="Age in seconds after which sent events are purged from the outbox. "
        f"Default {defaults.shown(defaults.publisher('retention_seconds'))}.",
    )
    rollouts: list[Rollout] | None = Field(
        default=None,
        max_length=MAX_ROLLOUTS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["flag"]},
        description="Staged rollouts of feature flags, at most one per flag.",
    )


class RolloutState(ResourceModel):
    """Where one rollout stands."""

    flag: str = Field(min_length=1, max_length=63, description="The rollout's feature flag.")
    step: int = Field(
        ge=0, le=MAX_ROLLOUT_STEPS - 1, description="Index of the current step in steps."
    )
    percent: int = Field(ge=0, le=100, description="Percent of tenants with the flag on.")
    phase: RolloutPhase = Field(
        description="Progressing (advancing while the gate holds), Paused, RolledBack (the "
        "gate failed; the flag is off again) or Complete (at 100 percent)."
    )
    reason: str | None = Field(
        default=None, max_length=1024, description="Why the rollout is in this phase."
    )
    step_started_at: dt.datetime | None = Field(
        default=None, description="When the current step began; dwellSeconds counts from it."
    )


class OutboxPolicyStatus(ResourceModel):
    """What the operator observed and did; written by the operator only."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation this status describes."
    )
    conditions: Conditions | None = Field(default=None, description="Ready and related conditions.")
    tenants: int | None = Field(default=None, ge=0, description="Tenants referencing this policy.")
    rollouts: list[RolloutState] | None = Field(
        default=None,
        max_length=MAX_ROLLOUTS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["flag"]},
        description="Where each rollout stands.",
    )


OUTBOX_POLICY = Kind(
    kind="OutboxPolicy",
    plural="outboxpolicies",
    short_names=("obp",),
    description="Defaults and feature-flag rollouts shared by the Tenants that reference it.",
    spec=OutboxPolicySpec,
    status=OutboxPolicyStatus,
    printer_columns=(
        PrinterColumn("Tenants", "integer", ".status.tenants", "Tenants referencing it."),
        PrinterColumn("Rollout", "string", ".status.rollouts[*].phase", "Phase of each rollout."),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation."),
    ),
)
