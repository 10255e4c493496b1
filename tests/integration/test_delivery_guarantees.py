"""Delivery guarantees on the real broker and database: crash recovery, per-key order
under failure, poison events (cases O-3, O-11, O-12, O-13)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from somabrain import enqueue_event
from somabrain.config.settings import PublisherSettings
from somabrain.config.types import TenantId
from somabrain.delivery import metrics
from somabrain.delivery.producer import (
    ProducerFenced,
    TransactionalDelivery,
    build_config,
    transactional_id,
)
from somabrain.delivery.publisher import build_publisher
from somabrain.delivery.recovery import RecoveryFailed, ensure_checkpoint_topic, recover
from somabrain.store.outbox import backlog, claim_pending, record_failure
from tests.support import read_committed, set_aside, wait_for


def _settings(tenant: str, bootstrap: str, **overrides: Any) -> PublisherSettings:
    return PublisherSettings(
        tenant=tenant,
        kafka_bootstrap_servers=bootstrap,
        poll_interval_seconds=0.2,
        shutdown_grace_seconds=2,
        **overrides,
    )


def _incarnation(settings: PublisherSettings) -> TransactionalDelivery:
    """A publisher's Kafka side on its own, to stop it at a chosen point of a batch."""
    bootstrap = settings.kafka_bootstrap_servers
    ensure_checkpoint_topic(bootstrap, settings.checkpoint_topic, timeout=30)
    config = build_config(
        bootstrap_servers=bootstrap,
        delivery_timeout_seconds=10,
        overrides={},
        transactional_id=transactional_id(settings.tenant),
    )
    return TransactionalDelivery(
        config, owner=settings.tenant, checkpoint_topic=settings.checkpoint_topic, timeout=30
    )


def _small_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = NewTopic(
        topic, num_partitions=1, replication_factor=1, config={"max.message.bytes": "2048"}
    )
    admin.create_topics([new])[topic].result(30)


def _statuses(engine: Engine, tenant: str) -> list[tuple[str | None, str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT message_key, status, attempts FROM outbox_events"
                " WHERE tenant_id = :t ORDER BY id"
            ),
            {"t": tenant},
        )
        return [(r[0], r[1], r[2]) for r in rows]


def test_crash_after_kafka_commit_before_marking_sent_publishes_each_event_once(
    engine: Engine, sessions: sessionmaker[Session], bootstrap: str, tenant: str, run_publisher: Any
) -> None:
    # O-3: the batch commits in Kafka, then the process dies before the database commit.
    topic = f"{tenant}.orders"
    with sessions.begin() as session:
        for i in range(10):
            enqueue_event(session, tenant_id=tenant, topic=topic, key=f"k{i % 2}", payload={"i": i})
    settings = _settings(tenant, bootstrap)
    crashed = _incarnation(settings)
    with Session(engine) as session:
        batch = claim_pending(session, tenant_id=TenantId(tenant), limit=100)
    committed = crashed.deliver(batch, timeout=30)
    assert len(committed.delivered) == 10
    assert {s for _, s, _ in _statuses(engine, tenant)} == {"pending"}

    run_publisher(build_publisher(settings, engine))
    assert wait_for(lambda: {s for _, s, _ in _statuses(engine, tenant)} == {"sent"})

    messages = read_committed(bootstrap, topic)
    event_ids = [dict(m.headers())["event-id"] for m in messages]
    assert len(event_ids) == 10
    assert len(set(event_ids)) == 10


def test_crash_before_kafka_commit_leaves_nothing_visible_and_delivers_once(
    engine: Engine, sessions: sessionmaker[Session], bootstrap: str, tenant: str, run_publisher: Any
) -> None:
    # A zombie's open transaction is aborted by the next incarnation's init_transactions.
    topic = f"{tenant}.orders"
    with sessions.begin() as session:
        for i in range(5):
            enqueue_event(session, tenant_id=tenant, topic=topic, key="k", payload={"i": i})
    settings = _settings(tenant, bootstrap)
    zombie = _incarnation(settings)
    zombie._producer.begin_transaction()
    for i in range(5):
        zombie._producer.produce(topic, key=b"k", value=b'{"zombie":%d}' % i)
    zombie._producer.flush(10)

    run_publisher(build_publisher(settings, engine))
    assert wait_for(lambda: {s for _, s, _ in _statuses(engine, tenant)} == {"sent"})

    values = [m.value() for m in read_committed(bootstrap, topic)]
    assert values == [b'{"i":%d}' % i for i in range(5)]


def test_a_checkpoint_committed_after_another_publishers_open_transaction_is_recovered(
    engine: Engine, sessions: sessionmaker[Session], bootstrap: str, tenant: str
) -> None:
    # O-3 with a neighbour: another publisher's transaction is open on the checkpoint
    # partition when this tenant's batch commits in Kafka and the process dies before
    # the database commit. librdkafka reports the partition's end at the neighbour's
    # first offset; recovery must still read past it, or the batch goes out twice.
    # Its own checkpoint topic, so that the open transaction holds back no other test.
    settings = _settings(tenant, bootstrap, checkpoint_topic=f"checkpoints-{uuid.uuid4().hex[:8]}")
    topic = f"{tenant}.orders"
    with sessions.begin() as session:
        for i in range(4):
            enqueue_event(session, tenant_id=tenant, topic=topic, key="k", payload={"i": i})
    crashed = _incarnation(settings)
    neighbour = Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": f"test-{settings.checkpoint_topic}"}
    )
    neighbour.init_transactions(30)
    neighbour.begin_transaction()
    neighbour.produce(settings.checkpoint_topic, key=b"another-tenant", value=b"{}")
    neighbour.flush(10)
    with Session(engine) as session:
        batch = claim_pending(session, tenant_id=TenantId(tenant), limit=100)
    assert len(crashed.deliver(batch, timeout=30).delivered) == 4

    def recover_now(timeout: float) -> int:
        return recover(
            engine=engine,
            bootstrap_servers=bootstrap,
            tenants=[TenantId(tenant)],
            topic=settings.checkpoint_topic,
            timeout=timeout,
        )

    with pytest.raises(RecoveryFailed) as held:
        recover_now(3)
    message = str(held.value)
    offset = read_offset_of_first_open(message)
    assert f"checkpoint topic {settings.checkpoint_topic} not read to its end within 3s" in message
    assert f"abort --topic {settings.checkpoint_topic} --partition 0 --start-offset {offset}" in (
        message
    )
    assert {s for _, s, _ in _statuses(engine, tenant)} == {"pending"}

    neighbour.abort_transaction(30)
    assert recover_now(10) == 4
    assert {s for _, s, _ in _statuses(engine, tenant)} == {"sent"}


def read_offset_of_first_open(message: str) -> int:
    return int(message.split("partition 0 at offset ")[1].split(" ")[0])


def test_retrying_event_blocks_later_events_of_its_key_only(
    engine: Engine, sessions: sessionmaker[Session], tenant: str
) -> None:
    with sessions.begin() as session:
        for key in ["a", "b", "a", "b", None]:
            enqueue_event(session, tenant_id=tenant, topic="t.orders", key=key, payload={})
    with Session(engine) as session, session.begin():
        first = claim_pending(session, tenant_id=TenantId(tenant), limit=10)[0]
        record_failure(session, row_id=first.id, error="boom", backoff_seconds=60, max_attempts=5)

    with Session(engine) as session:
        claimed = claim_pending(session, tenant_id=TenantId(tenant), limit=10)
        reported = backlog(session, tenant_id=TenantId(tenant))

    assert [e.message_key for e in claimed] == ["b", "b", None]
    assert reported.blocked_keys == 1, "key a waits behind its retrying event"
    assert reported.pending == 5


@pytest.mark.parametrize(("policy", "later_a"), [("block", False), ("skip", True)])
def test_dead_event_blocks_its_key_under_block_and_not_under_skip(
    engine: Engine, sessions: sessionmaker[Session], tenant: str, policy: str, later_a: bool
) -> None:
    with sessions.begin() as session:
        for key in ["a", "a", "b"]:
            enqueue_event(session, tenant_id=tenant, topic="t.orders", key=key, payload={})
    with Session(engine) as session, session.begin():
        first = claim_pending(session, tenant_id=TenantId(tenant), limit=10)[0]
        went_dead = record_failure(
            session, row_id=first.id, error="boom", backoff_seconds=0, max_attempts=1
        )
    assert went_dead

    with Session(engine) as session:
        claimed = claim_pending(
            session, tenant_id=TenantId(tenant), limit=10, dead_blocks_key=policy == "block"
        )
        reported = backlog(session, tenant_id=TenantId(tenant), dead_blocks_key=policy == "block")

    assert ("a" in [e.message_key for e in claimed]) is later_a
    assert reported.blocked_keys == (0 if later_a else 1)
    assert "b" in [e.message_key for e in claimed]


def test_a_row_migration_0003_set_aside_blocks_no_key_under_block(
    engine: Engine, sessions: sessionmaker[Session], tenant: str
) -> None:
    # A repeat of another event's dedupe key, made dead so it is never published: it is
    # not an event of its key, and the key's later events must not wait behind it.
    with sessions.begin() as session:
        for _ in range(3):
            enqueue_event(session, tenant_id=tenant, topic="t.orders", key="a", payload={})
    with sessions.begin() as session:
        ids = [r.id for r in claim_pending(session, tenant_id=TenantId(tenant), limit=10)]
        set_aside(session, ids[1])
        session.execute(
            text(
                "UPDATE outbox_events SET status = 'sent', sent_at = now(), kafka_offset = 0"
                " WHERE id = :id"
            ),
            {"id": ids[0]},
        )
    with Session(engine) as session:
        claimed = claim_pending(session, tenant_id=TenantId(tenant), limit=10, dead_blocks_key=True)
        reported = backlog(session, tenant_id=TenantId(tenant), dead_blocks_key=True)
    assert [e.id for e in claimed] == [ids[2]]
    assert reported.blocked_keys == 0


@pytest.mark.parametrize("mode", ["exactly-once", "at-least-once"])
def test_event_the_broker_refuses_goes_dead_and_other_keys_flow(
    mode: str,
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    tenant: str,
    run_publisher: Any,
) -> None:
    # O-11 / O-13: the topic takes at most 2 KB; one event is over that, at the head.
    topic = f"{tenant}.small"
    _small_topic(bootstrap, topic)
    with sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic=topic, key="a", payload={"x": "y" * 5000})
        enqueue_event(session, tenant_id=tenant, topic=topic, key="a", payload={"after": 1})
        enqueue_event(session, tenant_id=tenant, topic=topic, key="b", payload={"other": 1})

    run_publisher(build_publisher(_settings(tenant, bootstrap, delivery_mode=mode), engine))

    assert wait_for(lambda: _statuses(engine, tenant)[0][1] == "dead")
    assert wait_for(lambda: _statuses(engine, tenant)[2][1] == "sent")
    time.sleep(1)
    statuses = _statuses(engine, tenant)
    assert statuses[1][1] == "pending", "later event of the dead key must wait (policy block)"
    # O-11: a metric shows the key held back (reported with the backlog, every 5 s).
    assert wait_for(
        lambda: (
            metrics.REGISTRY.get_sample_value("somabrain_blocked_keys", {"tenant": tenant}) == 1
        ),
        timeout=15,
    )
    with engine.connect() as conn:
        reason = conn.execute(
            text("SELECT last_error FROM outbox_events WHERE tenant_id = :t AND status = 'dead'"),
            {"t": tenant},
        ).scalar_one()
    assert "too large" in reason.lower() or "MSG_SIZE_TOO_LARGE" in reason


@pytest.mark.parametrize("mode", ["exactly-once", "at-least-once"])
def test_a_dead_event_is_copied_once_to_the_dead_letter_topic_with_its_reason(
    mode: str,
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    tenant: str,
    run_publisher: Any,
) -> None:
    topic = f"{tenant}.small"
    _small_topic(bootstrap, topic)
    with sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic=topic, key="a", payload={"x": "y" * 5000})
        enqueue_event(session, tenant_id=tenant, topic=topic, key="b", payload={"other": 1})
    settings = _settings(
        tenant, bootstrap, delivery_mode=mode, dead_letter_topic="{tenant}.dead-letter"
    )

    run_publisher(build_publisher(settings, engine))

    assert wait_for(lambda: [s for _, s, _ in _statuses(engine, tenant)] == ["dead", "sent"])
    with engine.connect() as conn:
        dead_id = conn.execute(
            text("SELECT event_id FROM outbox_events WHERE tenant_id = :t AND status = 'dead'"),
            {"t": tenant},
        ).scalar_one()
    copies = read_committed(bootstrap, f"{tenant}.dead-letter", expected=1)
    assert len(copies) == 1
    headers = {k: v.decode() for k, v in copies[0].headers()}
    assert headers["event-id"] == str(dead_id)
    assert headers["original-topic"] == topic
    assert "too large" in headers["dead-reason"].lower() or "SIZE" in headers["dead-reason"]
    assert copies[0].key() == b"a"


def test_an_event_whose_dead_letter_copy_is_refused_stays_pending_and_says_why(
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    tenant: str,
    run_publisher: Any,
) -> None:
    # Nothing goes dead (out of sight) until its copy is confirmed: here the dead-letter
    # topic is as small as the original, so the copy can never land.
    topic = f"{tenant}.small"
    _small_topic(bootstrap, topic)
    _small_topic(bootstrap, f"{tenant}.dlt")
    with sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic=topic, key="a", payload={"x": "y" * 5000})
    settings = _settings(
        tenant,
        bootstrap,
        dead_letter_topic=f"{tenant}.dlt",
        retry_backoff_seconds=0.05,
        retry_backoff_max_seconds=0.1,
    )

    run_publisher(build_publisher(settings, engine))

    assert wait_for(lambda: _statuses(engine, tenant)[0][2] >= 3)
    with engine.connect() as conn:
        status, error = conn.execute(
            text("SELECT status, last_error FROM outbox_events WHERE tenant_id = :t"),
            {"t": tenant},
        ).one()
    assert status == "pending"
    assert "dead-letter copy not confirmed" in error


class _Crash(Exception):
    """The process dies here."""


class _CrashAfterConfirmation:
    """Kafka confirms the batch, then the process dies before the database hears of it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def deliver(self, events: Any, *, timeout: float, before_commit: Any = None) -> Any:
        self.inner.deliver(events, timeout=timeout, before_commit=before_commit)
        raise _Crash

    def close(self, timeout: float) -> int:
        return int(self.inner.close(timeout))


def test_at_least_once_crash_after_confirmation_republishes_same_ids_and_counts_them(
    engine: Engine, sessions: sessionmaker[Session], bootstrap: str, tenant: str, run_publisher: Any
) -> None:
    # O-3, at-least-once: the second copy carries the same event-id and key, and the
    # republished counter says how many copies consumers may see twice.
    topic = f"{tenant}.orders"
    with sessions.begin() as session:
        for i in range(6):
            enqueue_event(session, tenant_id=tenant, topic=topic, key=f"k{i % 3}", payload={"i": i})
    settings = _settings(tenant, bootstrap, delivery_mode="at-least-once")
    crashed = build_publisher(settings, engine)
    with pytest.raises(_Crash):
        crashed.drain_once(_CrashAfterConfirmation(crashed.connect()))
    assert {s for _, s, _ in _statuses(engine, tenant)} == {"pending"}

    publisher = run_publisher(build_publisher(settings, engine))
    assert wait_for(lambda: {s for _, s, _ in _statuses(engine, tenant)} == {"sent"})

    messages = read_committed(bootstrap, topic, expected=12)
    copies: dict[bytes, list[bytes]] = {}
    for message in messages:
        copies.setdefault(dict(message.headers())["event-id"], []).append(message.key())
    assert len(copies) == 6
    assert all(len(keys) == 2 and keys[0] == keys[1] for keys in copies.values())
    republished = metrics.REGISTRY.get_sample_value(
        "somabrain_events_republished_total", {"tenant": tenant}
    )
    assert republished == 6
    assert publisher.lane(tenant).circuit.state.name == "CLOSED"


def test_a_publisher_fenced_by_a_newer_incarnation_stops_with_producer_fenced(
    engine: Engine, sessions: sessionmaker[Session], bootstrap: str, tenant: str
) -> None:
    # Two incarnations of one publisher (same transactional id): the newer one's start
    # fences the older, whose next batch must stop it with ProducerFenced (not with
    # whatever confluent-kafka's callbacks left behind) and commit nothing.
    topic = f"{tenant}.orders"
    with sessions.begin() as session:
        for i in range(3):
            enqueue_event(session, tenant_id=tenant, topic=topic, payload={"i": i})
    settings = _settings(tenant, bootstrap)
    older = _incarnation(settings)
    with Session(engine) as session:
        batch = claim_pending(session, tenant_id=TenantId(tenant), limit=10)
    assert len(older.deliver(batch[:1], timeout=30).delivered) == 1
    _incarnation(settings)  # fences `older`

    with pytest.raises(ProducerFenced):
        older.deliver(batch[1:], timeout=30)

    # The older one's first batch only.
    assert len(read_committed(bootstrap, topic, expected=1)) == 1
