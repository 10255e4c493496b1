"""The audit trail of replays and purges.

- `outbox_admin_actions`: one row per replay or purge, naming who ran it (the admin
  API token's name, or the CLI user), the tenant, the selection (ids or filter) and
  how many rows it changed; the row count is updated in the transaction of each chunk.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbox_admin_actions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("selection", postgresql.JSONB(), nullable=False),
        sa.Column("rows", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox_admin_actions"),
        sa.CheckConstraint(
            "action IN ('replay', 'purge')", name="ck_outbox_admin_actions_action_known"
        ),
    )
    op.create_index(
        "ix_outbox_admin_actions_tenant_id_started_at",
        "outbox_admin_actions",
        ["tenant_id", "started_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_admin_actions_tenant_id_started_at", "outbox_admin_actions")
    op.drop_table("outbox_admin_actions")
