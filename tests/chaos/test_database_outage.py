"""PostgreSQL restarted under a draining publisher, and its lock session killed while it
works (case O-19: two publishers of one tenant must never both publish)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from devenv import stack
from somabrain import enqueue_event
from somabrain.config.settings import PublisherSettings
from somabrain.delivery.publisher import Publisher, build_publisher
from somabrain.store.engine import make_engine, make_sessionmaker
from tests.support import event_id, read_committed

pytestmark = pytest.mark.integration
EVENTS = 4000


def _sent(engine: Engine, tenant: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM outbox_events WHERE tenant_id = :t AND status = 'sent'"),
                {"t": tenant},
            ).scalar_one()
        )


def _settings(tenant: str, bootstrap: str) -> PublisherSettings:
    return PublisherSettings(
        tenant=tenant,
        kafka_bootstrap_servers=bootstrap,
        batch_size=100,
        poll_interval_seconds=0.2,
        retry_backoff_seconds=0.5,
        shutdown_grace_seconds=2,
    )


def _start(publisher: Publisher) -> threading.Thread:
    thread = threading.Thread(target=publisher.run, daemon=True)
    thread.start()
    return thread


def _enqueue(engine: Engine, tenant: str, topic: str, count: int) -> None:
    sessions = make_sessionmaker(engine)
    for start in range(0, count, 500):
        with sessions.begin() as session:
            for i in range(start, start + 500):
                enqueue_event(session, tenant_id=tenant, topic=topic, key=f"k{i % 9}", payload={})


@pytest.mark.timeout(600)
def test_postgres_restart_mid_drain_is_ridden_out(
    database_url: str, bootstrap: str, stack_dir: Path, tenant: str
) -> None:
    engine = make_engine(database_url)
    topic = f"{tenant}.dbrestart"
    _enqueue(engine, tenant, topic, EVENTS)
    publisher = build_publisher(_settings(tenant, bootstrap), engine)
    thread = _start(publisher)
    try:
        deadline = time.monotonic() + 60
        while _sent(engine, tenant) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stack.stop_component(stack_dir, "postgres")
        time.sleep(2)
        stack.relaunch_component(stack_dir, "postgres")

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OperationalError):  # the database is still coming back
                if _sent(engine, tenant) == EVENTS:
                    break
            time.sleep(0.5)
        assert _sent(engine, tenant) == EVENTS
        assert thread.is_alive()
    finally:
        publisher.stopping.set()
        thread.join(30)
        engine.dispose()

    ids = [event_id(r) for r in read_committed(bootstrap, topic, expected=EVENTS)]
    assert len(ids) == EVENTS
    assert len(set(ids)) == EVENTS


@pytest.mark.timeout(600)
def test_killed_lock_session_never_lets_two_publishers_both_publish(
    database_url: str, bootstrap: str, tenant: str
) -> None:
    engine = make_engine(database_url)
    topic = f"{tenant}.twolocks"
    _enqueue(engine, tenant, topic, EVENTS)
    first = build_publisher(_settings(tenant, bootstrap), engine)
    second = build_publisher(_settings(tenant, bootstrap), engine)
    threads = [_start(first)]
    try:
        deadline = time.monotonic() + 60
        while _sent(engine, tenant) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks"
                    " WHERE locktype = 'advisory' AND granted AND database ="
                    " (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            )
        threads.append(_start(second))

        deadline = time.monotonic() + 120
        while _sent(engine, tenant) < EVENTS and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _sent(engine, tenant) == EVENTS
    finally:
        for publisher in (first, second):
            publisher.stopping.set()
        for thread in threads:
            thread.join(30)
        engine.dispose()

    ids = [event_id(r) for r in read_committed(bootstrap, topic, expected=EVENTS)]
    assert len(ids) == EVENTS
    assert len(set(ids)) == EVENTS
