"""What a Kafka error means for one event: the only place that decides it.

- `PERMANENT`: this event can never be accepted as it is (too large, invalid topic,
  not authorised); it goes dead at once with the error as its reason.
- `RETRIABLE`: it may succeed later (timeouts, unreachable brokers, leaders moving);
  the event backs off and counts an attempt.
- `COLLATERAL`: the event was not at fault; it was purged because another message of
  its transaction failed or the producer is closing. It is retried without an attempt.
"""

from __future__ import annotations

import enum

from confluent_kafka import KafkaError


class Verdict(enum.Enum):
    PERMANENT = "permanent"
    RETRIABLE = "retriable"
    COLLATERAL = "collateral"


_PERMANENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.INVALID_REQUIRED_ACKS,
    }
)
_COLLATERAL = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})


def classify(error: KafkaError) -> Verdict:
    """The verdict for an event whose delivery failed with `error`."""
    code = error.code()
    if code in _COLLATERAL:
        return Verdict.COLLATERAL
    if code in _PERMANENT:
        return Verdict.PERMANENT
    return Verdict.RETRIABLE
