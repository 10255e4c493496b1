"""Property test on the real database and broker: random interleavings of enqueue,
batch delivery, per-event failure and crashes between Kafka's commit and the database's
never lose, duplicate (exactly-once mode) or reorder events within a key."""

from __future__ import annotations

import uuid
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from somabrain import enqueue_event
from somabrain.config.settings import PublisherSettings
from somabrain.config.types import TenantId
from somabrain.delivery.producer import Delivery
from somabrain.delivery.publisher import Publisher, build_publisher
from somabrain.store.engine import make_sessionmaker
from somabrain.store.outbox import claim_pending, record_failure
from tests.support import event_id, read_committed

KEYS = ["a", "b", "c"]


class Interleavings(RuleBasedStateMachine):
    engine: Engine
    bootstrap: str

    @initialize()
    def start(self) -> None:
        self.tenant = f"p{uuid.uuid4().hex[:10]}"
        self.topic = f"{self.tenant}.prop"
        self.sessions = make_sessionmaker(self.engine)
        publisher_settings = PublisherSettings(
            tenant=self.tenant,
            kafka_bootstrap_servers=self.bootstrap,
            batch_size=4,
            retry_backoff_seconds=0.001,
            retry_backoff_max_seconds=0.001,
            max_attempts=1000,
            delivery_timeout_seconds=10,
        )
        self.publisher: Publisher = build_publisher(publisher_settings, self.engine)
        self.delivery: Delivery = self._restart()

    def _restart(self) -> Delivery:
        delivery = self.publisher.connect()
        assert self.publisher.recover is not None
        self.publisher.recover([TenantId(self.tenant)])
        return delivery

    @rule(key=st.sampled_from(KEYS), count=st.integers(1, 4))
    def enqueue(self, key: str, count: int) -> None:
        with self.sessions.begin() as session:
            for _ in range(count):
                enqueue_event(session, tenant_id=self.tenant, topic=self.topic, key=key, payload={})

    @rule()
    def deliver_a_batch(self) -> None:
        self.publisher.drain_once(self.delivery)

    @rule()
    def crash_after_kafka_commit(self) -> None:
        with Session(self.engine) as session:
            batch = claim_pending(session, tenant_id=TenantId(self.tenant), limit=4)
        if batch:
            self.delivery.deliver(batch, timeout=10)  # committed in Kafka, never settled
        self.delivery.close(5)
        self.delivery = self._restart()

    @rule()
    def head_event_fails_once(self) -> None:
        with Session(self.engine) as session, session.begin():
            batch = claim_pending(session, tenant_id=TenantId(self.tenant), limit=1)
            if batch:
                record_failure(
                    session,
                    row_id=batch[0].id,
                    error="injected",
                    backoff_seconds=0,
                    max_attempts=1000,
                )

    @invariant()
    def nothing_sent_without_an_offset(self) -> None:
        with self.engine.connect() as conn:
            bad = conn.execute(
                text(
                    "SELECT count(*) FROM outbox_events WHERE tenant_id = :t"
                    " AND status = 'sent' AND kafka_offset IS NULL"
                ),
                {"t": self.tenant},
            ).scalar_one()
        assert bad == 0

    def teardown(self) -> None:
        while self.publisher.drain_once(self.delivery):
            pass
        self.delivery.close(5)
        with self.engine.connect() as conn:
            rows = {
                str(r[0]): (int(r[1]), str(r[2]), str(r[3]))
                for r in conn.execute(
                    text(
                        "SELECT event_id, id, message_key, status FROM outbox_events"
                        " WHERE tenant_id = :t"
                    ),
                    {"t": self.tenant},
                )
            }
        assert {status for _, _, status in rows.values()} <= {"sent"}
        seen = (
            [
                event_id(r)
                for r in read_committed(self.bootstrap, self.topic, expected=len(rows), idle=1.0)
            ]
            if rows
            else []
        )
        assert sorted(seen) == sorted(rows), "lost or duplicated events"
        last: dict[str, int] = defaultdict(int)
        for seen_id in seen:
            row_id, key, _ = rows[seen_id]
            assert row_id > last[key], f"key {key}: row {row_id} after {last[key]}"
            last[key] = row_id


@pytest.mark.timeout(600)
def test_random_interleavings_keep_every_event_once_and_in_key_order(
    engine: Engine, bootstrap: str
) -> None:
    Interleavings.engine = engine
    Interleavings.bootstrap = bootstrap
    machine = Interleavings.TestCase
    machine.settings = settings(
        max_examples=8,
        stateful_step_count=10,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    machine().runTest()
