"""Application clocks five minutes ahead of and behind the database (case O-15): order
comes from the database-assigned id alone, and every timestamp of a row (created_at,
next_attempt_at, sent_at) is the database's time, backoff included.

The application's clock is moved in-process with time-machine, which shifts every
wall-clock reading Python code can make (`time.time`, `datetime.now`, ...) but not the
monotonic clock, as a host whose clock is off would.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import time_machine
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from somabrain import enqueue_event
from somabrain.config.settings import PublisherSettings
from somabrain.delivery.publisher import build_publisher
from tests.support import publishing, read_committed, wait_for

AHEAD = dt.timedelta(minutes=5)
BEHIND = -AHEAD
SKEWS = pytest.mark.parametrize("skew", [AHEAD, BEHIND], ids=["ahead", "behind"])


def _db_now(engine: Engine) -> dt.datetime:
    with engine.connect() as conn:
        now: dt.datetime = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
    return now


@contextlib.contextmanager
def _app_clock(engine: Engine, skew: dt.timedelta) -> Iterator[None]:
    """The application's wall clock `skew` away from the database's, for the block."""
    with time_machine.travel(_db_now(engine) + skew, tick=True):
        off = dt.datetime.now(dt.UTC) - _db_now(engine)
        assert abs(off - skew) < dt.timedelta(seconds=30), "the clock did not move"
        yield


def _rows(engine: Engine, tenant: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [
            dict(r._mapping)
            for r in conn.execute(
                text(
                    "SELECT id, status, attempts, created_at, next_attempt_at, sent_at,"
                    " (payload->>'i')::int AS i FROM outbox_events"
                    " WHERE tenant_id = :t ORDER BY id"
                ),
                {"t": tenant},
            )
        ]


@SKEWS
def test_clock_skew_leaves_order_to_ids_and_timestamps_to_the_database(
    skew: dt.timedelta,
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    tenant: str,
) -> None:
    """O-15: writers whose clocks are five minutes ahead of and behind the database, and
    a publisher whose clock is off too: the rows' created_at, next_attempt_at and
    sent_at are the database's time, and Kafka holds the key's events in id order, even
    where a row's created_at is earlier than that of a row with a smaller id."""
    topic = f"{tenant}.skew"

    def enqueue(session: Session, i: int) -> None:
        enqueue_event(session, tenant_id=tenant, topic=topic, key="k", payload={"i": i})

    db_before = _db_now(engine)
    for i in range(4):
        with _app_clock(engine, AHEAD if i % 2 else BEHIND), sessions.begin() as session:
            enqueue(session, i)
    # A transaction that starts first but inserts last: its row gets the earlier
    # created_at (the transaction's start) and the larger id.
    early = sessions()
    early.execute(text("SELECT 1"))
    with _app_clock(engine, BEHIND), sessions.begin() as session:
        enqueue(session, 4)
    with _app_clock(engine, AHEAD):
        enqueue(early, 5)
        early.commit()
    early.close()

    with (
        _app_clock(engine, skew),
        publishing(build_publisher(_settings(tenant, bootstrap), engine)),
    ):
        assert wait_for(lambda: {r["status"] for r in _rows(engine, tenant)} == {"sent"})
    db_after = _db_now(engine)

    rows = _rows(engine, tenant)
    assert [r["i"] for r in rows] == list(range(6))
    assert rows[5]["created_at"] < rows[4]["created_at"], "the setup must cross the clocks"
    for row in rows:
        assert db_before <= row["created_at"] <= db_after
        assert db_before <= row["next_attempt_at"] <= db_after
        assert row["created_at"] <= row["sent_at"] <= db_after
    values = [m.value() for m in read_committed(bootstrap, topic, expected=6)]
    assert values == [b'{"i":%d}' % i for i in range(6)]


@SKEWS
def test_clock_skew_backoff_is_computed_and_awaited_on_database_time(
    skew: dt.timedelta, engine: Engine, sessions: sessionmaker[Session], tenant: str
) -> None:
    """O-15: a failed event's next_attempt_at is the database's time plus the backoff,
    and the publisher, its clock five minutes off, retries it neither before that time
    nor long after."""
    with sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic=f"{tenant}.skew", payload={"i": 0})
    settings = _settings(
        tenant,
        "127.0.0.1:1",  # nothing listens: every attempt fails
        delivery_mode="at-least-once",
        delivery_timeout_seconds=1.5,
        retry_backoff_seconds=10,  # first backoff 5-10 s, second 10-20 s
    )

    db_before = _db_now(engine)
    with _app_clock(engine, skew), publishing(build_publisher(settings, engine)):
        first = wait_for(lambda: [r for r in _rows(engine, tenant) if r["attempts"] >= 1])
        db_seen = _db_now(engine)
        assert first is not None
        (row,) = first
        assert row["attempts"] == 1
        due = row["next_attempt_at"]
        assert db_before + dt.timedelta(seconds=5) <= due <= db_seen + dt.timedelta(seconds=10)

        # Not retried before it is due on the database's clock...
        wait_for(lambda: _db_now(engine) >= due - dt.timedelta(seconds=0.5), timeout=15)
        assert _rows(engine, tenant)[0]["attempts"] == 1
        # ...and retried soon after.
        second = wait_for(lambda: [r for r in _rows(engine, tenant) if r["attempts"] >= 2], 20)
        db_retried = _db_now(engine)
        assert second is not None
        assert due + dt.timedelta(seconds=10) <= second[0]["next_attempt_at"]
        assert second[0]["next_attempt_at"] <= db_retried + dt.timedelta(seconds=20)


def _settings(tenant: str, bootstrap: str, **overrides: Any) -> PublisherSettings:
    return PublisherSettings(
        tenant=tenant,
        kafka_bootstrap_servers=bootstrap,
        poll_interval_seconds=0.2,
        shutdown_grace_seconds=2,
        **overrides,
    )
