"""Per-tenant backlog caps, publisher heartbeats, and dispatch marks.

- `outbox_tenants`: one row per tenant a publisher serves, written by that publisher
  every few seconds: the tenant's cap on pending events (enqueue refuses beyond it),
  its last counted backlog and oldest pending event, its circuit state, and which
  publisher is active for it and when it was last seen. Enqueue reads it with one
  primary-key lookup.
- `outbox_events.dispatched_at`: set (at-least-once mode) when a batch is handed to
  Kafka; a pending row claimed with it set was possibly published already, and is
  counted as republished when sent again.
- `publisher_checkpoints.owner` becomes `tenant_id`: checkpoints are kept per tenant,
  whichever publisher (dedicated or shared) served it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TENANT_ID_PATTERN = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"


def upgrade() -> None:
    op.create_table(
        "outbox_tenants",
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("max_pending", sa.BigInteger(), nullable=True),
        sa.Column("pending", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("oldest_pending_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("counted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("circuit", sa.String(16), nullable=True),
        sa.Column("publisher", sa.String(200), nullable=True),
        sa.Column("publisher_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_outbox_tenants"),
        sa.CheckConstraint(
            f"tenant_id ~ '{TENANT_ID_PATTERN}'", name="ck_outbox_tenants_tenant_id_format"
        ),
        sa.CheckConstraint(
            "max_pending IS NULL OR max_pending > 0", name="ck_outbox_tenants_max_pending_positive"
        ),
    )
    op.add_column(
        "outbox_events", sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.alter_column("publisher_checkpoints", "owner", new_column_name="tenant_id")


def downgrade() -> None:
    op.alter_column("publisher_checkpoints", "tenant_id", new_column_name="owner")
    op.drop_column("outbox_events", "dispatched_at")
    op.drop_table("outbox_tenants")
