"""How enqueue_events splits a batch into INSERT statements."""

from __future__ import annotations

import pytest

from somabrain.store import outbox


def _rows(*payload_sizes: int) -> list[outbox.ValidatedEvent]:
    return [
        outbox.ValidatedEvent("t", "t.b", None, f"d{i}", None, None if n < 0 else "x" * n, {})
        for i, n in enumerate(payload_sizes)
    ]


@pytest.mark.parametrize(
    ("count", "sizes"),
    [(0, []), (1, [1]), (1000, [1000]), (1001, [1000, 1]), (2500, [1000, 1000, 500])],
)
def test_statements_hold_at_most_1000_rows(count: int, sizes: list[int]) -> None:
    chunks = list(outbox._statement_chunks(_rows(*[10] * count)))

    assert [len(c) for c in chunks] == sizes
    assert [r for c in chunks for r in c] == _rows(*[10] * count)


def test_statements_hold_a_bounded_payload_size_and_a_large_event_goes_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbox, "_STATEMENT_PAYLOAD_CHARS", 100)

    chunks = list(outbox._statement_chunks(_rows(40, 60, 1, 500, -1, 99, 2)))

    assert [[len(r.payload or "") for r in c] for c in chunks] == [
        [40, 60],
        [1],
        [500],
        [0, 99],
        [2],
    ]
