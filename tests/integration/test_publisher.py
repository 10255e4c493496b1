"""The publisher against the real database and broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from somabrain import enqueue_event
from somabrain.config.settings import PublisherSettings
from somabrain.config.types import TenantId
from somabrain.delivery.publisher import Publisher, build_publisher
from somabrain.store.outbox import advisory_lock_key
from tests.support import read_committed, wait_for


def _publisher(engine: Engine, tenant: str, bootstrap: str, **overrides: Any) -> Publisher:
    settings = PublisherSettings(
        tenant=tenant,
        kafka_bootstrap_servers=bootstrap,
        poll_interval_seconds=0.2,
        shutdown_grace_seconds=2,
        **overrides,
    )
    return build_publisher(settings, engine)


def _rows(engine: Engine, tenant: str) -> list[tuple[str, str, int | None, int | None, int]]:
    with engine.connect() as conn:
        return [
            (str(r[0]), r[1], r[2], r[3], r[4])
            for r in conn.execute(
                text(
                    "SELECT event_id, status, kafka_partition, kafka_offset, attempts"
                    " FROM outbox_events WHERE tenant_id = :t ORDER BY id"
                ),
                {"t": tenant},
            )
        ]


@pytest.mark.parametrize("mode", ["exactly-once", "at-least-once"])
def test_publisher_delivers_pending_events_and_records_their_offsets(
    mode: str,
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    tenant: str,
    run_publisher: Callable[[Publisher], Publisher],
) -> None:
    topic = f"{tenant}.orders"
    with sessions.begin() as session:
        for i in range(20):
            enqueue_event(session, tenant_id=tenant, topic=topic, key=f"k{i % 3}", payload={"i": i})
        enqueue_event(session, tenant_id=tenant, topic=topic, key="gone", payload=None)

    run_publisher(_publisher(engine, tenant, bootstrap, delivery_mode=mode))
    assert wait_for(lambda: all(r[1] == "sent" for r in _rows(engine, tenant)), 30)
    messages = read_committed(bootstrap, topic, expected=21)

    rows = {r[0]: r for r in _rows(engine, tenant)}
    assert len(messages) == 21
    for msg in messages:
        headers = dict(msg.headers())  # type: ignore[attr-defined]
        event_id = headers["event-id"].decode()
        assert headers["tenant-id"] == tenant.encode()
        assert rows[event_id][2:4] == (msg.partition(), msg.offset())  # type: ignore[attr-defined]
    tombstones = [m for m in messages if m.key() == b"gone"]  # type: ignore[attr-defined]
    assert [m.value() for m in tombstones] == [None]  # type: ignore[attr-defined]


def test_publisher_marks_nothing_sent_while_the_broker_is_unreachable(
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
    run_publisher: Callable[[Publisher], Publisher],
) -> None:
    # O-6 / O-19: produce() returning is not delivery; without a report, rows stay pending.
    with sessions.begin() as session:
        for i in range(5):
            enqueue_event(session, tenant_id=tenant, topic=f"{tenant}.orders", payload={"i": i})

    publisher = _publisher(
        engine,
        tenant,
        "127.0.0.1:1",
        delivery_mode="at-least-once",
        delivery_timeout_seconds=1.5,
        retry_backoff_seconds=60,
    )
    run_publisher(publisher)
    assert wait_for(lambda: all(r[4] >= 1 for r in _rows(engine, tenant)), 30)

    assert {r[1] for r in _rows(engine, tenant)} == {"pending"}
    with engine.connect() as conn:
        errors = conn.execute(
            text("SELECT last_error FROM outbox_events WHERE tenant_id = :t"), {"t": tenant}
        ).scalars()
        assert all(errors)


def test_second_publisher_of_a_tenant_waits_until_the_first_lets_go(
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    tenant: str,
    run_publisher: Callable[[Publisher], Publisher],
) -> None:
    holder = engine.raw_connection()
    holder.detach()
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (advisory_lock_key(TenantId(tenant)),))
    with sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic=f"{tenant}.orders", payload={})

    run_publisher(_publisher(engine, tenant, bootstrap))
    time.sleep(2)
    assert [r[1] for r in _rows(engine, tenant)] == ["pending"]

    holder.close()  # the lock holder's session ends, as when a publisher dies
    assert wait_for(lambda: [r[1] for r in _rows(engine, tenant)] == ["sent"], 30)
