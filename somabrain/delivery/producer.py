"""The Kafka side of delivery: an idempotent producer and per-batch confirmation.

Guarantees: `deliver` returns, for each event, either Kafka's partition and offset or
the error Kafka reported; an event counts as delivered only from its delivery report,
never because `produce()` returned. Idempotence (`enable.idempotence`, `acks=all`,
at most 5 requests in flight) is enforced at start-up: a configuration that would allow
duplicates or reordering by retries is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from somabrain.config.errors import UnsafeProducerConfig
from somabrain.store.codec import reencode_stored
from somabrain.store.outbox import Delivered, PendingEvent

log = logging.getLogger(__name__)

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
    retriable: bool


def build_config(
    *, bootstrap_servers: str, delivery_timeout_seconds: float, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """Producer configuration with the delivery-safety settings locked in."""
    for name, safe in SAFE_SETTINGS.items():
        if name in overrides and str(overrides[name]).lower() != str(safe).lower():
            raise UnsafeProducerConfig(
                f"producer setting {name}={overrides[name]!r} would allow lost, duplicated or "
                f"reordered events; remove it (the publisher always uses {name}={safe!r})"
            )
    return {
        "bootstrap.servers": bootstrap_servers,
        "linger.ms": 5,
        "delivery.timeout.ms": int(delivery_timeout_seconds * 1000),
        **overrides,
        **SAFE_SETTINGS,
    }


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


class KafkaDelivery:
    """Produces a batch of events and waits for every delivery report."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._producer = Producer(dict(config))

    def deliver(
        self, events: Sequence[PendingEvent], *, timeout: float
    ) -> tuple[list[Delivered], list[Failed]]:
        delivered: list[Delivered] = []
        failed: list[Failed] = []

        def report(row_id: int) -> Any:
            def on_delivery(err: KafkaError | None, msg: Message | None) -> None:
                if err is not None:
                    failed.append(Failed(row_id, str(err), err.retriable()))
                    return
                partition = None if msg is None else msg.partition()
                offset = None if msg is None else msg.offset()
                if partition is None or offset is None:
                    failed.append(Failed(row_id, "delivery report without an offset", True))
                else:
                    delivered.append(Delivered(row_id, partition, offset))

            return on_delivery

        for event in events:
            self._produce(event, report(event.id))
        remaining = self._producer.flush(timeout)
        if remaining:
            # Reports still owed after the timeout: those events are not confirmed.
            settled = {d.id for d in delivered} | {f.id for f in failed}
            failed.extend(
                Failed(e.id, f"no delivery report within {timeout:.0f}s", True)
                for e in events
                if e.id not in settled
            )
        return delivered, failed

    def _produce(self, event: PendingEvent, callback: Any) -> None:
        while True:
            try:
                self._producer.produce(
                    event.topic,
                    key=None if event.message_key is None else event.message_key.encode(),
                    value=reencode_stored(event.payload_json),
                    headers=message_headers(event),
                    on_delivery=callback,
                )
                return
            except BufferError:
                # The local queue is full: serve delivery reports to make room.
                self._producer.poll(0.1)
            except KafkaException as exc:
                callback(exc.args[0], None)
                return

    def close(self, timeout: float) -> int:
        """Wait for outstanding reports; return how many messages were still unconfirmed."""
        return int(self._producer.flush(timeout))
