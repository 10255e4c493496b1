"""The Tenant kind: one tenant of the outbox and how its events reach Kafka.

The spec holds only what the user wrote: every optional field may be left out, and
its effective value (from the referenced OutboxPolicy, else the publisher's defaults)
is computed by `somabrain_operator.resources.resolve` and reported in
`status.resolved`. The status declares every field the operator writes (case K-1).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import Field

from somabrain.config.settings import DEAD_LETTER_TOPIC_PATTERN
from somabrain.config.types import TENANT_ID_MAX_LENGTH, TENANT_ID_PATTERN
from somabrain_operator.resources import defaults
from somabrain_operator.resources.base import Kind, PrinterColumn, ResourceModel, Rule
from somabrain_operator.resources.common import (
    KNOWN_FLAGS_SHOWN,
    MAX_FEATURE_FLAGS,
    MAX_ROLLOUTS,
    MAX_TOPICS,
    TOPIC_MAX_LENGTH,
    Alerts,
    Conditions,
    Duration,
    FeatureFlags,
    MergedAlertLabels,
    ObjectName,
    PoisonPolicy,
    Quantity,
    Quotas,
    TopicName,
    matches,
    quantity,
)

MAX_PUBLISHER_REPLICAS = 3
MAX_QUOTA_RESOURCES = 16
# What a ResourceQuota's spec.hard accepts as keys (Kubernetes' validation of quota
# resource names): a standard quota resource, a hugepages one, or a qualified name with
# a DNS-subdomain prefix (count/deployments.apps, requests.nvidia.com/gpu); at most 63
# characters here.
RESOURCE_NAME_MAX_LENGTH = 63
# Counts of objects and extended resources (a qualified name outside kubernetes.io, not
# requests.-prefixed) must be whole numbers, and Kubernetes checks that in thousandths
# of an int64: larger ones are refused as "must be an integer".
INTEGER_QUOTA_RESOURCES = (
    "pods",
    "services",
    "replicationcontrollers",
    "resourcequotas",
    "secrets",
    "configmaps",
    "persistentvolumeclaims",
    "services.nodeports",
    "services.loadbalancers",
)
STANDARD_QUOTA_RESOURCES = (
    "cpu",
    "memory",
    "ephemeral-storage",
    "requests.cpu",
    "requests.memory",
    "requests.storage",
    "requests.ephemeral-storage",
    "limits.cpu",
    "limits.memory",
    "limits.ephemeral-storage",
    *INTEGER_QUOTA_RESOURCES,
)
# '[.]', not a backslash, which a CEL string literal would need escaped.
_NAME_PART = "[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_DNS_SUBDOMAIN = "[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
RESOURCE_NAME_PATTERN = f"^((requests[.])?hugepages-{_NAME_PART}|{_DNS_SUBDOMAIN}/{_NAME_PART})$"
MAX_QUOTA_COUNT = (2**63 - 1) // 1000

PublisherMode = Literal["dedicated", "shared"]
DeliveryMode = Literal["exactly-once", "at-least-once"]
DeletionPolicy = Literal["Drain", "Retain", "Delete"]
CircuitState = Literal["closed", "half-open", "open"]

TenantIdField = Annotated[
    str,
    Field(min_length=1, max_length=TENANT_ID_MAX_LENGTH),
    Rule(
        f"self.matches('{TENANT_ID_PATTERN}')",
        "tenantId must be 1-40 lowercase letters, digits or '-', starting with a letter "
        "and not ending with '-' (for example acme-eu)",
        check=matches(TENANT_ID_PATTERN),
    ),
    Rule(
        "self == oldSelf",
        "tenantId is immutable: the tenant's events, locks and checkpoints are keyed by "
        "it; create a new Tenant for another id",
        reason="FieldValueForbidden",
    ),
]
PoolName = Annotated[
    str,
    Field(min_length=1, max_length=TENANT_ID_MAX_LENGTH),
    Rule(
        f"self.matches('{TENANT_ID_PATTERN}')",
        "pool must be 1-40 lowercase letters, digits or '-', starting with a letter and "
        "not ending with '-' (for example small-tenants)",
        check=matches(TENANT_ID_PATTERN),
    ),
]
DeadLetterTopic = Annotated[
    str, Field(min_length=1, max_length=TOPIC_MAX_LENGTH, pattern=DEAD_LETTER_TOPIC_PATTERN)
]
_STANDARD_CEL = "[" + ", ".join(f"'{name}'" for name in STANDARD_QUOTA_RESOURCES) + "]"
_INTEGER_CEL = "[" + ", ".join(f"'{name}'" for name in INTEGER_QUOTA_RESOURCES) + "]"


def _quota_name(name: str) -> bool:
    return len(name) <= RESOURCE_NAME_MAX_LENGTH and (
        name in STANDARD_QUOTA_RESOURCES or matches(RESOURCE_NAME_PATTERN)(name)
    )


def _counted(name: str) -> bool:
    """Whether Kubernetes wants a whole number for quota resource `name`."""
    extended = "/" in name and "kubernetes.io/" not in name and not name.startswith("requests.")
    return name in INTEGER_QUOTA_RESOURCES or extended


def _whole_count(value: str) -> bool:
    try:
        amount = quantity(value)
    except ValueError:
        return True  # the pattern of the value refuses it
    return amount == amount.to_integral_value() and amount <= MAX_QUOTA_COUNT


QuotaHard = Annotated[
    dict[str, Quantity],
    Field(min_length=1, max_length=MAX_QUOTA_RESOURCES),
    Rule(
        f"self.all(name, name.size() <= {RESOURCE_NAME_MAX_LENGTH} && (name in {_STANDARD_CEL} "
        f"|| name.matches('{RESOURCE_NAME_PATTERN}')))",
        "hard keys must be resource names a ResourceQuota accepts, of at most 63 "
        "characters: a standard one (requests.cpu, limits.memory, pods, secrets, ...), "
        "hugepages-<size>, or a qualified name such as count/deployments.apps or "
        "requests.nvidia.com/gpu",
        check=lambda hard: all(_quota_name(name) for name in hard),
    ),
    Rule(
        f"self.all(name, !(name in {_INTEGER_CEL} || (name.contains('/') "
        "&& !name.contains('kubernetes.io/') && !name.startsWith('requests.'))) "
        "|| !isQuantity(self[name]) || (quantity(self[name]).isInteger() "
        f"&& quantity(self[name]).compareTo(quantity('{MAX_QUOTA_COUNT}')) <= 0))",
        "hard values of object counts and extended resources (pods, secrets, "
        "count/deployments.apps, example.com/gpu) must be whole numbers of at most "
        f"{MAX_QUOTA_COUNT}",
        check=lambda hard: all(
            _whole_count(value) for name, value in hard.items() if _counted(name)
        ),
    ),
]


def _shown_resources(resources: dict[str, dict[str, str]]) -> str:
    return "; ".join(
        f"{part} " + ", ".join(f"{name} {amount}" for name, amount in amounts.items())
        for part, amounts in resources.items()
    )


def _not_above(resource: str) -> Rule:
    requested, limit = f"self.requests.{resource}", f"self.limits.{resource}"
    return Rule(
        f"!has(self.requests) || !has(self.limits) || !has({requested}) || !has({limit}) "
        f"|| !isQuantity({requested}) || !isQuantity({limit}) "
        f"|| quantity({requested}).compareTo(quantity({limit})) <= 0",
        f"requests.{resource} cannot exceed limits.{resource}: lower the request or raise "
        "the limit",
        check=lambda r: (
            r.requests is None
            or r.limits is None
            or getattr(r.requests, resource) is None
            or getattr(r.limits, resource) is None
            or quantity(getattr(r.requests, resource)) <= quantity(getattr(r.limits, resource))
        ),
        field_path=f".requests.{resource}",
    )


class ResourceAmounts(ResourceModel):
    """CPU and memory, as Kubernetes quantities."""

    cpu: Quantity | None = Field(
        default=None, description="CPU, in cores or millicores (for example 250m)."
    )
    memory: Quantity | None = Field(
        default=None, description="Memory, in bytes with a suffix (for example 256Mi)."
    )


class PublisherResources(ResourceModel):
    """Compute resources of the publisher container."""

    requests: ResourceAmounts | None = Field(
        default=None, description="What the scheduler reserves for the container."
    )
    limits: ResourceAmounts | None = Field(
        default=None, description="The most the container may use."
    )

    validations = (_not_above("cpu"), _not_above("memory"))


class PublisherSpec(ResourceModel):
    """How the tenant's events are published: by a Deployment of its own, or in turns
    by the publisher of a shared pool."""

    mode: PublisherMode | None = Field(
        default=None,
        description="dedicated: a publisher Deployment serves this tenant alone; shared: "
        "the publisher of pool serves it in turns with the pool's other tenants. Unset: "
        f"{defaults.PUBLISHER_MODE}.",
    )
    pool: PoolName | None = Field(
        default=None,
        description="The shared publisher serving this tenant; required when mode is "
        "shared, not allowed otherwise.",
    )
    replicas: int | None = Field(
        default=None,
        ge=1,
        le=MAX_PUBLISHER_REPLICAS,
        description="Publisher pods of a dedicated publisher: one is active, the others "
        f"wait as standbys and take over if it dies. Unset: {defaults.REPLICAS}.",
    )
    resources: PublisherResources | None = Field(
        default=None,
        description="Compute resources of a dedicated publisher's container, used as "
        f"written. Unset: {_shown_resources(defaults.PUBLISHER_RESOURCES)}.",
    )

    validations = (
        Rule(
            "!has(self.mode) || self.mode != 'shared' || has(self.pool)",
            "pool is required when mode is shared: name the shared publisher that serves "
            "this tenant, or set mode: dedicated",
            check=lambda p: p.mode != "shared" or p.pool is not None,
            field_path=".pool",
            reason="FieldValueRequired",
        ),
        Rule(
            "!has(self.pool) || (has(self.mode) && self.mode == 'shared')",
            "pool applies to mode shared only: set mode: shared, or remove pool",
            check=lambda p: p.pool is None or p.mode == "shared",
            field_path=".pool",
        ),
        Rule(
            "!has(self.mode) || self.mode != 'shared' || (!has(self.replicas) "
            "&& !has(self.resources))",
            "replicas and resources apply to mode dedicated only (a shared publisher is "
            "sized with its pool): remove them, or set mode: dedicated",
            check=lambda p: p.mode != "shared" or (p.replicas is None and p.resources is None),
        ),
    )


class PolicyReference(ResourceModel):
    """An OutboxPolicy in the Tenant's namespace."""

    name: ObjectName = Field(description="Name of the OutboxPolicy.")


class ResourceQuotaSpec(ResourceModel):
    """A ResourceQuota the operator creates in the Tenant's namespace."""

    hard: QuotaHard = Field(
        description="Limits per resource name, as in ResourceQuota.spec.hard (for "
        "example requests.cpu: '2', pods: '10')."
    )


class TenantSpec(ResourceModel):
    """What the tenant is and how its events are published. Unset optional fields take
    the value of the referenced OutboxPolicy, else a default; status.resolved shows the
    result."""

    tenant_id: TenantIdField = Field(
        description="Id of the tenant in the outbox (the tenant_id of its events): 1-40 "
        "lowercase letters, digits or '-', starting with a letter and not ending with '-'. "
        "Unique across namespaces (of two Tenants with one id, the older has it). Cannot "
        "change after creation."
    )
    policy_ref: PolicyReference | None = Field(
        default=None,
        description="The OutboxPolicy, in this namespace, whose defaults and rollouts apply "
        "to the tenant. Unset: built-in defaults only.",
    )
    topics: list[TopicName] | None = Field(
        default=None,
        max_length=MAX_TOPICS,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Kafka topics the tenant's events go to, created ahead of time: for "
        "reference, and so that deadLetterTopic is checked to be none of them. Enqueue does "
        "not limit a tenant's events to these.",
    )
    publisher: PublisherSpec | None = Field(
        default=None, description="Which publisher serves the tenant, and its size."
    )
    quotas: Quotas | None = Field(
        default=None, description="Rate, batch and backlog limits of the tenant."
    )
    delivery_mode: DeliveryMode | None = Field(
        default=None,
        description="exactly-once: Kafka transactions, no duplicates for read_committed "
        "consumers; at-least-once: for brokers without transactions, a crash may republish "
        "a batch. Set, it wins over the exactly-once feature flag (of the Tenant, its "
        "policy or a rollout); unset, that flag decides (true: exactly-once, false: "
        f"at-least-once), and without it: {defaults.publisher('delivery_mode')}.",
    )
    poison_policy: PoisonPolicy | None = Field(
        default=None,
        description="block: a dead event holds back later events of its key until it is "
        "replayed; skip: they go ahead. Unset: the OutboxPolicy's, else "
        f"{defaults.publisher('poison_policy')}.",
    )
    dead_letter_topic: DeadLetterTopic | None = Field(
        default=None,
        description="Topic receiving a copy of every event that goes dead; {tenant} stands "
        "for the tenant id. Must not be one of topics; at most 249 characters once {tenant} is "
        "replaced. Unset: no copies.",
    )
    feature_flags: FeatureFlags | None = Field(
        default=None,
        description="Flags of tenant-aware publisher behaviour, by name; they override "
        f"the OutboxPolicy's flags and its rollouts. Known flags: {KNOWN_FLAGS_SHOWN}.",
    )
    alerts: Alerts | None = Field(
        default=None, description="Routing labels and thresholds of the tenant's alerts."
    )
    deletion_policy: DeletionPolicy | None = Field(
        default=None,
        description="What deleting the Tenant does to its backlog. Drain: stop new work and "
        "wait for pending events to be delivered, then remove the publisher; Retain: "
        "remove the publisher, keep the events in the outbox; Delete: also delete them. "
        f"Unset: {defaults.DELETION_POLICY}.",
    )
    resource_quota: ResourceQuotaSpec | None = Field(
        default=None,
        description="A ResourceQuota for the namespace, created and owned by the Tenant. "
        "Unset: none.",
    )

    validations = (
        Rule(
            "!has(self.deadLetterTopic) || !has(self.topics) "
            "|| !(self.deadLetterTopic.replace('{tenant}', self.tenantId) in self.topics)",
            "deadLetterTopic cannot be one of topics (dead events would be published again "
            "as live ones): choose another deadLetterTopic",
            check=lambda s: (
                s.dead_letter_topic is None
                or s.topics is None
                or s.dead_letter_topic.replace("{tenant}", s.tenant_id) not in s.topics
            ),
            field_path=".deadLetterTopic",
        ),
        Rule(
            "!has(self.deadLetterTopic) "
            f"|| self.deadLetterTopic.replace('{{tenant}}', self.tenantId).size() "
            f"<= {TOPIC_MAX_LENGTH}",
            f"deadLetterTopic, with {{tenant}} replaced by the tenant id, must be at most "
            f"{TOPIC_MAX_LENGTH} characters (Kafka's limit on topic names): shorten "
            "deadLetterTopic",
            check=lambda s: (
                s.dead_letter_topic is None
                or len(s.dead_letter_topic.replace("{tenant}", s.tenant_id)) <= TOPIC_MAX_LENGTH
            ),
            field_path=".deadLetterTopic",
        ),
    )


class TenantChildren(ResourceModel):
    """Names of the objects the operator made for the Tenant, in its namespace."""

    deployment: ObjectName | None = Field(
        default=None,
        description="The publisher's Deployment: the tenant's own, or its shared pool's.",
    )
    config_map: ObjectName | None = Field(
        default=None, description="The ConfigMap with the publisher's settings."
    )
    service: ObjectName | None = Field(
        default=None, description="The Service of the publisher's metrics endpoint."
    )
    prometheus_rule: ObjectName | None = Field(
        default=None, description="The PrometheusRule with the tenant's alerts."
    )
    resource_quota: ObjectName | None = Field(
        default=None, description="The ResourceQuota asked for by spec.resourceQuota."
    )


class Backlog(ResourceModel):
    """The tenant's backlog as its active publisher last reported it."""

    pending: int = Field(ge=0, description="Events waiting to be published.")
    oldest_pending_seconds: float | None = Field(
        default=None, ge=0, description="Age of the oldest pending event; unset when none."
    )
    circuit: CircuitState = Field(
        description="The tenant's circuit breaker: closed (publishing), open (paused after "
        "repeated failures) or half-open (probing)."
    )
    updated_at: dt.datetime = Field(description="When the publisher reported these figures.")


class ResolvedQuotas(ResourceModel):
    """Quotas in effect."""

    events_per_second: float | None = Field(
        default=None, gt=0, description="Events per second; unset: unlimited."
    )
    batch_size: int = Field(ge=1, description="Rows per batch.")
    max_in_flight: int = Field(ge=1, description="Rows claimed and not yet confirmed, at most.")
    max_pending: int | None = Field(
        default=None, ge=1, description="Backlog cap of enqueue; unset: the global cap."
    )


class ResolvedThresholds(ResourceModel):
    """Alert thresholds in effect."""

    backlog_warning: int = Field(ge=1, description="Pending events of the warning alert.")
    backlog_critical: int = Field(ge=1, description="Pending events of the critical alert.")
    oldest_pending_seconds: float = Field(ge=0, description="Oldest pending age alerted on.")
    publisher_down_for: Duration = Field(description="Wait before PublisherDown fires.")
    backlog_for: Duration = Field(description="Wait before a backlog alert fires.")
    circuit_open_for: Duration = Field(description="Wait before CircuitOpen fires.")


class ResolvedTenant(ResourceModel):
    """The tenant's settings in effect: its spec over its OutboxPolicy over defaults."""

    policy: ObjectName | None = Field(
        default=None, description="The OutboxPolicy applied; unset when none is referenced."
    )
    publisher_mode: PublisherMode = Field(description="dedicated or shared.")
    pool: str | None = Field(
        default=None,
        max_length=TENANT_ID_MAX_LENGTH,
        description="The shared pool, in shared mode.",
    )
    replicas: int = Field(ge=0, description="Publisher pods (dedicated mode).")
    quotas: ResolvedQuotas = Field(description="Quotas in effect.")
    delivery_mode: DeliveryMode = Field(description="Delivery mode in effect.")
    poison_policy: PoisonPolicy = Field(description="Poison policy in effect.")
    max_attempts: int = Field(ge=1, description="Failed attempts before an event goes dead.")
    retry_backoff_seconds: float = Field(gt=0, description="First wait before a retry.")
    retry_backoff_max_seconds: float = Field(gt=0, description="Longest wait between attempts.")
    circuit_failure_threshold: int = Field(
        ge=1, description="Consecutive failed batches that open the circuit."
    )
    circuit_open_seconds: float = Field(gt=0, description="Pause of an open circuit.")
    retention_seconds: float = Field(gt=0, description="Age after which sent events are purged.")
    dead_letter_topic: DeadLetterTopic | None = Field(
        default=None, description="Dead-letter topic (with {tenant} expanded); unset: none."
    )
    feature_flags: dict[str, bool] = Field(
        max_length=2 * MAX_FEATURE_FLAGS + MAX_ROLLOUTS,
        description="Every flag set for the tenant, by name, after rollouts.",
    )
    alert_labels: MergedAlertLabels = Field(
        description="Labels on the tenant's PrometheusRule and alerts: the Tenant's over "
        "the OutboxPolicy's."
    )
    alert_thresholds: ResolvedThresholds = Field(description="Alert thresholds in effect.")
    deletion_policy: DeletionPolicy = Field(description="Deletion policy in effect.")


class TenantStatus(ResourceModel):
    """What the operator observed and did; written by the operator only."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation this status describes."
    )
    conditions: Conditions | None = Field(
        default=None,
        description="Ready, PublisherAvailable, AlertsConfigured and related conditions.",
    )
    publisher_mode: PublisherMode | None = Field(
        default=None, description="How the tenant is published: dedicated or shared."
    )
    children: TenantChildren | None = Field(
        default=None, description="Objects the operator made for the Tenant."
    )
    backlog: Backlog | None = Field(
        default=None, description="Pending events and circuit, from the publisher."
    )
    resolved: ResolvedTenant | None = Field(
        default=None, description="The settings in effect after policy and defaults."
    )


TENANT = Kind(
    kind="Tenant",
    plural="tenants",
    short_names=("tn",),
    description="A tenant of the outbox, whose events a publisher moves into Kafka.",
    spec=TenantSpec,
    status=TenantStatus,
    printer_columns=(
        PrinterColumn("Tenant", "string", ".spec.tenantId", "Id of the tenant in the outbox."),
        PrinterColumn("Mode", "string", ".status.publisherMode", "dedicated or shared."),
        PrinterColumn(
            "Ready",
            "string",
            '.status.conditions[?(@.type=="Ready")].status',
            "Whether the publisher and its settings are in place.",
        ),
        PrinterColumn(
            "Publisher",
            "string",
            '.status.conditions[?(@.type=="PublisherAvailable")].reason',
            "Reporting: a publisher reports for the tenant; ReportStale: its last report is "
            "too old (Pending is as it then said); NoReport: none ever did.",
        ),
        PrinterColumn(
            "Pending",
            "integer",
            ".status.backlog.pending",
            "Events not yet sent, as last reported.",
        ),
        PrinterColumn("Circuit", "string", ".status.backlog.circuit", "closed, open or half-open."),
        PrinterColumn("Policy", "string", ".spec.policyRef.name", "The OutboxPolicy.", priority=1),
        PrinterColumn("Pool", "string", ".status.resolved.pool", "The shared pool.", priority=1),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation."),
    ),
)
