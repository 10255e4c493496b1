"""Every Prometheus metric of the publisher, defined once.

Label values are bounded: `tenant` takes only the tenants this process serves.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

PUBLISHED = Counter(
    "somabrain_events_published",
    "Events Kafka confirmed and the outbox marked sent.",
    ["tenant"],
    registry=REGISTRY,
)
DELIVERY_FAILURES = Counter(
    "somabrain_delivery_failures",
    "Delivery attempts Kafka did not confirm; the rows stay pending and are retried.",
    ["tenant"],
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "somabrain_batch_size",
    "Rows claimed per batch.",
    ["tenant"],
    buckets=(1, 10, 50, 100, 250, 500, 1000, 5000),
    registry=REGISTRY,
)
LOCK_HELD = Gauge(
    "somabrain_publisher_active",
    "1 while this process holds the tenant's publisher lock, 0 while it waits as standby.",
    ["tenant"],
    registry=REGISTRY,
)
KEY_ORDER_BREAKS = Counter(
    "somabrain_key_order_breaks",
    "At-least-once mode only: a later event of a key confirmed after an earlier one failed.",
    ["tenant"],
    registry=REGISTRY,
)
CIRCUIT_STATE = Gauge(
    "somabrain_circuit_state",
    "Circuit breaker of the tenant: 0 closed, 1 half-open (probing), 2 open (paused).",
    ["tenant"],
    registry=REGISTRY,
)
PURGED = Counter(
    "somabrain_events_purged",
    "Sent rows deleted by retention.",
    ["tenant"],
    registry=REGISTRY,
)
PENDING = Gauge(
    "somabrain_pending_events",
    "Events of the tenant waiting in the outbox (pending, including retrying).",
    ["tenant"],
    registry=REGISTRY,
)
OLDEST_PENDING_AGE = Gauge(
    "somabrain_oldest_pending_age_seconds",
    "Age of the tenant's oldest pending event; 0 when drained.",
    ["tenant"],
    registry=REGISTRY,
)
BLOCKED_KEYS = Gauge(
    "somabrain_blocked_keys",
    "Keys of the tenant whose pending events wait behind an earlier event of the same key "
    "that is backing off or (poison policy block) dead; a dead one blocks until replayed.",
    ["tenant"],
    registry=REGISTRY,
)
LAST_PUBLISH = Gauge(
    "somabrain_last_publish_timestamp_seconds",
    "Unix time of the tenant's last batch Kafka confirmed.",
    ["tenant"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "somabrain_in_flight_events",
    "Rows claimed and sent to Kafka but not yet settled in the database.",
    ["tenant"],
    registry=REGISTRY,
)
COMMIT_TO_ACK = Histogram(
    "somabrain_commit_to_ack_seconds",
    "Time from an event's insert to its row being marked sent after Kafka's confirmation "
    "(both by the database's clock).",
    ["tenant"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
    registry=REGISTRY,
)
DEAD = Counter(
    "somabrain_events_dead",
    "Events given up on (Kafka can never take them, or max attempts reached).",
    ["tenant"],
    registry=REGISTRY,
)
THROTTLED = Counter(
    "somabrain_quota_throttled",
    "Turns a tenant with events due was passed over because its events/s quota had no tokens left.",
    ["tenant"],
    registry=REGISTRY,
)
DEAD_LETTERED = Counter(
    "somabrain_events_dead_lettered",
    "Dead events copied to the tenant's dead-letter topic.",
    ["tenant"],
    registry=REGISTRY,
)
REPUBLISHED = Counter(
    "somabrain_events_republished",
    "At-least-once mode: events sent again after an earlier send whose outcome was never "
    "confirmed (a crash, or a failed or timed-out delivery report); consumers may see them "
    "twice, with the same event-id header.",
    ["tenant"],
    registry=REGISTRY,
)

# Counters labelled by tenant, created at 0 for each tenant a publisher serves.
TENANT_COUNTERS = (
    PUBLISHED,
    DELIVERY_FAILURES,
    KEY_ORDER_BREAKS,
    PURGED,
    DEAD,
    THROTTLED,
    DEAD_LETTERED,
    REPUBLISHED,
)

# The admin API's own (`somabrain admin serve`, on its /metrics): what people changed.
ADMIN_REGISTRY = CollectorRegistry(auto_describe=True)

REPLAYED = Counter(
    "somabrain_events_replayed",
    "Dead or failed events moved back to pending through the admin API.",
    ["tenant"],
    registry=ADMIN_REGISTRY,
)
ADMIN_PURGED = Counter(
    "somabrain_events_purged_by_admin",
    "Sent events deleted through the admin API's purge.",
    ["tenant"],
    registry=ADMIN_REGISTRY,
)
