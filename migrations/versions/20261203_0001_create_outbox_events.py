"""Create the outbox table.

Revision ID: 0001
Revises:
Create Date: 2026-12-03

The unique `(tenant_id, dedupe_key)` constraint comes in 0003, which first resolves the
duplicates a table created without it may hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TENANT_ID_PATTERN = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"


def upgrade() -> None:
    op.create_table(
        "outbox_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column(
            "event_id",
            postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
        ),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("message_key", sa.Text(), nullable=True),
        sa.Column("dedupe_key", sa.String(200), nullable=False),
        sa.Column("event_type", sa.String(200), nullable=True),
        sa.Column("payload", postgresql.JSONB(), nullable=True),
        sa.Column(
            "headers", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False
        ),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("kafka_partition", sa.Integer(), nullable=True),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox_events"),
        sa.UniqueConstraint("event_id", name="uq_outbox_events_event_id"),
        sa.CheckConstraint(
            f"tenant_id ~ '{TENANT_ID_PATTERN}'", name="ck_outbox_events_tenant_id_format"
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'dead')", name="ck_outbox_events_status_known"
        ),
        sa.CheckConstraint(
            "(status = 'sent') = (sent_at IS NOT NULL AND kafka_offset IS NOT NULL)",
            name="ck_outbox_events_sent_has_offset",
        ),
    )
    op.create_index(
        "ix_outbox_events_status_tenant_created",
        "outbox_events",
        ["status", "tenant_id", "created_at"],
    )
    op.create_index(
        "ix_outbox_events_pending_tenant_id",
        "outbox_events",
        ["tenant_id", "id"],
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_events_pending_tenant_id", table_name="outbox_events")
    op.drop_index("ix_outbox_events_status_tenant_created", table_name="outbox_events")
    op.drop_table("outbox_events")
