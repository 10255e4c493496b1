import uuid

import pytest

from somabrain.config.errors import UnsafeProducerConfig
from somabrain.config.types import EventId, TenantId
from somabrain.delivery.classify import Verdict
from somabrain.delivery.producer import (
    BatchResult,
    Failed,
    build_config,
    message_headers,
    order_breaks,
)
from somabrain.store.outbox import Delivered, PendingEvent


@pytest.mark.parametrize(
    ("name", "value"),
    [("enable.idempotence", False), ("acks", "1"), ("max.in.flight.requests.per.connection", 10)],
)
def test_build_config_refuses_settings_that_break_delivery(name: str, value: object) -> None:
    with pytest.raises(UnsafeProducerConfig, match=name):
        build_config(
            bootstrap_servers="127.0.0.1:1", delivery_timeout_seconds=5, overrides={name: value}
        )


def test_build_config_keeps_idempotence_and_acks_all() -> None:
    config = build_config(
        bootstrap_servers="127.0.0.1:1",
        delivery_timeout_seconds=5,
        overrides={"linger.ms": 20},
    )

    assert config["enable.idempotence"] is True
    assert config["acks"] == "all"
    assert config["linger.ms"] == 20
    assert config["delivery.timeout.ms"] == 5000


def test_message_headers_identify_every_copy_of_an_event() -> None:
    event_id = uuid.uuid4()
    event = PendingEvent(
        id=1,
        event_id=EventId(event_id),
        tenant_id=TenantId("acme"),
        topic="acme.orders",
        message_key="k",
        dedupe_key="d-1",
        event_type="order.created",
        payload_json=None,
        headers={"traceparent": "00-abc"},
        attempts=0,
    )

    headers = dict(message_headers(event))

    assert headers["tenant-id"] == b"acme"
    assert headers["event-id"] == str(event_id).encode()
    assert headers["dedupe-key"] == b"d-1"
    assert headers["event-type"] == b"order.created"
    assert headers["traceparent"] == b"00-abc"


def _pending(row_id: int, key: str | None) -> PendingEvent:
    return PendingEvent(
        id=row_id,
        event_id=EventId(uuid.uuid4()),
        tenant_id=TenantId("acme"),
        topic="t",
        message_key=key,
        dedupe_key=str(row_id),
        event_type=None,
        payload_json=None,
        headers={},
        attempts=0,
    )


def test_order_breaks_names_keys_whose_later_event_overtook_a_failed_one() -> None:
    events = [_pending(1, "a"), _pending(2, "b"), _pending(3, "a"), _pending(4, None)]
    result = BatchResult(
        delivered=[Delivered(2, 0, 1), Delivered(3, 0, 2), Delivered(4, 0, 3)],
        failed=[Failed(1, "boom", Verdict.RETRIABLE)],
    )

    assert order_breaks(events, result) == ["a"]


def test_order_breaks_is_empty_when_failures_come_last() -> None:
    events = [_pending(1, "a"), _pending(2, "a")]
    result = BatchResult(delivered=[Delivered(1, 0, 1)], failed=[Failed(2, "x", Verdict.RETRIABLE)])

    assert order_breaks(events, result) == []
