"""The broker stopped mid-drain and started again (cases O-6, O-19): nothing is marked
sent while it is down, the tenant's circuit opens instead of spinning, and once it is
back every event arrives exactly once, in order."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from devenv import stack
from somabrain import enqueue_event
from somabrain.config.settings import PublisherSettings
from somabrain.delivery.circuit import CircuitState
from somabrain.delivery.publisher import build_publisher
from somabrain.store.engine import make_engine, make_sessionmaker
from tests.support import event_id, read_committed

pytestmark = pytest.mark.integration
EVENTS = 3000


def _counts(engine: Engine, tenant: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT status, count(*) FROM outbox_events WHERE tenant_id = :t GROUP BY 1"),
            {"t": tenant},
        )
        return {r[0]: int(r[1]) for r in rows}


@pytest.mark.timeout(600)
def test_broker_outage_opens_the_circuit_and_loses_nothing(
    database_url: str, bootstrap: str, stack_dir: Path, tenant: str
) -> None:
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    topic = f"{tenant}.outage"
    settings = PublisherSettings(
        tenant=tenant,
        kafka_bootstrap_servers=bootstrap,
        batch_size=100,
        poll_interval_seconds=0.2,
        delivery_timeout_seconds=4,
        retry_backoff_seconds=0.5,
        retry_backoff_max_seconds=2,
        circuit_failure_threshold=2,
        circuit_open_seconds=2,
        max_attempts=1000,
        shutdown_grace_seconds=2,
    )
    publisher = build_publisher(settings, engine)
    thread = threading.Thread(target=publisher.run, daemon=True)
    thread.start()
    try:
        with sessions.begin() as session:
            for i in range(EVENTS // 2):
                enqueue_event(session, tenant_id=tenant, topic=topic, key=f"k{i % 7}", payload={})
        deadline = time.monotonic() + 60
        while _counts(engine, tenant).get("sent", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)

        stack.stop_component(stack_dir, "kafka")
        with sessions.begin() as session:
            for i in range(EVENTS // 2, EVENTS):
                enqueue_event(session, tenant_id=tenant, topic=topic, key=f"k{i % 7}", payload={})
        sent_while_down = _counts(engine, tenant).get("sent", 0)
        deadline = time.monotonic() + 60
        circuit = publisher.lane(tenant).circuit
        while circuit.state is CircuitState.CLOSED and time.monotonic() < deadline:
            time.sleep(0.2)
        assert circuit.state is not CircuitState.CLOSED
        assert _counts(engine, tenant).get("sent", 0) == sent_while_down
        assert _counts(engine, tenant).get("dead", 0) == 0

        stack.relaunch_component(stack_dir, "kafka")
        deadline = time.monotonic() + 180
        while _counts(engine, tenant).get("sent", 0) < EVENTS and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _counts(engine, tenant) == {"sent": EVENTS}
        assert circuit.state is CircuitState.CLOSED
    finally:
        publisher.stopping.set()
        thread.join(30)
        engine.dispose()

    ids = [event_id(r) for r in read_committed(bootstrap, topic, expected=EVENTS)]
    assert len(ids) == EVENTS
    assert len(set(ids)) == EVENTS
