"""Fault injection on the real stack: the publisher killed with SIGKILL at random points
while 20,000 events flow (cases O-3, O-7). A read_committed consumer must then see every
event exactly once, in order per key."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from somabrain import enqueue_event
from somabrain.store.engine import make_engine, make_sessionmaker
from tests.support import SOMABRAIN, event_id, publisher_env, read_committed, wait_for

pytestmark = pytest.mark.integration
EVENTS = 20_000
KILLS = 10


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [SOMABRAIN, "publisher", "run"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _activations(log: Path) -> int:
    return log.read_text().count("active publisher of tenant")


def _enqueue_all(sessions: sessionmaker[Session], tenant: str, topic: str) -> None:
    rng = random.Random(11)
    for start in range(0, EVENTS, 500):
        with sessions.begin() as session:
            for i in range(start, start + 500):
                enqueue_event(
                    session,
                    tenant_id=tenant,
                    topic=topic,
                    key=f"k{rng.randrange(50)}",
                    dedupe_key=f"e{i}",
                    payload={"i": i},
                )
        time.sleep(0.01)


def _pending(sessions: sessionmaker[Session], tenant: str) -> int:
    with sessions() as session:
        return int(
            session.execute(
                text(
                    "SELECT count(*) FROM outbox_events WHERE tenant_id = :t AND status <> 'sent'"
                ),
                {"t": tenant},
            ).scalar_one()
        )


@pytest.mark.timeout(900)
def test_publisher_killed_ten_times_loses_and_duplicates_nothing(
    database_url: str, bootstrap: str, tenant: str, tmp_path: Path
) -> None:
    topic = f"{tenant}.chaos"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    env = publisher_env(database_url, bootstrap, tenant=tenant, batch_size="200")
    log = tmp_path / "publisher.log"
    producer = threading.Thread(target=_enqueue_all, args=(sessions, tenant, topic))
    producer.start()

    rng = random.Random(5)
    for kill in range(KILLS):
        publisher = _spawn(env, log)
        # Each incarnation is killed at a random point after it became active, so
        # every kill lands in the drain, however slowly the machine starts processes.
        assert wait_for(lambda n=kill: _activations(log) > n, timeout=120), log.read_text()
        time.sleep(rng.uniform(0.1, 2.0))
        publisher.send_signal(signal.SIGKILL)
        publisher.wait(10)
    producer.join()

    publisher = _spawn(env, log)
    # SIGTERM is handled once the publisher runs; before that it ends the process.
    assert wait_for(lambda: _activations(log) > KILLS, timeout=120), log.read_text()
    deadline = time.monotonic() + 300
    while _pending(sessions, tenant) and time.monotonic() < deadline:
        time.sleep(0.5)
    publisher.send_signal(signal.SIGTERM)
    assert publisher.wait(30) == 0
    assert _pending(sessions, tenant) == 0, log.read_text()[-3000:]

    with sessions() as session:
        rows = {
            str(r[0]): (int(r[1]), r[2])
            for r in session.execute(
                text("SELECT event_id, id, message_key FROM outbox_events WHERE tenant_id = :t"),
                {"t": tenant},
            )
        }
    engine.dispose()
    seen = [(event_id(r), r.partition()) for r in read_committed(bootstrap, topic, expected=EVENTS)]

    ids = [seen_id for seen_id, _ in seen]
    assert len(rows) == EVENTS
    assert set(ids) == set(rows), "lost or unknown events"
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicates"
    last: dict[str, int] = defaultdict(int)
    for seen_id, _ in seen:
        row_id, key = rows[seen_id]
        assert row_id > last[key], f"key {key}: row {row_id} after row {last[key]}"
        last[key] = row_id
    # The kills must have hit running publishers, not processes still starting up.
    assert _activations(log) == KILLS + 1
