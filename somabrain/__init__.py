"""SomaBrain: a multi-tenant PostgreSQL outbox drained into Kafka.

The public surface is small on purpose: `enqueue_event` (and `enqueue_events` for bulk
producers) joins the caller's transaction, `EnqueueResult` says what happened. For
producers without a transaction of their own, `emit_event` (and `emit_events`) enqueue
in one of theirs, and with a `Journal` keep events on local disk while the database is
unreachable (`JournalMigrator` moves them into the outbox when it is back).
Everything else is reached through the `somabrain` command or the operator.
"""

from somabrain.config.types import EventId, TenantId
from somabrain.delivery.journal import Journal, JournalMigrator, emit_event, emit_events
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
    "Journal",
    "JournalMigrator",
    "NewEvent",
    "TenantId",
    "emit_event",
    "emit_events",
    "enqueue_event",
    "enqueue_events",
]
