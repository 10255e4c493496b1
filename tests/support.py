"""Helpers shared by tests that read what the publisher wrote to the real broker."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Consumer
from sqlalchemy import text
from sqlalchemy.orm import Session

from somabrain.delivery.publisher import Publisher
from somabrain.store.outbox import DUPLICATE_MARKER

T = TypeVar("T")
SOMABRAIN = str(Path(sys.executable).parent / "somabrain")


def publisher_env(database_url: str, bootstrap: str, **settings: str) -> dict[str, str]:
    """The environment of a `somabrain publisher run` process: connections, a short poll
    interval, and `settings` as SOMABRAIN_<NAME> variables."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/"),
        "SOMABRAIN_DATABASE_URL": database_url,
        "SOMABRAIN_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "SOMABRAIN_POLL_INTERVAL_SECONDS": "0.2",
    }
    env |= {f"SOMABRAIN_{name.upper()}": value for name, value in settings.items()}
    return env


def read_committed(
    bootstrap: str, topic: str, *, expected: int = 0, idle: float = 3.0, timeout: float = 120
) -> list[Any]:
    """Every record of `topic` a read_committed consumer sees: reads until at least
    `expected` records arrived and nothing more came for `idle` seconds (so duplicates
    after the expected count are seen too), or until `timeout`."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = [m for m in consumer.consume(1000, timeout=0.5) if not m.error()]
            out.extend(batch)
            if batch:
                quiet_since = time.monotonic()
            elif len(out) >= expected and time.monotonic() - quiet_since > idle:
                break
    finally:
        consumer.close()
    return out


def event_id(record: Any) -> str:
    return str(dict(record.headers())["event-id"].decode())


def wait_for(predicate: Callable[[], T], timeout: float = 30) -> T | None:
    """Poll `predicate` until it returns something truthy (returned) or `timeout` passes
    (None). Tests assert on the result, so a condition never met fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return None


@contextlib.contextmanager
def publishing(publisher: Publisher) -> Iterator[Publisher]:
    """Run `publisher` in a thread for the block, then stop it as SIGTERM would and
    wait until it has ended, so the next publisher of the tenant starts afresh."""
    thread = threading.Thread(target=publisher.run, daemon=True)
    thread.start()
    try:
        yield publisher
    finally:
        publisher.stopping.set()
        thread.join(30)
    assert not thread.is_alive(), "the publisher did not stop within 30 s"


def set_aside(session: Session, row_id: int) -> None:
    """Make a row what migration 0003 makes of a repeat of another event's dedupe key:
    dead, its key ending in the marker and its own id."""
    session.execute(
        text(
            "UPDATE outbox_events SET status = 'dead',"
            " dedupe_key = dedupe_key || :marker || id WHERE id = :id"
        ),
        {"id": row_id, "marker": DUPLICATE_MARKER},
    )
