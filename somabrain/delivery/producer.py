"""The Kafka side of delivery: one batch in, Kafka's verdict on each event out.

Two modes, one interface (`deliver` a batch, get a `BatchResult`):

- **exactly-once** (`TransactionalDelivery`): each batch (one tenant's events) is one
  Kafka transaction holding the events and a checkpoint record naming them (row id,
  partition, offset), keyed by the tenant. Read_committed consumers see a batch whole or
  not at all; after a crash, the checkpoint tells the next publisher of that tenant which
  claimed rows Kafka already committed. The `transactional.id` is derived from the owner
  (the tenant, or the pool of a shared publisher), so a new incarnation fences the old
  one (e.g. the old pod of a rolling update).
- **at-least-once** (`IdempotentDelivery`): an idempotent producer (retries keep
  order within a partition); rows are confirmed by their delivery reports. Limit: if
  Kafka refuses one request of a batch while a later request of the same partition
  succeeds, a later event of that key has overtaken the failed one and cannot be
  taken back; this is counted (`somabrain_key_order_breaks_total`) and logged. The
  exactly-once mode aborts the whole batch instead, so it never happens there.

Guarantees in both: an event counts as delivered only from Kafka's confirmation (its
delivery report, and in exactly-once mode the committed transaction), never because
`produce()` returned. `enable.idempotence`, `acks=all` and at most 5 requests in flight
are enforced: a configuration that would allow duplicates or reordering is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from somabrain.config.errors import (
    EventEncodingError,
    FatalError,
    RetriableError,
    UnsafeProducerConfig,
)
from somabrain.delivery.classify import Verdict, classify
from somabrain.store.codec import reencode_stored
from somabrain.store.outbox import Delivered, PendingEvent

log = logging.getLogger(__name__)

# Key of the aborted records that seal the checkpoint partitions at start; never a
# tenant id (tenant ids are lowercase letters, digits and dashes).
SEAL_KEY = b"\x00seal"

SAFE_SETTINGS: Mapping[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "max.in.flight.requests.per.connection": 5,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Failed:
    """Kafka refused or did not confirm one event."""

    id: int
    error: str
    verdict: Verdict


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointPosition:
    partition: int
    offset: int


@dataclasses.dataclass
class BatchResult:
    """Kafka's verdict on a batch: confirmed events, failed ones, and in exactly-once
    mode where the batch's checkpoint record landed."""

    delivered: list[Delivered] = dataclasses.field(default_factory=list)
    failed: list[Failed] = dataclasses.field(default_factory=list)
    checkpoint: CheckpointPosition | None = None


class Delivery(Protocol):
    def deliver(
        self,
        events: Sequence[PendingEvent],
        *,
        timeout: float,
        before_commit: Callable[[], None] | None = None,
    ) -> BatchResult: ...

    def dead_letter(
        self, copies: Sequence[tuple[PendingEvent, str]], *, topic: str, timeout: float
    ) -> set[int]: ...

    def close(self, timeout: float) -> int: ...


class ProducerFenced(FatalError):
    """Another publisher with the same transactional id took over; this one must stop."""


class KafkaUnavailable(RetriableError):
    """Kafka did not answer in time; the publisher reconnects after a pause."""


class CommitOutcomeUnknown(RetriableError):
    """A batch's commit failed; whether Kafka holds it is settled by recovery, which reads
    the checkpoint topic before anything is claimed again."""


def build_config(
    *,
    bootstrap_servers: str,
    delivery_timeout_seconds: float,
    overrides: Mapping[str, Any],
    transactional_id: str | None = None,
) -> dict[str, Any]:
    """Producer configuration with the delivery-safety settings locked in."""
    for name, safe in SAFE_SETTINGS.items():
        if name in overrides and str(overrides[name]).lower() != str(safe).lower():
            raise UnsafeProducerConfig(
                f"producer setting {name}={overrides[name]!r} would allow lost, duplicated or "
                f"reordered events; remove it (the publisher always uses {name}={safe!r})"
            )
    delivery_ms = int(delivery_timeout_seconds * 1000)
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "linger.ms": 5,
        "delivery.timeout.ms": delivery_ms,
        **overrides,
        **SAFE_SETTINGS,
    }
    if transactional_id is not None:
        config["transactional.id"] = transactional_id
        config["transaction.timeout.ms"] = max(60_000, 2 * delivery_ms)
    return config


def transactional_id(owner: str) -> str:
    """Stable per owner, so every incarnation of a publisher fences the last."""
    return f"somabrain-publisher-{owner}"


def message_headers(event: PendingEvent) -> list[tuple[str, str | bytes | None]]:
    """Headers every copy of an event carries, so consumers can identify and drop repeats."""
    headers: list[tuple[str, str | bytes | None]] = [
        ("tenant-id", event.tenant_id.encode()),
        ("event-id", str(event.event_id).encode()),
        ("dedupe-key", event.dedupe_key.encode()),
        ("content-type", b"application/json"),
    ]
    if event.event_type:
        headers.append(("event-type", event.event_type.encode()))
    headers.extend((name, value.encode()) for name, value in sorted(event.headers.items()))
    return headers


class _Reports:
    """Collects the delivery reports of one batch."""

    def __init__(self) -> None:
        self.result = BatchResult()

    def callback(self, row_id: int) -> Callable[[KafkaError | None, Message | None], None]:
        def on_delivery(err: KafkaError | None, msg: Message | None) -> None:
            if err is not None:
                self.result.failed.append(Failed(row_id, str(err), classify(err)))
                return
            partition = None if msg is None else msg.partition()
            offset = None if msg is None else msg.offset()
            if partition is None or offset is None:
                self.result.failed.append(
                    Failed(row_id, "delivery report without an offset", Verdict.RETRIABLE)
                )
            else:
                self.result.delivered.append(Delivered(row_id, partition, offset))

        return on_delivery

    def refuse(self, row_id: int, why: str) -> None:
        """An event that cannot become a message at all: it fails alone, for good."""
        self.result.failed.append(Failed(row_id, why, Verdict.PERMANENT))

    def settle_missing(self, events: Sequence[PendingEvent], why: str) -> None:
        settled = {d.id for d in self.result.delivered} | {f.id for f in self.result.failed}
        self.result.failed.extend(
            Failed(e.id, why, Verdict.RETRIABLE) for e in events if e.id not in settled
        )


def _produce(
    producer: Producer,
    event: PendingEvent,
    reports: _Reports,
    extra_headers: Sequence[tuple[str, bytes]] = (),
    *,
    stored_if_unencodable: bool = False,
) -> None:
    try:
        value = reencode_stored(event.payload_json)
    except EventEncodingError as exc:
        if stored_if_unencodable and event.payload_json is not None:
            # A dead-letter copy carries the payload exactly as the database holds it.
            value = event.payload_json.encode()
        else:
            # Only a row written around enqueue gets here; it goes dead with the reason
            # instead of stopping the publisher with every other event of its batch.
            reports.refuse(event.id, f"payload cannot be published: {exc}")
            return
    callback = reports.callback(event.id)
    while True:
        try:
            producer.produce(
                event.topic,
                key=None if event.message_key is None else event.message_key.encode(),
                value=value,
                headers=[*message_headers(event), *extra_headers],
                on_delivery=callback,
            )
            return
        except BufferError:
            # The local queue is full: serve delivery reports to make room.
            producer.poll(0.1)
        except KafkaException as exc:
            callback(exc.args[0], None)
            return


def _produce_dead_letters(
    producer: Producer, copies: Sequence[tuple[PendingEvent, str]], topic: str
) -> _Reports:
    reports = _Reports()
    for event, reason in copies:
        extra = [("dead-reason", reason[:1000].encode()), ("original-topic", event.topic.encode())]
        _produce(
            producer,
            dataclasses.replace(event, topic=topic),
            reports,
            extra_headers=extra,
            stored_if_unencodable=True,
        )
    return reports


class IdempotentDelivery:
    """At-least-once: an idempotent producer; rows are confirmed by delivery reports."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = dict(config)
        self._producer = Producer(self._config)

    def deliver(
        self,
        events: Sequence[PendingEvent],
        *,
        timeout: float,
        before_commit: Callable[[], None] | None = None,
    ) -> BatchResult:
        reports = _Reports()
        for event in events:
            _produce(self._producer, event, reports)
        if self._producer.flush(timeout):
            reports.settle_missing(events, f"no delivery report within {timeout:.0f}s")
        return reports.result

    def dead_letter(
        self, copies: Sequence[tuple[PendingEvent, str]], *, topic: str, timeout: float
    ) -> set[int]:
        """Copy events to the dead-letter topic; return the row ids Kafka confirmed."""
        reports = _produce_dead_letters(self._producer, copies, topic)
        self._producer.flush(timeout)
        return {d.id for d in reports.result.delivered}

    def close(self, timeout: float) -> int:
        return int(self._producer.flush(timeout))


def order_breaks(events: Sequence[PendingEvent], result: BatchResult) -> list[str]:
    """Keys of which a later event was confirmed after an earlier one failed."""
    failed = {f.id for f in result.failed}
    delivered = {d.id for d in result.delivered}
    first_failure: dict[str, int] = {}
    broken: list[str] = []
    for event in events:
        if event.message_key is None:
            continue
        if event.id in failed:
            first_failure.setdefault(event.message_key, event.id)
        elif (
            event.id in delivered
            and event.message_key in first_failure
            and event.message_key not in broken
        ):
            broken.append(event.message_key)
    return broken


class TransactionalDelivery:
    """Exactly-once: each batch and its checkpoint record commit as one transaction."""

    def __init__(
        self, config: Mapping[str, Any], *, owner: str, checkpoint_topic: str, timeout: float
    ) -> None:
        self.owner = owner
        self.checkpoint_topic = checkpoint_topic
        self._fatal: KafkaError | None = None
        self._producer = Producer({**config, "error_cb": self._on_error})
        try:
            # Aborts whatever an earlier incarnation left open, and fences it out.
            self._producer.init_transactions(timeout)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.fatal():
                raise ProducerFenced(f"publisher of {owner} cannot start: {error}") from exc
            raise KafkaUnavailable(f"cannot start a transactional producer: {error}") from exc
        try:
            with self._fenced_stops():
                self._seal_checkpoint_partitions(timeout)
        except KafkaException as exc:
            raise KafkaUnavailable(f"cannot seal the checkpoint topic: {exc.args[0]}") from exc

    def _seal_checkpoint_partitions(self, timeout: float) -> None:
        """End any transaction of this producer id that a checkpoint partition still
        holds open although the coordinator no longer knows of it.

        `init_transactions()` aborts what the coordinator knows to be open. A broker
        stopping in the middle of a transaction can leave a partition holding records
        of one that the coordinator has forgotten (a hanging transaction): no marker
        will ever end it, and read_committed readers, recovery among them, stop at its
        first offset for every tenant. An aborted transaction of the same producer id
        that touches each partition writes the abort marker that ends it; when nothing
        is open, it only adds a marker that readers skip.
        """
        topic = self._producer.list_topics(self.checkpoint_topic, timeout=timeout).topics.get(
            self.checkpoint_topic
        )
        if topic is None or topic.error is not None or not topic.partitions:
            raise KafkaUnavailable(f"checkpoint topic {self.checkpoint_topic} is not readable")
        self._producer.begin_transaction()
        for partition in topic.partitions:
            self._producer.produce(
                self.checkpoint_topic, key=SEAL_KEY, value=None, partition=partition
            )
        self._producer.flush(timeout)
        self._abort(timeout)

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka's errors of the client itself (not of one message)."""
        if error.fatal():
            self._fatal = error
            log.error("publisher of %s: Kafka producer failed for good: %s", self.owner, error)
        else:
            log.warning("publisher of %s: Kafka client: %s", self.owner, error)

    @contextlib.contextmanager
    def _fenced_stops(self) -> Iterator[None]:
        """A producer that another incarnation fenced (or that hit any other fatal
        error) fails every later call: as a KafkaException, or, raised inside
        confluent-kafka's own callbacks, as a SystemError with or without one as its
        cause. Either way it is ProducerFenced, which stops the publisher cleanly."""
        try:
            yield
        except (KafkaException, SystemError) as exc:
            cause = exc if isinstance(exc, KafkaException) else exc.__cause__
            error = cause.args[0] if isinstance(cause, KafkaException) else self._fatal
            if error is not None and (error.fatal() or error.code() == KafkaError._FENCED):
                raise ProducerFenced(
                    f"publisher of {self.owner} was fenced by a newer one ({error}); stopping"
                ) from exc
            if isinstance(exc, SystemError):
                # No fatal error seen: aborting tells (a fatal producer refuses it).
                self._abort(5.0)
            raise

    def deliver(
        self,
        events: Sequence[PendingEvent],
        *,
        timeout: float,
        before_commit: Callable[[], None] | None = None,
    ) -> BatchResult:
        """One Kafka transaction for the batch and its checkpoint. `before_commit` runs
        just before the commit and may raise to abort it (the publisher checks there
        that it still holds the tenant's lock, so a publisher paused mid-batch while
        another took over does not commit a second copy)."""
        # A batch is one tenant's: its checkpoint is keyed by that tenant, so whichever
        # publisher serves the tenant next finds it.
        tenant = events[0].tenant_id
        if any(e.tenant_id != tenant for e in events):
            raise ValueError("a batch holds the events of one tenant only")
        reports = _Reports()
        with self._fenced_stops():
            self._producer.begin_transaction()
            for event in events:
                _produce(self._producer, event, reports)
            unflushed = self._producer.flush(timeout)
        if unflushed:
            reports.settle_missing(events, f"no delivery report within {timeout:.0f}s")
        if reports.result.failed:
            self._abort(timeout)
            return BatchResult(failed=reports.result.failed)

        checkpoint = _Reports()
        with self._fenced_stops():
            self._producer.produce(
                self.checkpoint_topic,
                key=tenant.encode(),
                value=encode_checkpoint(self.owner, reports.result.delivered),
                on_delivery=checkpoint.callback(0),
            )
        if before_commit is not None:
            try:
                before_commit()
            except BaseException:
                self._abort(timeout)
                raise
        self._commit(timeout)
        if not checkpoint.result.delivered:
            raise FatalError("transaction committed without a report for its checkpoint")
        mark = checkpoint.result.delivered[0]
        reports.result.checkpoint = CheckpointPosition(mark.partition, mark.offset)
        return reports.result

    def dead_letter(
        self, copies: Sequence[tuple[PendingEvent, str]], *, topic: str, timeout: float
    ) -> set[int]:
        """Copy events to the dead-letter topic in a transaction of their own; return the
        row ids Kafka committed (all or none)."""
        with self._fenced_stops():
            self._producer.begin_transaction()
            reports = _produce_dead_letters(self._producer, copies, topic)
            self._producer.flush(timeout)
        if len(reports.result.delivered) < len(copies):
            self._abort(timeout)
            return set()
        self._commit(timeout)
        return {d.id for d in reports.result.delivered}

    def _commit(self, timeout: float) -> None:
        for _ in range(3):
            try:
                self._producer.commit_transaction(timeout)
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.fatal() or error.code() == KafkaError._FENCED:
                    raise ProducerFenced(
                        f"publisher of {self.owner} was fenced by a newer one ({error}); stopping"
                    ) from exc
                if error.txn_requires_abort():
                    self._abort(timeout)
                    raise CommitOutcomeUnknown(f"transaction aborted at commit: {error}") from exc
                if not error.retriable():
                    raise CommitOutcomeUnknown(f"commit failed: {error}") from exc
        raise CommitOutcomeUnknown("commit still failing after 3 tries")

    def _abort(self, timeout: float) -> None:
        try:
            self._producer.abort_transaction(timeout)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.fatal():
                raise ProducerFenced(f"publisher of {self.owner} cannot abort: {error}") from exc
            raise

    def close(self, timeout: float) -> int:
        return int(self._producer.flush(timeout))


def encode_checkpoint(owner: str, delivered: Sequence[Delivered]) -> bytes:
    """The checkpoint record of a batch: which rows it published, and where."""
    rows = [[d.id, d.partition, d.offset] for d in delivered]
    return json.dumps({"owner": owner, "rows": rows}, separators=(",", ":")).encode()


def decode_checkpoint(value: bytes) -> tuple[str, list[Delivered]]:
    record = json.loads(value)
    return str(record["owner"]), [Delivered(int(i), int(p), int(o)) for i, p, o in record["rows"]]
