"""Backpressure at enqueue on the real database: a tenant over its cap is refused loudly,
nothing is written, the caller's transaction survives, other tenants are untouched."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from somabrain import NewEvent, enqueue_event, enqueue_events
from somabrain.config.errors import BacklogOverCap
from somabrain.config.settings import PublisherSettings
from somabrain.delivery.publisher import build_publisher
from somabrain.store import outbox
from somabrain.store.outbox import report_tenant
from tests.support import wait_for


def _count(engine: Engine, tenant: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM outbox_events WHERE tenant_id = :t"), {"t": tenant}
            ).scalar_one()
        )


def _fill(engine: Engine, tenant: str, count: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_events (tenant_id, topic, dedupe_key, payload)"
                " SELECT :t, 'x.y', 'fill-' || g, '{}'::jsonb FROM generate_series(1, :n) g"
            ),
            {"t": tenant, "n": count},
        )


def _report(sessions: sessionmaker[Session], tenant: str, pending: int, cap: int) -> None:
    with sessions.begin() as session:
        report_tenant(session, tenant_id=tenant, pending=pending, max_pending=cap, publisher=tenant)


@pytest.fixture
def default_cap(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """SOMABRAIN_MAX_PENDING=20 for this test (read once per process, so re-read)."""
    monkeypatch.setenv("SOMABRAIN_MAX_PENDING", "20")
    outbox._default_max_pending.cache_clear()
    outbox._counted.clear()
    yield
    monkeypatch.delenv("SOMABRAIN_MAX_PENDING")
    outbox._default_max_pending.cache_clear()
    outbox._counted.clear()


def test_enqueue_over_the_reported_cap_names_tenant_backlog_and_cap_and_writes_nothing(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    _report(sessions, tenant, pending=10, cap=10)

    with pytest.raises(BacklogOverCap) as refused, sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={})

    assert (refused.value.tenant, refused.value.backlog, refused.value.cap) == (tenant, 10, 10)
    assert tenant in str(refused.value)
    assert "10" in str(refused.value)
    assert _count(engine, tenant) == 0


def test_a_refused_enqueue_leaves_the_callers_transaction_usable(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    other = f"{tenant}-b"
    _report(sessions, tenant, pending=5, cap=5)

    with sessions.begin() as session:
        with pytest.raises(BacklogOverCap):
            enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={})
        enqueue_event(session, tenant_id=other, topic="t.orders", payload={})

    assert _count(engine, tenant) == 0
    assert _count(engine, other) == 1


def test_a_batch_that_would_cross_the_cap_is_refused_whole(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    _report(sessions, tenant, pending=8, cap=10)
    events = [NewEvent(tenant_id=tenant, topic="t.orders", payload={"n": i}) for i in range(3)]

    with pytest.raises(BacklogOverCap) as refused, sessions.begin() as session:
        enqueue_events(session, events)

    assert refused.value.adding == 3
    assert _count(engine, tenant) == 0
    with sessions.begin() as session:
        enqueue_events(session, events[:2])
    assert _count(engine, tenant) == 2


@pytest.mark.usefixtures("default_cap")
def test_without_a_publisher_report_enqueue_counts_the_backlog_against_the_default_cap(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    # No publisher has ever reported this tenant (none running: O-8's situation); the
    # backlog still may not grow without limit.
    _fill(engine, tenant, 20)

    with pytest.raises(BacklogOverCap) as refused, sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={})

    assert (refused.value.backlog, refused.value.cap) == (20, 20)
    assert _count(engine, tenant) == 20


@pytest.mark.usefixtures("default_cap")
def test_a_stale_report_is_not_trusted(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    # The publisher said "0 pending" a minute ago and then stopped; the rows piled up.
    _fill(engine, tenant, 10)
    _report(sessions, tenant, pending=0, cap=10)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE outbox_tenants SET counted_at = now() - interval '1 minute'"
                " WHERE tenant_id = :t"
            ),
            {"t": tenant},
        )

    with pytest.raises(BacklogOverCap) as refused, sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={})

    assert refused.value.backlog == 10


def test_concurrent_writers_near_the_cap_never_get_success_without_a_row(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    """O-19: backpressure never skips the outbox: every call either wrote its row or
    raised, and the counts agree."""
    _report(sessions, tenant, pending=0, cap=50)
    succeeded: list[int] = []
    refused: list[int] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(20):
            try:
                with sessions.begin() as session:
                    enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={"i": i})
                with lock:
                    succeeded.append(n)
            except BacklogOverCap:
                with lock:
                    refused.append(n)
            # The publisher's count, as fresh as it can be.
            _report(sessions, tenant, pending=_count(engine, tenant), cap=50)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(succeeded) + len(refused) == 80
    assert _count(engine, tenant) == len(succeeded)
    assert refused  # the cap was reached
    # Writers racing between two counts may overshoot by at most one event each.
    assert _count(engine, tenant) <= 50 + 4


def test_the_publisher_reports_its_tenants_cap_and_backlog_for_enqueue(
    engine: Engine, bootstrap: str, tenant: str
) -> None:
    settings = PublisherSettings(
        tenant=tenant, kafka_bootstrap_servers=bootstrap, max_pending=123, poll_interval_seconds=0.2
    )
    publisher = build_publisher(settings, engine)
    thread = threading.Thread(target=publisher.run, daemon=True)
    thread.start()
    try:

        def reported() -> tuple[int, str, str] | None:
            with engine.connect() as conn:
                row = conn.execute(
                    text(
                        "SELECT max_pending, publisher, circuit FROM outbox_tenants"
                        " WHERE tenant_id = :t AND counted_at > now() - interval '30 seconds'"
                        " AND publisher_seen_at > now() - interval '30 seconds'"
                    ),
                    {"t": tenant},
                ).one_or_none()
            return None if row is None else (int(row[0]), str(row[1]), str(row[2]))

        assert wait_for(reported) == (123, tenant, "closed")
    finally:
        publisher.stopping.set()
        thread.join(15)
