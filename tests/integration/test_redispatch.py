"""A sent row is never published again (case O-5), on the real database and broker:
not after the publisher restarts, nor while other rows fail and are retried."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from somabrain import enqueue_event
from somabrain.config.settings import PublisherSettings
from somabrain.delivery.publisher import Publisher, build_publisher
from tests.support import event_id, publishing, read_committed, wait_for


def _rows(engine: Engine, tenant: str) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {
            r.event_id: dict(r._mapping)
            for r in conn.execute(
                text(
                    "SELECT event_id::text AS event_id, topic, status, attempts,"
                    " kafka_partition, kafka_offset, sent_at"
                    " FROM outbox_events WHERE tenant_id = :t"
                ),
                {"t": tenant},
            )
        }


def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)


@pytest.mark.parametrize("mode", ["exactly-once", "at-least-once"])
def test_sent_rows_are_not_published_again_after_restarts_and_retries_of_other_rows(
    mode: str, engine: Engine, sessions: sessionmaker[Session], bootstrap: str, tenant: str
) -> None:
    """O-5: events are sent; then, across several publisher restarts, other events fail
    (their topic does not exist yet) and are retried until their topic appears. Kafka
    holds every event exactly once, and the partition, offset and sent_at recorded in
    each sent row never change."""
    orders, late = f"{tenant}.orders", f"{tenant}.late"
    _create_topic(bootstrap, orders)
    settings = PublisherSettings(
        tenant=tenant,
        kafka_bootstrap_servers=bootstrap,
        delivery_mode=mode,
        poll_interval_seconds=0.2,
        shutdown_grace_seconds=2,
        delivery_timeout_seconds=2,
        retry_backoff_seconds=0.2,
        retry_backoff_max_seconds=0.5,
        max_attempts=1000,
        circuit_open_seconds=0.5,
    )

    def publisher() -> Publisher:
        # Without auto-creation, events of a missing topic fail (retriably) until it exists.
        return build_publisher(
            settings, engine, producer_overrides={"allow.auto.create.topics": False}
        )

    def enqueue(topic: str, keys: list[str]) -> None:
        with sessions.begin() as session:
            for n, key in enumerate(keys):
                enqueue_event(session, tenant_id=tenant, topic=topic, key=key, payload={"n": n})

    def sent_of(topic: str) -> dict[str, tuple[int, int, Any]]:
        return {
            i: (r["kafka_partition"], r["kafka_offset"], r["sent_at"])
            for i, r in _rows(engine, tenant).items()
            if r["topic"] == topic and r["status"] == "sent"
        }

    def late_attempts() -> int:
        return max(r["attempts"] for r in _rows(engine, tenant).values() if r["topic"] == late)

    enqueue(orders, [f"k{i % 3}" for i in range(10)])
    with publishing(publisher()):
        assert wait_for(lambda: len(sent_of(orders)) == 10)
    first = sent_of(orders)

    enqueue(late, ["late"] * 3)
    enqueue(orders, [f"k{i % 3}" for i in range(10)])
    for restart in range(3):
        attempts = late_attempts()
        with publishing(publisher()):
            assert wait_for(lambda a=attempts: late_attempts() > a, 60), f"restart {restart}"
            assert wait_for(lambda: len(sent_of(orders)) == 20)
        assert {i: sent_of(orders)[i] for i in first} == first
    second = sent_of(orders)

    _create_topic(bootstrap, late)
    for _ in range(2):
        with publishing(publisher()):
            assert wait_for(lambda: len(sent_of(late)) == 3, 60)

    rows = _rows(engine, tenant)
    assert {r["status"] for r in rows.values()} == {"sent"}
    assert {i: sent_of(orders)[i] for i in second} == second
    for topic, count in [(orders, 20), (late, 3)]:
        records = read_committed(bootstrap, topic, expected=count)
        assert Counter(event_id(m) for m in records) == Counter(
            {i: 1 for i, r in rows.items() if r["topic"] == topic}
        )
        for record in records:
            row = rows[event_id(record)]
            assert (row["kafka_partition"], row["kafka_offset"]) == (
                record.partition(),
                record.offset(),
            )
