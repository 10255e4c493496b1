"""Recovery at start-up in exactly-once mode: settle rows Kafka committed but the
database never marked.

A batch's Kafka transaction holds its events and a checkpoint record naming them; the
database transaction that marks them sent also records where that checkpoint landed.
A crash between the two commits leaves committed events still `pending`. On start (after
`init_transactions()` has aborted anything the previous incarnation left open), the
checkpoint topic is read with read_committed from just after the last recorded position;
every checkpoint of the publisher's tenants found there names rows that are in Kafka,
and they are marked sent now, with their partition and offset. Nothing is published again.

Every publisher writes to the same checkpoint partitions, so a transaction left open
there holds back every tenant's recovery: the producer seals them at start (see
`TransactionalDelivery`), and a recovery that cannot reach the end names the partition
and offset where it stopped.

Checkpoint records are keyed by tenant. The topic is compacted (one record per tenant
survives), so a start with no recorded position reads at most one record per tenant
plus the uncompacted tail.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence

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
    *,
    engine: Engine,
    bootstrap_servers: str,
    tenants: Sequence[str],
    topic: str,
    timeout: float,
) -> int:
    """Mark sent the rows of every committed checkpoint of `tenants` not yet marked.

    Checkpoints are keyed by tenant, whoever published the batch (a dedicated publisher
    or a shared one), so a tenant moved between publishers is recovered all the same.
    Returns how many rows changed.
    """
    if not tenants:
        return 0
    with Session(engine) as session:
        positions = {t: checkpoint_position(session, tenant_id=t) for t in tenants}
    found = _read_checkpoints(bootstrap_servers, positions, topic, timeout)
    if not found:
        return 0

    changed = 0
    with Session(engine) as session, session.begin():
        for tenant, partition, offset, rows in found:
            changed += len(mark_sent(session, rows, tenant_id=tenant))
            save_checkpoint_position(session, tenant_id=tenant, partition=partition, offset=offset)
    if changed:
        log.warning(
            "recovered %d rows of %s that Kafka had committed before the last stop; "
            "marked sent without publishing them again",
            changed,
            ", ".join(sorted({f[0] for f in found})),
            extra={"tenant": found[0][0]} if len({f[0] for f in found}) == 1 else {},
        )
    return changed


def _start_offsets(
    partitions: Sequence[int], positions: Mapping[str, tuple[int, int] | None]
) -> dict[int, int]:
    """Where to start reading each partition: just after the oldest recorded position
    of the tenants, or at the beginning when a tenant has none."""
    starts: dict[int, int] = {}
    for partition in partitions:
        offsets = [p[1] for p in positions.values() if p is not None and p[0] == partition]
        # A tenant with no position here may have checkpoints anywhere in the partition.
        starts[partition] = min(offsets) + 1 if len(offsets) == len(positions) else OFFSET_BEGINNING
    return starts


def _read_checkpoints(
    bootstrap_servers: str,
    positions: Mapping[str, tuple[int, int] | None],
    topic: str,
    timeout: float,
) -> list[tuple[str, int, int, list[Delivered]]]:
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
        starts = _start_offsets(list(metadata.partitions), positions)
        # Read up to the high watermark as it was when recovery began, not to an end
        # that other publishers' transactions keep moving: checkpoints written after
        # it are not of this tenant's previous incarnation. Not to the last stable
        # offset either: a committed checkpoint of this tenant may follow a
        # transaction that another publisher still has open.
        ends = _high_watermarks(bootstrap_servers, topic, list(starts), timeout)
        consumer.assign([TopicPartition(topic, p, offset) for p, offset in starts.items()])
        return _consume_to(consumer, topic, positions, starts, ends, timeout)
    finally:
        consumer.close()


def _high_watermarks(
    bootstrap_servers: str, topic: str, partitions: Sequence[int], timeout: float
) -> dict[int, int]:
    """Each partition's high watermark. Asked by a read_uncommitted client: a
    read_committed one is told the last stable offset instead."""
    client = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"somabrain-recovery-{uuid.uuid4().hex}",
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        return {
            p: client.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout, cached=False
            )[1]
            for p in partitions
        }
    finally:
        client.close()


def _consume_to(
    consumer: Consumer,
    topic: str,
    positions: Mapping[str, tuple[int, int] | None],
    starts: Mapping[int, int],
    ends: Mapping[int, int],
    timeout: float,
) -> list[tuple[str, int, int, list[Delivered]]]:
    found: list[tuple[str, int, int, list[Delivered]]] = []
    done = {p for p, end in ends.items() if end <= 0 or starts[p] >= end}
    reached = {p: start for p, start in starts.items() if start >= 0}
    deadline = time.monotonic() + timeout
    while len(done) < len(ends):
        if time.monotonic() > deadline:
            raise RecoveryFailed(_stuck(topic, reached, ends, done, timeout))
        msg = consumer.poll(0.2)
        for position in consumer.position([TopicPartition(topic, p) for p in ends]):
            if position.offset >= 0:
                reached[position.partition] = position.offset
            if position.offset >= ends[position.partition]:
                done.add(position.partition)
        if msg is None:
            continue
        error = msg.error()
        partition = msg.partition()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                # librdkafka reports the end of a read_committed partition at its last
                # stable offset: short of `ends` while a transaction is open. Done
                # only once the position has reached `ends` (checked above).
                at = msg.offset()
                if partition is not None and at is not None and at >= 0:
                    reached[partition] = at
                continue
            raise RecoveryFailed(f"reading the checkpoint topic failed: {error}")
        key, value, offset = msg.key(), msg.value(), msg.offset()
        if key is None or not value or partition is None or offset is None:
            continue
        if offset >= ends[partition]:
            done.add(partition)
            continue
        tenant = key.decode(errors="replace")
        if tenant not in positions:
            continue
        recorded = positions[tenant]
        if recorded is not None and recorded[0] == partition and offset <= recorded[1]:
            continue  # already settled; a replayed row must not be marked sent again
        found.append((tenant, partition, offset, decode_checkpoint(value)[1]))
    return found


def _stuck(
    topic: str,
    reached: Mapping[int, int],
    ends: Mapping[int, int],
    done: set[int],
    timeout: float,
) -> str:
    """Why recovery gave up, in terms an on-call engineer can act on."""
    behind = [p for p in sorted(ends) if p not in done]
    first = behind[0]
    where = ", ".join(f"partition {p} at offset {reached.get(p, '?')} of {ends[p]}" for p in behind)
    return (
        f"checkpoint topic {topic} not read to its end within {timeout:.0f}s: {where}. "
        "Either the broker is not answering, or a transaction open at that offset holds "
        "back read_committed readers; if the position does not move, that transaction "
        "is hanging (its producer, once restarted, ends it itself): see it with "
        f"`kafka-transactions.sh find-hanging --topic {topic} --partition {first}` and end "
        f"it with `kafka-transactions.sh abort --topic {topic} --partition {first} "
        f"--start-offset {reached.get(first, '?')}`"
    )
