"""Writers racing the publisher (cases O-1, O-2): a row committed late is never skipped,
and what Kafka holds equals the committed rows, checked id by id."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from somabrain import enqueue_event
from somabrain.config.settings import PublisherSettings
from somabrain.delivery.publisher import Publisher, build_publisher
from tests.support import event_id, read_committed, wait_for


@pytest.fixture
def publisher(engine: Engine, bootstrap: str, tenant: str) -> Iterator[Publisher]:
    settings = PublisherSettings(
        tenant=tenant,
        kafka_bootstrap_servers=bootstrap,
        poll_interval_seconds=0.2,
        shutdown_grace_seconds=2,
    )
    running = build_publisher(settings, engine)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    yield running
    running.stopping.set()
    thread.join(30)


def _statuses(engine: Engine, tenant: str) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT event_id::text, status FROM outbox_events WHERE tenant_id = :t"),
            {"t": tenant},
        )
        return {r[0]: r[1] for r in rows}


def test_event_committed_after_a_later_id_was_published_is_still_published(
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    tenant: str,
    publisher: Publisher,
) -> None:
    topic = f"{tenant}.late"
    late = sessions()
    early_id = enqueue_event(late, tenant_id=tenant, topic=topic, key="k", payload={"n": 1})
    with sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic=topic, key="k", payload={"n": 2})
    assert wait_for(lambda: "sent" in _statuses(engine, tenant).values())

    late.commit()
    late.close()

    assert early_id.event_id is not None
    assert wait_for(lambda: _statuses(engine, tenant).get(str(early_id.event_id)) == "sent")
    assert len(read_committed(bootstrap, topic, expected=2)) == 2


def test_sixteen_racing_writers_leave_kafka_equal_to_the_committed_rows(
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    tenant: str,
    publisher: Publisher,
) -> None:
    topic = f"{tenant}.race"

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20):
            session = sessions()
            for _ in range(rng.randint(1, 5)):
                enqueue_event(session, tenant_id=tenant, topic=topic, key=f"k{seed}", payload={})
            time.sleep(rng.uniform(0, 0.05))
            if rng.random() < 0.2:
                session.rollback()
            else:
                session.commit()
            session.close()

    writers = [threading.Thread(target=writer, args=(seed,)) for seed in range(16)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(120)
    assert wait_for(lambda: set(_statuses(engine, tenant).values()) == {"sent"})

    committed = set(_statuses(engine, tenant))
    in_kafka = [event_id(r) for r in read_committed(bootstrap, topic, expected=len(committed))]
    assert set(in_kafka) == committed
    assert len(in_kafka) == len(committed)
