"""Recovery at start-up in exactly-once mode: settle rows Kafka committed but the
database never marked.

A batch's Kafka transaction holds its events and a checkpoint record naming them; the
database transaction that marks them sent also records where that checkpoint landed.
A crash between the two commits leaves committed events still `pending`. On start (after
`init_transactions()` has aborted anything the previous incarnation left open), the
checkpoint topic is read with read_committed from just after the last recorded position;
every checkpoint of this owner found there names rows that are in Kafka, and they are
marked sent now, with their partition and offset. Nothing is published again.

The checkpoint topic is compacted (one record per owner survives), so a first start with
no recorded position reads at most one record per owner plus the uncompacted tail.
"""

from __future__ import annotations

import logging
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from somabrain.config.errors import RetriableError
from somabrain.delivery.producer import decode_checkpoint
from somabrain.store.outbox import (
    Delivered,
    checkpoint_position,
    mark_sent,
    save_checkpoint_position,
)

log = logging.getLogger(__name__)


class RecoveryFailed(RetriableError):
    """The checkpoint topic could not be read to its end; the publisher retries."""


def ensure_checkpoint_topic(bootstrap_servers: str, topic: str, *, timeout: float) -> None:
    """Create the compacted checkpoint topic if it does not exist yet."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    new = NewTopic(
        topic, num_partitions=1, replication_factor=-1, config={"cleanup.policy": "compact"}
    )
    future = admin.create_topics([new], operation_timeout=timeout)[topic]
    try:
        future.result(timeout)
    except Exception as exc:
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if error is None or error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise RecoveryFailed(f"cannot create checkpoint topic {topic}: {exc}") from exc


def recover(
    *, engine: Engine, bootstrap_servers: str, owner: str, topic: str, timeout: float
) -> int:
    """Mark sent the rows of every committed checkpoint of `owner` not yet marked.

    Returns how many rows changed.
    """
    with Session(engine) as session:
        position = checkpoint_position(session, owner=owner)
    found = _read_checkpoints(bootstrap_servers, owner, topic, position, timeout)
    if not found:
        return 0

    changed = 0
    with Session(engine) as session, session.begin():
        for partition, offset, rows in found:
            changed += mark_sent(session, rows)
            save_checkpoint_position(session, owner=owner, partition=partition, offset=offset)
    if changed:
        log.warning(
            "recovered %d rows of %s that Kafka had committed before the last stop; "
            "marked sent without publishing them again",
            changed,
            owner,
            extra={"tenant": owner},
        )
    return changed


def _read_checkpoints(
    bootstrap_servers: str,
    owner: str,
    topic: str,
    position: tuple[int, int] | None,
    timeout: float,
) -> list[tuple[int, int, list[Delivered]]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"somabrain-recovery-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise RecoveryFailed(f"checkpoint topic {topic} is not readable")
        assignment = [
            TopicPartition(
                topic,
                p,
                position[1] + 1 if position and position[0] == p else OFFSET_BEGINNING,
            )
            for p in metadata.partitions
        ]
        consumer.assign(assignment)
        return _consume_to_end(consumer, owner, len(assignment), timeout)
    finally:
        consumer.close()


def _consume_to_end(
    consumer: Consumer, owner: str, partitions: int, timeout: float
) -> list[tuple[int, int, list[Delivered]]]:
    found: list[tuple[int, int, list[Delivered]]] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(at_end) < partitions:
        if time.monotonic() > deadline:
            raise RecoveryFailed(
                f"checkpoint topic not read to its end within {timeout:.0f}s "
                "(an open transaction of another publisher may hold it back)"
            )
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        error = msg.error()
        partition = msg.partition()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF and partition is not None:
                at_end.add(partition)
                continue
            raise RecoveryFailed(f"reading the checkpoint topic failed: {error}")
        key, value, offset = msg.key(), msg.value(), msg.offset()
        if key == owner.encode() and value and partition is not None and offset is not None:
            _, rows = decode_checkpoint(value)
            found.append((partition, offset, rows))
    return found
