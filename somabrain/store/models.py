"""The outbox table as a typed SQLAlchemy model.

Ordering depends only on the database-assigned `id`, never on a clock; every timestamp
is taken from the database (`now()`), so application clock skew changes nothing.
The Alembic migrations in `migrations/` are the authority on the schema; this model
mirrors them and a test compares the two.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from somabrain.config.types import TENANT_ID_PATTERN

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
}


class EventStatus(enum.StrEnum):
    """Where an event is in its life: waiting, confirmed by Kafka, or given up on."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class OutboxEvent(Base):
    """One event waiting for, or done with, delivery to Kafka."""

    __tablename__ = "outbox_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), nullable=False, unique=True, server_default=text("gen_random_uuid()")
    )
    tenant_id: Mapped[str] = mapped_column(String(40), nullable=False)
    topic: Mapped[str] = mapped_column(String(249), nullable=False)
    message_key: Mapped[str | None] = mapped_column(Text)
    dedupe_key: Mapped[str] = mapped_column(String(200), nullable=False)
    event_type: Mapped[str | None] = mapped_column(String(200))
    payload: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))
    headers: Mapped[dict[str, str]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    status: Mapped[str] = mapped_column(
        String(16), nullable=False, server_default=EventStatus.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("now()")
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("now()")
    )
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    kafka_partition: Mapped[int | None] = mapped_column(Integer)
    kafka_offset: Mapped[int | None] = mapped_column(BigInteger)
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("tenant_id", "dedupe_key"),
        CheckConstraint(f"tenant_id ~ '{TENANT_ID_PATTERN}'", name="tenant_id_format"),
        CheckConstraint("status IN ('pending', 'sent', 'dead')", name="status_known"),
        CheckConstraint(
            "(status = 'sent') = (sent_at IS NOT NULL AND kafka_offset IS NOT NULL)",
            name="sent_has_offset",
        ),
        Index("ix_outbox_events_status_tenant_created", "status", "tenant_id", "created_at"),
        # "Next pending rows of tenant T in id order" stays an index range scan however
        # many sent rows the table holds: sent rows are not in this index at all.
        Index(
            "ix_outbox_events_pending_tenant_id",
            "tenant_id",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_outbox_events_retrying_tenant_key",
            "tenant_id",
            "message_key",
            postgresql_where=text("status = 'dead' OR (status = 'pending' AND attempts > 0)"),
        ),
        Index(
            "ix_outbox_events_sent_tenant_sent_at",
            "tenant_id",
            "sent_at",
            postgresql_where=text("status = 'sent'"),
        ),
    )


class PublisherCheckpoint(Base):
    """Position, in the checkpoint topic, of a tenant's last batch marked sent."""

    __tablename__ = "publisher_checkpoints"

    tenant_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    kafka_partition: Mapped[int] = mapped_column(Integer, nullable=False)
    kafka_offset: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("now()")
    )


class OutboxTenant(Base):
    """What the active publisher of a tenant last reported: the tenant's cap on pending
    events, its backlog and circuit then, and who the publisher is. Enqueue reads the
    cap here; operators and tools read the rest."""

    __tablename__ = "outbox_tenants"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    max_pending: Mapped[int | None] = mapped_column(BigInteger)
    pending: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    oldest_pending_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    counted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    circuit: Mapped[str | None] = mapped_column(String(16))
    publisher: Mapped[str | None] = mapped_column(String(200))
    publisher_seen_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(f"tenant_id ~ '{TENANT_ID_PATTERN}'", name="tenant_id_format"),
        CheckConstraint("max_pending IS NULL OR max_pending > 0", name="max_pending_positive"),
    )


class AdminAction(Base):
    """One replay or purge, by whom and of what: written as the action starts and
    brought up to date in the same transaction as each chunk it changes, so `rows` is
    exact even for an action that stopped half-way (`finished_at` empty)."""

    __tablename__ = "outbox_admin_actions"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    actor: Mapped[str] = mapped_column(String(200), nullable=False)
    action: Mapped[str] = mapped_column(String(16), nullable=False)
    tenant_id: Mapped[str] = mapped_column(String(40), nullable=False)
    selection: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    rows: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    started_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("now()")
    )
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("action IN ('replay', 'purge')", name="action_known"),
        Index("ix_outbox_admin_actions_tenant_id_started_at", "tenant_id", "started_at"),
    )
