"""Payloads from enqueue to Kafka on the real database and broker: values JSON has no
type for (case O-14) and events without a payload (case O-18)."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from somabrain import enqueue_event
from somabrain.config.errors import EventEncodingError
from somabrain.config.settings import PublisherSettings
from somabrain.delivery.publisher import Publisher, build_publisher
from tests.support import publishing, read_committed, wait_for

IDENT = uuid.UUID("6f1c2d3e-4a5b-4c6d-8e7f-901a2b3c4d5e")


def _publisher(engine: Engine, tenant: str, bootstrap: str, **overrides: Any) -> Publisher:
    settings = PublisherSettings(
        tenant=tenant,
        kafka_bootstrap_servers=bootstrap,
        poll_interval_seconds=0.2,
        shutdown_grace_seconds=2,
        **overrides,
    )
    return build_publisher(settings, engine)


def _rows(engine: Engine, tenant: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [
            dict(r._mapping)
            for r in conn.execute(
                text(
                    "SELECT id, event_id::text AS event_id, status, attempts, last_error,"
                    " kafka_partition, kafka_offset, payload::text AS payload"
                    " FROM outbox_events WHERE tenant_id = :t ORDER BY id"
                ),
                {"t": tenant},
            )
        ]


def _settled(engine: Engine, tenant: str) -> bool:
    return all(r["status"] != "pending" for r in _rows(engine, tenant))


# One value, written in two forms Python holds equal: another key order, the same
# instant in another zone, an int and a Decimal of the same digits, a tuple for a list.
ONE_FORM = {
    "amount": decimal.Decimal("1234.50"),
    "at": dt.datetime(2026, 3, 1, 14, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    "big": 10**30,
    "id": IDENT,
    "tags": ["x", "y"],
}
OTHER_FORM = {
    "tags": ("x", "y"),
    "id": IDENT,
    "big": decimal.Decimal(10**30),
    "at": dt.datetime(2026, 3, 1, 7, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
    "amount": decimal.Decimal("1234.50"),
}
CANONICAL = (
    b'{"amount":1234.50,"at":"2026-03-01T12:30:00Z","big":1' + b"0" * 30 + b","
    b'"id":"6f1c2d3e-4a5b-4c6d-8e7f-901a2b3c4d5e","tags":["x","y"]}'
)


def test_non_json_values_are_stored_in_one_stable_form(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    """O-14: Decimal keeps its exact digits as a JSON number, an aware datetime becomes
    its instant in UTC, a UUID its canonical string, whatever form they came in."""
    with sessions.begin() as session:
        for payload in (ONE_FORM, OTHER_FORM):
            enqueue_event(session, tenant_id=tenant, topic="t.orders", payload=payload)

    with engine.connect() as conn:
        stored = conn.execute(
            text(
                "SELECT jsonb_typeof(payload->'amount'), (payload->'amount')::text,"
                " payload->>'at', (payload->'big')::text, payload->>'id', payload::text"
                " FROM outbox_events WHERE tenant_id = :t ORDER BY id"
            ),
            {"t": tenant},
        ).all()
    assert len(stored) == 2
    assert stored[0] == stored[1]
    assert tuple(stored[0])[:5] == (
        "number",
        "1234.50",
        "2026-03-01T12:30:00Z",
        "1" + "0" * 30,
        str(IDENT),
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (dt.datetime(2026, 3, 1, 12, 30), r"naive datetime 2026-03-01T12:30:00 has no time zone"),
        (b"\x00\x01", r"bytes has no canonical JSON form; convert it first \(bytes: base64"),
        (bytearray(b"ab"), r"bytearray has no canonical JSON form"),
        ({"b", "a"}, r"set has no canonical JSON form; .*set: sorted list"),
        (frozenset({1}), r"frozenset has no canonical JSON form"),
    ],
    ids=["naive-datetime", "bytes", "bytearray", "set", "frozenset"],
)
def test_value_without_a_json_form_is_refused_at_enqueue_and_other_events_go_on(
    sessions: sessionmaker[Session], engine: Engine, tenant: str, value: object, message: str
) -> None:
    """O-14: a value with no canonical JSON form is refused at enqueue with an error
    naming where it sits and how to convert it; nothing of it is written, and the
    caller's other events in the same transaction are enqueued as usual."""
    with sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={"n": 1})
        with pytest.raises(EventEncodingError, match=r"payload\.order\.lines\[1\]: " + message):
            enqueue_event(
                session,
                tenant_id=tenant,
                topic="t.orders",
                payload={"order": {"lines": ["first", value]}},
            )
        enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={"n": 2})

    assert [r["payload"] for r in _rows(engine, tenant)] == ['{"n": 1}', '{"n": 2}']


def test_equal_payloads_reach_kafka_as_identical_bytes(
    sessions: sessionmaker[Session], engine: Engine, bootstrap: str, tenant: str
) -> None:
    """O-14: two payloads Python holds equal, written in different forms, are published
    as the same bytes: the canonical encoding enqueue wrote, rebuilt from the database."""
    topic = f"{tenant}.orders"
    with sessions.begin() as session:
        for payload in (ONE_FORM, OTHER_FORM):
            enqueue_event(session, tenant_id=tenant, topic=topic, key="k", payload=payload)

    with publishing(_publisher(engine, tenant, bootstrap)):
        assert wait_for(lambda: _settled(engine, tenant))

    assert {r["status"] for r in _rows(engine, tenant)} == {"sent"}
    assert [m.value() for m in read_committed(bootstrap, topic, expected=2)] == [
        CANONICAL,
        CANONICAL,
    ]


def test_numbers_too_long_for_python_ints_are_published_with_every_digit(
    sessions: sessionmaker[Session], engine: Engine, bootstrap: str, tenant: str
) -> None:
    """O-14: Python refuses to turn an int of more than 4,300 digits into text, but such
    a number is a valid payload (PostgreSQL's numeric holds it): an int or a Decimal that
    long is enqueued and published with its exact digits, and the batch around it too."""
    topic = f"{tenant}.numbers"
    payloads: list[Any] = [
        {"n": 1},
        {"decimal": decimal.Decimal("9" * 5000)},
        {"int": -(10**5000)},
        {"n": 2},
    ]
    with sessions.begin() as session:
        for payload in payloads:
            enqueue_event(session, tenant_id=tenant, topic=topic, key="k", payload=payload)

    with publishing(_publisher(engine, tenant, bootstrap)):
        assert wait_for(lambda: _settled(engine, tenant))

    assert {r["status"] for r in _rows(engine, tenant)} == {"sent"}
    assert [m.value() for m in read_committed(bootstrap, topic, expected=4)] == [
        b'{"n":1}',
        b'{"decimal":' + b"9" * 5000 + b"}",
        b'{"int":-1' + b"0" * 5000 + b"}",
        b'{"n":2}',
    ]


@pytest.mark.parametrize("mode", ["exactly-once", "at-least-once"])
def test_stored_payload_that_cannot_be_published_goes_dead_alone(
    mode: str, sessions: sessionmaker[Session], engine: Engine, bootstrap: str, tenant: str
) -> None:
    """O-14: one bad event never fails a whole batch. A row written around enqueue whose
    payload cannot be encoded again (nested deeper than Python decodes) goes dead with
    the reason; the events claimed with it are published once, in order, and the
    publisher goes on with later events."""
    topic = f"{tenant}.orders"
    with sessions.begin() as session:
        for i in range(3):
            enqueue_event(session, tenant_id=tenant, topic=topic, key="a", payload={"i": i})
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_events (tenant_id, topic, message_key, dedupe_key, payload)"
                " VALUES (:t, :topic, 'deep', 'written-around-enqueue', CAST(:p AS jsonb))"
            ),
            {"t": tenant, "topic": topic, "p": "[" * 2000 + "]" * 2000},
        )
    with sessions.begin() as session:
        for i in range(3, 6):
            enqueue_event(session, tenant_id=tenant, topic=topic, key="a", payload={"i": i})

    with publishing(_publisher(engine, tenant, bootstrap, delivery_mode=mode)):
        assert wait_for(lambda: _settled(engine, tenant))
        with sessions.begin() as session:
            enqueue_event(session, tenant_id=tenant, topic=topic, key="a", payload={"i": 6})
        assert wait_for(lambda: _settled(engine, tenant))

    rows = _rows(engine, tenant)
    bad = [r for r in rows if r["status"] != "sent"]
    assert [(r["status"], r["attempts"]) for r in bad] == [("dead", 1)]
    assert "payload cannot be published" in bad[0]["last_error"]
    assert "nests deeper" in bad[0]["last_error"]
    values = [m.value() for m in read_committed(bootstrap, topic, expected=7)]
    assert values == [b'{"i":%d}' % i for i in range(7)]


@pytest.mark.parametrize("mode", ["exactly-once", "at-least-once"])
def test_empty_payload_is_published_as_a_tombstone(
    mode: str, sessions: sessionmaker[Session], engine: Engine, bootstrap: str, tenant: str
) -> None:
    """O-18: an event without a payload (a deletion marker) is published as its key with
    a null value, carrying the same headers as any event, in its key's order, and its
    row is marked sent with the tombstone's offset."""
    topic = f"{tenant}.orders"
    with sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic=topic, key="order-7", payload={"s": 1})
        deleted = enqueue_event(
            session,
            tenant_id=tenant,
            topic=topic,
            key="order-7",
            payload=None,
            event_type="order.deleted",
            dedupe_key="order-7-deleted",
            headers={"trace-id": "abc"},
        )
        enqueue_event(session, tenant_id=tenant, topic=topic, key="order-8", payload={"s": 1})

    with publishing(_publisher(engine, tenant, bootstrap, delivery_mode=mode)):
        assert wait_for(lambda: _settled(engine, tenant))

    rows = {r["event_id"]: r for r in _rows(engine, tenant)}
    assert {r["status"] for r in rows.values()} == {"sent"}
    messages = read_committed(bootstrap, topic, expected=3)
    assert [(m.key(), m.value()) for m in messages if m.key() == b"order-7"] == [
        (b"order-7", b'{"s":1}'),
        (b"order-7", None),
    ]
    (tombstone,) = [m for m in messages if m.value() is None]
    headers = dict(tombstone.headers())
    assert headers["event-id"] == str(deleted.event_id).encode()
    assert headers["tenant-id"] == tenant.encode()
    assert headers["dedupe-key"] == b"order-7-deleted"
    assert headers["event-type"] == b"order.deleted"
    assert headers["trace-id"] == b"abc"
    row = rows[str(deleted.event_id)]
    assert (row["kafka_partition"], row["kafka_offset"]) == (
        tombstone.partition(),
        tombstone.offset(),
    )
