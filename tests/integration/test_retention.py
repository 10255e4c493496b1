"""Retention on the real database (cases O-4, O-9, O-10): only old sent rows go, in
bounded chunks within a time budget."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from somabrain import enqueue_event
from somabrain.config.types import TenantId
from somabrain.delivery.retention import purge_expired
from somabrain.store import migrate
from somabrain.store.engine import make_engine, make_sessionmaker
from somabrain.store.outbox import count_by_status, pending_events


def _seed(sessions: sessionmaker[Session], engine: Engine, tenant: str) -> None:
    with sessions.begin() as session:
        for i in range(11):
            enqueue_event(session, tenant_id=tenant, topic="t.r", key=str(i), payload={"i": i})
    with engine.begin() as conn:
        ids = [
            r[0]
            for r in conn.execute(
                text("SELECT id FROM outbox_events WHERE tenant_id = :t ORDER BY id"), {"t": tenant}
            )
        ]
        old, recent, pending, dead = ids[:5], ids[5:8], ids[8:10], ids[10:]
        conn.execute(
            text(
                "UPDATE outbox_events SET status = 'sent', kafka_partition = 0, kafka_offset = id,"
                " sent_at = now() - interval '2 days', created_at = now() - interval '3 days'"
                " WHERE id = ANY(:ids)"
            ),
            {"ids": old},
        )
        conn.execute(
            text(
                "UPDATE outbox_events SET status = 'sent', kafka_partition = 0, kafka_offset = id,"
                " sent_at = now() WHERE id = ANY(:ids)"
            ),
            {"ids": recent},
        )
        conn.execute(
            text(
                "UPDATE outbox_events SET created_at = now() - interval '9 days'"
                " WHERE id = ANY(:ids)"
            ),
            {"ids": pending},
        )
        conn.execute(
            text(
                "UPDATE outbox_events SET status = 'dead', created_at = now() - interval '9 days'"
                " WHERE id = ANY(:ids)"
            ),
            {"ids": dead},
        )


def _remaining(engine: Engine, tenant: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT status, count(*) FROM outbox_events WHERE tenant_id = :t GROUP BY 1"),
            {"t": tenant},
        )
        return {r[0]: int(r[1]) for r in rows}


def test_retention_purges_only_sent_rows_older_than_the_retention(
    engine: Engine, sessions: sessionmaker[Session], tenant: str
) -> None:
    _seed(sessions, engine, tenant)

    purged = purge_expired(
        engine, tenant=TenantId(tenant), retention_seconds=86400, chunk=2, budget_seconds=30
    )

    assert purged == 5
    assert _remaining(engine, tenant) == {"sent": 3, "pending": 2, "dead": 1}


def test_retention_stops_at_its_time_budget_after_one_chunk(
    engine: Engine, sessions: sessionmaker[Session], tenant: str
) -> None:
    _seed(sessions, engine, tenant)

    purged = purge_expired(
        engine, tenant=TenantId(tenant), retention_seconds=86400, chunk=1, budget_seconds=0
    )

    assert purged == 1
    assert _remaining(engine, tenant)["sent"] == 7


def test_retention_never_touches_another_tenants_rows(
    engine: Engine, sessions: sessionmaker[Session], tenant: str
) -> None:
    other = f"{tenant}x"
    _seed(sessions, engine, tenant)
    _seed(sessions, engine, other)

    purge_expired(
        engine, tenant=TenantId(tenant), retention_seconds=86400, chunk=100, budget_seconds=30
    )

    assert _remaining(engine, other) == {"sent": 8, "pending": 2, "dead": 1}


def test_count_by_status_counts_one_tenant_and_every_status(
    engine: Engine, sessions: sessionmaker[Session], tenant: str
) -> None:
    _seed(sessions, engine, tenant)
    _seed(sessions, engine, f"{tenant}x")

    with Session(engine) as session:
        counts = count_by_status(session, tenant_id=TenantId(tenant))

    assert counts == {"pending": 2, "sent": 8, "dead": 1}


def test_pending_events_lists_one_tenants_oldest_first_or_every_tenants(
    make_database: Callable[[], str], tenant: str
) -> None:
    url = make_database()
    migrate.upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    other = f"{tenant}x"
    _seed(sessions, engine, tenant)
    _seed(sessions, engine, other)

    with Session(engine) as session:
        mine = pending_events(session, tenant_id=TenantId(tenant))
        first = pending_events(session, tenant_id=TenantId(tenant), limit=1)
        everyone = pending_events(session)
    engine.dispose()

    assert [r.tenant_id for r in mine] == [tenant, tenant]
    assert [r.id for r in mine] == sorted(r.id for r in mine)
    assert first == mine[:1]
    assert sorted(r.tenant_id for r in everyone) == [tenant, tenant, other, other]
    assert [r.id for r in everyone] == sorted(r.id for r in everyone)
    assert all(r.age_seconds >= 0 for r in everyone)
