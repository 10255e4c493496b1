"""claim_pending and mark_sent on the real database: limits, tenants, settled rows."""

from __future__ import annotations

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from somabrain import NewEvent, enqueue_events
from somabrain.config.types import TenantId
from somabrain.store.outbox import Delivered, claim_pending, mark_dead, mark_sent


def _enqueue(sessions: sessionmaker[Session], tenant: str, count: int) -> None:
    with sessions.begin() as session:
        enqueue_events(
            session,
            [NewEvent(tenant_id=tenant, topic="t.s", payload={"i": i}) for i in range(count)],
        )


def test_claim_returns_the_tenants_own_rows_in_id_order_up_to_the_limit(
    sessions: sessionmaker[Session], tenant: str
) -> None:
    other = f"{tenant}-o"
    _enqueue(sessions, tenant, 5)
    _enqueue(sessions, other, 3)

    with sessions() as session:
        three = claim_pending(session, tenant_id=TenantId(tenant), limit=3)
        everything = claim_pending(session, tenant_id=TenantId(tenant), limit=100)
        others = claim_pending(session, tenant_id=TenantId(other), limit=100)

    assert [e.payload_json for e in three] == ['{"i": 0}', '{"i": 1}', '{"i": 2}']
    assert [e.id for e in everything] == sorted(e.id for e in everything)
    assert len(everything) == 5
    assert {e.tenant_id for e in others} == {other}
    assert len(others) == 3


def test_mark_sent_records_partition_and_offset_of_pending_rows_only(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    _enqueue(sessions, tenant, 3)
    with sessions() as session:
        rows = claim_pending(session, tenant_id=TenantId(tenant), limit=10)
    with sessions.begin() as session:
        mark_dead(session, row_id=rows[2].id, error="refused")

    big = 2**40  # offsets are 64-bit
    with sessions.begin() as session:
        changed = mark_sent(
            session,
            [
                Delivered(rows[0].id, 2, big),
                Delivered(rows[1].id, 1, 7),
                Delivered(rows[2].id, 0, 9),
            ],
            tenant_id=tenant,
        )
    with sessions.begin() as session:
        again = mark_sent(session, [Delivered(rows[0].id, 0, 1)], tenant_id=tenant)

    assert (len(changed), len(again)) == (2, 0)
    with engine.connect() as conn:
        stored = conn.execute(
            text(
                "SELECT status, kafka_partition, kafka_offset, sent_at IS NOT NULL"
                " FROM outbox_events WHERE tenant_id = :t ORDER BY id"
            ),
            {"t": tenant},
        ).all()
    assert [tuple(r) for r in stored] == [
        ("sent", 2, big, True),
        ("sent", 1, 7, True),
        ("dead", None, None, False),
    ]


def test_mark_sent_never_touches_another_tenants_rows(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    # A forged checkpoint naming another tenant's row ids must not mark them sent.
    _enqueue(sessions, tenant, 2)
    with sessions() as session:
        rows = claim_pending(session, tenant_id=TenantId(tenant), limit=10)

    with sessions.begin() as session:
        changed = mark_sent(session, [Delivered(r.id, 0, 1) for r in rows], tenant_id="other")

    assert changed == []
    with engine.connect() as conn:
        statuses = (
            conn.execute(
                text("SELECT DISTINCT status FROM outbox_events WHERE tenant_id = :t"),
                {"t": tenant},
            )
            .scalars()
            .all()
        )
    assert statuses == ["pending"]
