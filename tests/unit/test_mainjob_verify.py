"""The end-to-end check must catch each fault it claims to catch."""

from devenv.mainjob import Consumed, Enqueued, verify


def _event(row_id: int, key: str = "k1") -> Enqueued:
    return Enqueued(row_id, f"e{row_id}", "acme", "acme.orders", key, row_id)


def _record(event: Enqueued, offset: int, *, partition: int = 0) -> Consumed:
    headers = {"event-id": event.event_id, "tenant-id": event.tenant, "dedupe-key": "d"}
    return Consumed(event.topic, partition, offset, event.key, headers, {}, received_at=1.0)


def _rows(*pairs: tuple[Enqueued, int]) -> dict[str, tuple[str, int | None, int | None]]:
    return {e.event_id: ("sent", 0, offset) for e, offset in pairs}


def test_verify_accepts_every_event_once_in_order() -> None:
    a, b = _event(1), _event(2)

    verdict = verify([a, b], [_record(a, 0), _record(b, 1)], _rows((a, 0), (b, 1)), started_at=0)

    assert verdict.problems == []
    assert verdict.reports[0].published == 2


def test_verify_reports_a_lost_event() -> None:
    a, b = _event(1), _event(2)

    verdict = verify([a, b], [_record(a, 0)], _rows((a, 0), (b, 1)), started_at=0)

    assert any("1 events lost" in p for p in verdict.problems)


def test_verify_reports_a_duplicated_event() -> None:
    a = _event(1)

    verdict = verify([a], [_record(a, 0), _record(a, 1)], _rows((a, 0)), started_at=0)

    assert any("1 events duplicated" in p for p in verdict.problems)


def test_verify_reports_events_reordered_within_a_key() -> None:
    a, b = _event(1), _event(2)

    verdict = verify([a, b], [_record(b, 0), _record(a, 1)], _rows((a, 1), (b, 0)), started_at=0)

    assert any("arrived after" in p for p in verdict.problems)


def test_verify_allows_different_keys_to_interleave() -> None:
    a, b = _event(1, "k1"), _event(2, "k2")

    verdict = verify([a, b], [_record(b, 0), _record(a, 1)], _rows((a, 1), (b, 0)), started_at=0)

    assert verdict.problems == []


def test_verify_reports_a_row_not_marked_sent_at_kafkas_offset() -> None:
    a = _event(1)

    verdict = verify([a], [_record(a, 5)], {a.event_id: ("pending", None, None)}, started_at=0)

    assert any("database says pending" in p for p in verdict.problems)


def test_verify_reports_missing_headers() -> None:
    a = _event(1)
    record = _record(a, 0)
    record.headers.pop("dedupe-key")

    verdict = verify([a], [record], _rows((a, 0)), started_at=0)

    assert any("headers" in p for p in verdict.problems)
