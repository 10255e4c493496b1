"""SomaBrain: a multi-tenant PostgreSQL outbox drained into Kafka.

The public surface is small on purpose: `enqueue_event` (and `enqueue_events` for bulk
producers) joins the caller's transaction, `EnqueueResult` says what happened.
Everything else is reached through the `somabrain` command or the operator.
"""

from somabrain.config.types import EventId, TenantId
from somabrain.store.outbox import (
    EnqueueResult,
    EnqueueStatus,
    NewEvent,
    enqueue_event,
    enqueue_events,
)

__all__ = [
    "EnqueueResult",
    "EnqueueStatus",
    "EventId",
    "NewEvent",
    "TenantId",
    "enqueue_event",
    "enqueue_events",
]
