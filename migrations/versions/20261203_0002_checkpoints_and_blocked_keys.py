"""Publisher checkpoints, and the indexes behind per-key blocking and retention.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Where each publisher's last checkpoint marked in the database sits in the
    # checkpoint topic: recovery reads the topic from just after it.
    op.create_table(
        "publisher_checkpoints",
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("owner", name="pk_publisher_checkpoints"),
    )
    # Keys blocked by a retrying or dead event: few rows, found without scanning the backlog.
    op.create_index(
        "ix_outbox_events_retrying_tenant_key",
        "outbox_events",
        ["tenant_id", "message_key"],
        postgresql_where=sa.text("status = 'dead' OR (status = 'pending' AND attempts > 0)"),
    )

    # Retention finds a tenant's oldest sent rows without touching pending ones.
    op.create_index(
        "ix_outbox_events_sent_tenant_sent_at",
        "outbox_events",
        ["tenant_id", "sent_at"],
        postgresql_where=sa.text("status = 'sent'"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_events_sent_tenant_sent_at", table_name="outbox_events")
    op.drop_index("ix_outbox_events_retrying_tenant_key", table_name="outbox_events")
    op.drop_table("publisher_checkpoints")
