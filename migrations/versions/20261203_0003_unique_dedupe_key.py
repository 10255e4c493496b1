"""Unique (tenant_id, dedupe_key), after resolving the duplicates the table already holds.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

Rows that share a `(tenant_id, dedupe_key)` form a duplicate group. The rule:

- The earliest row of each group (lowest `id`, the database-assigned order) is kept
  untouched: it is the one `enqueue_event` would have accepted had the constraint been
  there, and later enqueues of that key are reported as duplicates of it.
- Every other row of the group is marked, never deleted:
  - its `dedupe_key` becomes `<original key>#duplicate-<id>`, the original cut at the end
    when needed so the whole fits in the column's 200 characters: unique, deterministic,
    and found with `dedupe_key LIKE '%#duplicate-' || id`;
  - its `last_error` becomes `duplicate of event <kept id> (dedupe key '<original key>'),
    resolved by migration 0003`, followed by `; earlier error: <previous last_error>` when
    the row had one, so nothing it said before is lost;
  - a `pending` row becomes `dead`, so the second copy is never published; `sent` and
    `dead` rows keep their status (a sent one is already in Kafka).
- A warning through Alembic's logger gives the number of groups and marked rows, how many
  pending rows went dead, and a few groups as examples.

Under `SOMABRAIN_POISON_POLICY=block` (the default) a dead row holds back the later pending
events of its message key, and a pending duplicate turned dead is no exception: the
warning counts the events held back that way.

Everything happens in the migration's one transaction, with the table locked against
writers, and ends by adding the constraint `uq_outbox_events_tenant_id_dedupe_key`: a
failure (for instance a marked key that an existing row of the tenant already uses, which
is refused with the rows named) leaves the table exactly as it was. A table that already
has the constraint cannot hold duplicates and is left as it is.

Downgrade drops the constraint only: marked rows stay marked (their original key is in
`last_error`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.util import CommandError

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONSTRAINT = "uq_outbox_events_tenant_id_dedupe_key"
DEDUPE_KEY_LENGTH = 200  # outbox_events.dedupe_key is VARCHAR(200) since 0001
MARKER = "#duplicate-"
EXAMPLES = 5

log = logging.getLogger("alembic.runtime.migration")

# One row per row to mark: its original key, the row kept in its group, and its new key.
_FIND_DUPLICATES = sa.text(
    f"""
    CREATE TEMPORARY TABLE outbox_duplicates_0003 ON COMMIT DROP AS
    SELECT e.id, e.tenant_id, e.status, e.message_key, e.dedupe_key AS original_key,
           g.kept_id,
           left(e.dedupe_key, {DEDUPE_KEY_LENGTH} - length('{MARKER}' || e.id))
               || '{MARKER}' || e.id AS new_key
    FROM outbox_events AS e
    JOIN (
        SELECT tenant_id, dedupe_key, min(id) AS kept_id
        FROM outbox_events
        GROUP BY tenant_id, dedupe_key
        HAVING count(*) > 1
    ) AS g ON g.tenant_id = e.tenant_id AND g.dedupe_key = e.dedupe_key
    WHERE e.id <> g.kept_id
    """
)

# A new key can only collide with a key a row already has (new keys end with their own
# row's id, so they differ from each other).
_COLLISIONS = sa.text(
    """
    SELECT d.id, d.tenant_id, d.new_key, e.id AS other_id
    FROM outbox_duplicates_0003 AS d
    JOIN outbox_events AS e ON e.tenant_id = d.tenant_id AND e.dedupe_key = d.new_key
    ORDER BY d.id
    LIMIT :limit
    """
)

_SUMMARY = sa.text(
    """
    SELECT count(DISTINCT kept_id), count(*), count(*) FILTER (WHERE status = 'pending')
    FROM outbox_duplicates_0003
    """
)

_EXAMPLES = sa.text(
    """
    SELECT tenant_id, original_key, kept_id, count(*) AS marked,
           (array_agg(id ORDER BY id))[1:3] AS first_marked
    FROM outbox_duplicates_0003
    GROUP BY tenant_id, original_key, kept_id
    ORDER BY kept_id
    LIMIT :limit
    """
)

_MARK = sa.text(
    """
    UPDATE outbox_events AS e
    SET dedupe_key = d.new_key,
        status = CASE WHEN e.status = 'pending' THEN 'dead' ELSE e.status END,
        last_error = format(
            'duplicate of event %s (dedupe key %L), resolved by migration 0003',
            d.kept_id, d.original_key
        ) || coalesce('; earlier error: ' || e.last_error, '')
    FROM outbox_duplicates_0003 AS d
    WHERE e.id = d.id
    """
)

# Pending events behind a duplicate that went dead, of the same tenant and message key:
# what poison policy `block` holds back.
_HELD_BACK = sa.text(
    """
    SELECT count(DISTINCT later.id)
    FROM outbox_duplicates_0003 AS d
    JOIN outbox_events AS later
      ON later.tenant_id = d.tenant_id
     AND later.message_key = d.message_key
     AND later.id > d.id
     AND later.status = 'pending'
    WHERE d.status = 'pending'
    """
)


def upgrade() -> None:
    conn = op.get_bind()
    has_constraint = conn.execute(
        sa.text(
            "SELECT 1 FROM pg_constraint"
            " WHERE conrelid = 'outbox_events'::regclass AND conname = :name"
        ),
        {"name": CONSTRAINT},
    ).first()
    if has_constraint is not None:
        log.info("%s already exists; no duplicates to resolve", CONSTRAINT)
        return

    # Other sessions wait until the constraint is in place, so no new duplicate slips in
    # between the search and the constraint. ACCESS EXCLUSIVE, which adding the constraint
    # needs anyway, is taken now rather than upgraded to later: no lock-upgrade deadlock.
    conn.execute(sa.text("LOCK TABLE outbox_events IN ACCESS EXCLUSIVE MODE"))
    conn.execute(_FIND_DUPLICATES)
    _refuse_collisions(conn)
    groups, rows, pending = conn.execute(_SUMMARY).one()
    if rows:
        examples = conn.execute(_EXAMPLES, {"limit": EXAMPLES}).all()
        conn.execute(_MARK)
        held_back = conn.execute(_HELD_BACK).scalar_one()
        log.warning(
            "migration 0003: %d duplicate (tenant_id, dedupe_key) groups; kept the earliest"
            " row (lowest id) of each and marked the %d others: dedupe_key rewritten to"
            " <key>%s<id>, the reason in last_error; %d of them were pending and are now dead,"
            " holding back %d later pending events of their message keys under poison policy"
            " 'block'. Examples: %s",
            groups,
            rows,
            MARKER,
            pending,
            held_back,
            "; ".join(_describe(*example) for example in examples),
        )
    conn.execute(sa.text("DROP TABLE outbox_duplicates_0003"))
    op.create_unique_constraint(CONSTRAINT, "outbox_events", ["tenant_id", "dedupe_key"])


def downgrade() -> None:
    op.drop_constraint(CONSTRAINT, "outbox_events", type_="unique")


def _refuse_collisions(conn: sa.Connection) -> None:
    collisions = conn.execute(_COLLISIONS, {"limit": EXAMPLES}).all()
    if collisions:
        detail = "; ".join(
            f"event {row.id} of tenant {row.tenant_id} would get dedupe key"
            f" {_shorten(row.new_key)!r}, which event {row.other_id} already has"
            for row in collisions
        )
        holders = ", ".join(sorted({str(row.other_id) for row in collisions}))
        raise CommandError(
            f"cannot resolve duplicate dedupe keys: {detail}. Nothing was changed; give"
            f" event(s) {holders} another dedupe_key and run the upgrade again."
        )


def _describe(tenant_id: str, key: str, kept_id: int, marked: int, first: list[int]) -> str:
    ids = ", ".join(map(str, first)) + (", ..." if marked > len(first) else "")
    return f"tenant {tenant_id} key {_shorten(key)!r}: kept {kept_id}, marked {marked} ({ids})"


def _shorten(key: str, limit: int = 60) -> str:
    return key if len(key) <= limit else key[: limit - 3] + "..."
