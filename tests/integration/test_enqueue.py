"""enqueue_event on the real database: transactions, dedupe, refusals, wake-ups."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import select
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from somabrain import EnqueueStatus, NewEvent, enqueue_event, enqueue_events
from somabrain.config.errors import (
    EventEncodingError,
    EventTooLarge,
    InvalidEvent,
    InvalidTenantId,
)
from somabrain.store import outbox
from somabrain.store.codec import encode_payload, reencode_stored
from somabrain.store.outbox import NOTIFY_CHANNEL


def _count(engine: Engine, tenant: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM outbox_events WHERE tenant_id = :t"), {"t": tenant}
            ).scalar_one()
        )


def test_enqueue_rolled_back_with_the_callers_transaction_leaves_no_row(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    with sessions() as session:
        enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={"a": 1})
        session.rollback()

    assert _count(engine, tenant) == 0


def test_enqueue_duplicate_dedupe_key_reports_duplicate_and_keeps_transaction_usable(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    with sessions.begin() as session:
        first = enqueue_event(
            session, tenant_id=tenant, topic="t.orders", payload={"a": 1}, dedupe_key="d1"
        )
        second = enqueue_event(
            session, tenant_id=tenant, topic="t.orders", payload={"a": 2}, dedupe_key="d1"
        )
        third = enqueue_event(
            session, tenant_id=tenant, topic="t.orders", payload={"a": 3}, dedupe_key="d2"
        )

    assert first.status is EnqueueStatus.ENQUEUED
    assert second.status is EnqueueStatus.DUPLICATE
    assert second.event_id is None
    assert third.status is EnqueueStatus.ENQUEUED
    assert _count(engine, tenant) == 2


def test_enqueue_concurrent_same_dedupe_key_gives_one_row_and_no_abort(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    # O-17: B inserts while A holds the same key uncommitted; B waits, then sees a duplicate.
    results = {}
    session_a = sessions()
    results["a"] = enqueue_event(
        session_a, tenant_id=tenant, topic="t.orders", payload={"by": "a"}, dedupe_key="same"
    )

    def writer_b() -> None:
        with sessions.begin() as session_b:
            results["b"] = enqueue_event(
                session_b,
                tenant_id=tenant,
                topic="t.orders",
                payload={"by": "b"},
                dedupe_key="same",
            )
            results["b-after"] = enqueue_event(
                session_b, tenant_id=tenant, topic="t.orders", payload={"by": "b"}, dedupe_key="b2"
            )

    thread = threading.Thread(target=writer_b)
    thread.start()
    thread.join(1.0)
    assert thread.is_alive(), "B should wait for A's uncommitted row"
    session_a.commit()
    session_a.close()
    thread.join(10)

    assert results["a"].status is EnqueueStatus.ENQUEUED
    assert results["b"].status is EnqueueStatus.DUPLICATE
    assert results["b-after"].status is EnqueueStatus.ENQUEUED
    assert _count(engine, tenant) == 2


def test_enqueue_without_payload_stores_a_tombstone(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    """O-18: no payload is stored as SQL NULL (not JSON null), published as a null value."""
    with sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic="t.orders", payload=None, key="k")

    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT payload IS NULL FROM outbox_events WHERE tenant_id = :t"), {"t": tenant}
        ).scalar_one()
    assert stored is True


def test_enqueue_oversize_event_is_refused_and_writes_nothing(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    with sessions.begin() as session, pytest.raises(EventTooLarge, match="limit of 2000 bytes"):
        enqueue_event(
            session,
            tenant_id=tenant,
            topic="t.orders",
            payload={"blob": "x" * 2000},
            max_message_bytes=2000,
        )

    assert _count(engine, tenant) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tenant_id": "Bad Tenant"}, InvalidTenantId, "invalid tenant id"),
        ({"tenant_id": None}, InvalidEvent, "tenant_id must be a string"),
        ({"topic": "has space"}, InvalidEvent, "topic"),
        ({"topic": ""}, InvalidEvent, "topic"),
        ({"dedupe_key": "x" * 201}, InvalidEvent, "dedupe_key is 201 characters"),
        ({"dedupe_key": 5}, InvalidEvent, "dedupe_key must be a string"),
        ({"dedupe_key": ""}, InvalidEvent, "dedupe_key must not be empty"),
        ({"event_type": "e" * 201}, InvalidEvent, "event_type is 201 characters"),
        ({"key": "a\udc80"}, InvalidEvent, "key holds a character that is not valid"),
        ({"headers": {"event-id": "spoofed"}}, InvalidEvent, "set by the publisher"),
        ({"payload": {"at": dt.datetime(2026, 1, 1)}}, InvalidEvent, "naive datetime"),
    ],
)
def test_enqueue_invalid_input_is_refused_and_the_callers_transaction_goes_on(
    sessions: sessionmaker[Session],
    engine: Engine,
    tenant: str,
    kwargs: dict[str, object],
    error: type[Exception],
    message: str,
) -> None:
    event = {"tenant_id": tenant, "topic": "t.orders", "payload": {}} | kwargs
    with sessions.begin() as session:
        with pytest.raises(error, match=message):
            enqueue_event(session, **event)  # type: ignore[arg-type]
        enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={"ok": 1})

    assert _count(engine, tenant) == 1


def test_enqueue_size_limit_defaults_to_the_setting(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, tenant: str
) -> None:
    monkeypatch.setenv("SOMABRAIN_MAX_MESSAGE_BYTES", "1000")
    outbox._default_max_bytes.cache_clear()
    try:
        with sessions() as session, pytest.raises(EventTooLarge, match="limit of 1000 bytes"):
            enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={"x": "y" * 999})
    finally:
        outbox._default_max_bytes.cache_clear()


def test_database_refuses_a_malformed_tenant_id_written_around_enqueue(engine: Engine) -> None:
    with pytest.raises(IntegrityError, match="tenant_id_format"), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_events (tenant_id, topic, dedupe_key)"
                " VALUES ('Not Valid', 't', 'd')"
            )
        )


def test_enqueue_notifies_publishers_only_when_the_transaction_commits(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    raw = engine.raw_connection()
    raw.detach()  # closed at the end, never given back to the pool listening in autocommit
    raw.set_isolation_level(0)
    with raw.cursor() as cur:
        cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
    dbapi = raw.dbapi_connection

    def notified(timeout: float) -> list[str]:
        select.select([dbapi], [], [], timeout)
        dbapi.poll()
        payloads = [n.payload for n in dbapi.notifies]
        dbapi.notifies.clear()
        return payloads

    try:
        session = sessions()
        enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={})
        assert tenant not in notified(0.5)
        session.commit()
        session.close()
        assert tenant in notified(5)
    finally:
        raw.close()


NO_NUL = st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.text(alphabet=NO_NUL)
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(alphabet=NO_NUL, max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=json_values)
def test_payload_stored_as_jsonb_is_published_as_the_bytes_enqueue_encoded(
    engine: Engine, value: object
) -> None:
    encoded = encode_payload(value)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT CAST(:v AS jsonb)::text"), {"v": encoded}).scalar_one()

    assert reencode_stored(stored) == encoded.encode()


def test_decimal_digits_survive_the_database(engine: Engine) -> None:
    encoded = encode_payload({"amount": decimal.Decimal("0.10"), "big": 2**70})
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT CAST(:v AS jsonb)::text"), {"v": encoded}).scalar_one()

    assert reencode_stored(stored) == b'{"amount":0.10,"big":1180591620717411303424}'


def test_enqueue_after_a_rolled_back_savepoint_still_wakes_the_publisher(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    raw = engine.raw_connection()
    raw.detach()
    raw.set_isolation_level(0)
    with raw.cursor() as cur:
        cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
    dbapi = raw.dbapi_connection
    try:
        with sessions.begin() as session:
            savepoint = session.begin_nested()
            enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={"n": 1})
            savepoint.rollback()
            enqueue_event(session, tenant_id=tenant, topic="t.orders", payload={"n": 2})
        select.select([dbapi], [], [], 5)
        dbapi.poll()
        assert tenant in [n.payload for n in dbapi.notifies]
    finally:
        raw.close()


def test_enqueue_events_reports_each_event_in_order_with_duplicates(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    with sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic="t.b", payload={}, dedupe_key="old")
    batch = [
        NewEvent(tenant_id=tenant, topic="t.b", payload={"n": 1}, dedupe_key="a"),
        NewEvent(tenant_id=tenant, topic="t.b", payload={"n": 2}, dedupe_key="old"),
        NewEvent(tenant_id=tenant, topic="t.b", payload={"n": 3}, dedupe_key="a"),
        NewEvent(tenant_id=tenant, topic="t.b", payload=None, key="k"),
    ]

    with sessions.begin() as session:
        results = enqueue_events(session, batch)

    assert [r.status for r in results] == [
        EnqueueStatus.ENQUEUED,
        EnqueueStatus.DUPLICATE,
        EnqueueStatus.DUPLICATE,
        EnqueueStatus.ENQUEUED,
    ]
    assert _count(engine, tenant) == 3


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ({"payload": {"at": dt.datetime(2026, 1, 1)}}, EventEncodingError, r"payload\.at: naive"),
        ({"payload": {"raw": b"x"}}, EventEncodingError, r"payload\.raw: bytes has no canonical"),
        ({"payload": {"ids": {1}}}, EventEncodingError, r"payload\.ids: set has no canonical"),
        ({"tenant_id": "Not Valid"}, InvalidTenantId, r"invalid tenant id 'Not Valid'"),
        (
            {"payload": {"x": "y" * 3000}},
            EventTooLarge,
            r"encoded event is \d+ bytes, over the limit of 2000",
        ),
    ],
    ids=["naive-datetime", "bytes", "set", "tenant-id", "too-large"],
)
def test_enqueue_events_with_one_invalid_event_writes_nothing_and_names_it(
    sessions: sessionmaker[Session],
    engine: Engine,
    tenant: str,
    bad: dict[str, object],
    error: type[Exception],
    message: str,
) -> None:
    """O-14: the bulk form refuses a batch holding one bad event before writing any of
    it, with the error `enqueue_event` raises for that event (same type, same fields)
    naming its position; the caller's transaction goes on, and the batch without the
    bad event is enqueued whole."""
    good = [NewEvent(tenant_id=tenant, topic="t.b", payload={"n": n}) for n in range(4)]
    batch = [
        *good[:2],
        NewEvent(**({"tenant_id": tenant, "topic": "t.b", "payload": {}} | bad)),
        *good[2:],
    ]

    with sessions.begin() as session:
        with pytest.raises(error, match=r"^event 2: " + message) as refused:
            enqueue_events(session, batch, max_message_bytes=2000)
        if isinstance(refused.value, EventTooLarge):
            assert refused.value.limit == 2000
        written = text("SELECT count(*) FROM outbox_events WHERE tenant_id = :t")
        assert session.scalar(written, {"t": tenant}) == 0
        results = enqueue_events(session, good, max_message_bytes=2000)

    assert [r.status for r in results] == [EnqueueStatus.ENQUEUED] * 4
    assert _count(engine, tenant) == 4


def _stored(engine: Engine, tenant: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                text(
                    "SELECT event_id, topic, message_key, dedupe_key, event_type,"
                    " payload::text, headers, status"
                    " FROM outbox_events WHERE tenant_id = :t ORDER BY id"
                ),
                {"t": tenant},
            )
        ]


class Nothing(enum.Enum):
    NONE = None


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["one-statement", "row-by-row"])
def test_enqueue_events_stores_each_field_as_given_in_the_order_given(
    sessions: sessionmaker[Session], engine: Engine, tenant: str, one_at_a_time: bool
) -> None:
    # A batch goes in one INSERT of a JSON array; a single event in an INSERT of its
    # own values. Both store the same row.
    odd = "tab\there, new\nline, cr\r, quote \" ' back\\slash \\u0000, é, 🙂, \u2028"
    batch = [
        NewEvent(tenant_id=tenant, topic="t.b", payload={"n": 1}, key="k", dedupe_key=odd),
        NewEvent(
            tenant_id=tenant,
            topic="t.b",
            payload={"text": odd, "d": decimal.Decimal("1.50")},
            key=odd,
            event_type=odd,
            headers={odd: odd, "trace": "x"},
        ),
        NewEvent(tenant_id=tenant, topic="t.b", payload=None, key="k"),  # tombstone
        NewEvent(tenant_id=tenant, topic="t.b", payload=Nothing.NONE, key="k"),  # JSON null
        NewEvent(tenant_id=tenant, topic="t.b", payload="", key=""),
    ]

    with sessions.begin() as session:
        if one_at_a_time:
            results = [enqueue_events(session, [e])[0] for e in batch]
        else:
            results = enqueue_events(session, batch)

    rows = _stored(engine, tenant)
    assert [r[0] for r in rows] == [r.event_id for r in results]
    assert all(isinstance(r.event_id, uuid.UUID) for r in results)
    for row, sent in zip(rows, batch, strict=True):
        _, topic, key, dedupe, event_type, payload, headers, status = row
        assert (topic, key, event_type, headers, status) == (
            sent.topic,
            sent.key,
            sent.event_type,
            dict(sent.headers or {}),
            "pending",
        )
        assert sent.dedupe_key is None or dedupe == sent.dedupe_key
        expected = None if sent.payload is None else encode_payload(sent.payload).encode()
        assert reencode_stored(payload) == expected
    assert rows[3][5] == "null"  # a payload encoded as JSON null is not a tombstone


def test_enqueue_events_ids_follow_the_batch_order_across_statements(
    sessions: sessionmaker[Session],
    engine: Engine,
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Statements of at most 3 rows: a dedupe key repeated in a later statement is a
    # duplicate there too, and ids still follow the batch.
    monkeypatch.setattr(outbox, "_STATEMENT_ROWS", 3)
    keys = [f"d{i}" for i in range(10)] + ["d1", "d8", "d10"]
    batch = [
        NewEvent(tenant_id=tenant, topic="t.b", payload={"i": i}, key="same", dedupe_key=d)
        for i, d in enumerate(keys)
    ]

    with sessions.begin() as session:
        results = enqueue_events(session, batch)

    assert [r.status for r in results] == [EnqueueStatus.ENQUEUED] * 10 + [
        EnqueueStatus.DUPLICATE,
        EnqueueStatus.DUPLICATE,
        EnqueueStatus.ENQUEUED,
    ]
    assert [r[3] for r in _stored(engine, tenant)] == [f"d{i}" for i in range(11)]


def test_enqueue_events_large_batch_is_split_by_payload_size(
    sessions: sessionmaker[Session],
    engine: Engine,
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbox, "_STATEMENT_PAYLOAD_CHARS", 5000)
    statements: list[int] = []
    chunks = outbox._statement_chunks

    def counting(rows: Sequence[outbox._Row]) -> Iterator[Sequence[outbox._Row]]:
        for chunk in chunks(rows):
            statements.append(len(chunk))
            yield chunk

    monkeypatch.setattr(outbox, "_statement_chunks", counting)
    batch = [
        NewEvent(tenant_id=tenant, topic="t.b", payload={"pad": "x" * 2000}) for _ in range(7)
    ] + [NewEvent(tenant_id=tenant, topic="t.b", payload={"pad": "y" * 9000})]

    with sessions.begin() as session:
        results = enqueue_events(session, batch)

    assert statements == [2, 2, 2, 1, 1]
    assert all(r.status is EnqueueStatus.ENQUEUED for r in results)
    assert _count(engine, tenant) == 8


def test_enqueue_events_notifies_once_per_tenant_and_rolls_back_with_the_caller(
    sessions: sessionmaker[Session], engine: Engine, tenant: str
) -> None:
    other = f"{tenant}-b"
    batch = [NewEvent(tenant_id=t, topic="t.b", payload={}) for t in (tenant, other, tenant)]
    statements: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    sqlalchemy_event.listen(engine, "before_cursor_execute", record)
    try:
        with sessions() as session:
            enqueue_events(session, batch)
            session.rollback()
    finally:
        sqlalchemy_event.remove(engine, "before_cursor_execute", record)

    assert sum("INSERT INTO outbox_events" in s for s in statements) == 1
    assert sum("pg_notify" in s for s in statements) == 2
    assert _count(engine, tenant) == 0
    assert _count(engine, other) == 0


@pytest.mark.parametrize(
    "topic", ["__consumer_offsets", "__transaction_state", "somabrain.publisher-checkpoints"]
)
def test_enqueue_refuses_internal_and_checkpoint_topics(
    sessions: sessionmaker[Session], engine: Engine, tenant: str, topic: str
) -> None:
    # An event on the checkpoint topic could pass for a checkpoint of another tenant.
    with sessions.begin() as session, pytest.raises(InvalidEvent, match="reserved"):
        enqueue_event(session, tenant_id=tenant, topic=topic, payload={})

    assert _count(engine, tenant) == 0


@pytest.mark.parametrize("header", ["event-id", "dead-reason", "original-topic"])
def test_enqueue_refuses_headers_the_publisher_sets(
    sessions: sessionmaker[Session], engine: Engine, tenant: str, header: str
) -> None:
    with sessions.begin() as session, pytest.raises(InvalidEvent, match=header):
        enqueue_event(session, tenant_id=tenant, topic="t.a", payload={}, headers={header: "x"})

    assert _count(engine, tenant) == 0
