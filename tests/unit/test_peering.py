"""Which peer acts: Kopf's rule, read from the peering object's status, for the
operator's background loop (case K-7)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from somabrain_operator.__main__ import main
from somabrain_operator.peering import MAX_RANDOM_PRIORITY, Peering, random_priority

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
ME = Peering(name="somabrain-operator", priority=100, identity="pod-a/7/abc")


def _peer(priority: int, *, seen_ago: float = 5, lifetime: int = 60) -> dict[str, Any]:
    seen = NOW - dt.timedelta(seconds=seen_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_a_peer_alone_acts() -> None:
    assert ME.acting({ME.identity: _peer(100)}, NOW)


def test_a_peer_not_yet_recorded_stands_by() -> None:
    # Kopf starts a peering operator paused until it has joined.
    assert not ME.acting({}, NOW)
    assert not ME.acting(None, NOW)
    assert not ME.acting({"pod-b/9/def": _peer(1)}, NOW)


def test_a_live_peer_of_higher_priority_makes_it_stand_by() -> None:
    assert not ME.acting({ME.identity: _peer(100), "pod-b/9/def": _peer(200)}, NOW)


def test_a_live_peer_of_equal_priority_makes_both_stand_by() -> None:
    assert not ME.acting({ME.identity: _peer(100), "pod-b/9/def": _peer(100)}, NOW)


def test_lower_priorities_and_expired_peers_do_not_count() -> None:
    peers = {
        ME.identity: _peer(100),
        "pod-b/9/def": _peer(99),
        "pod-c/3/ghi": _peer(500, seen_ago=61, lifetime=60),
        # A peer that stopped cleanly writes a lifetime of 0.
        "pod-d/4/jkl": _peer(500, seen_ago=0.5, lifetime=0),
    }

    assert ME.acting(peers, NOW)


def test_its_own_expired_record_makes_it_stand_by() -> None:
    assert not ME.acting({ME.identity: _peer(100, seen_ago=120)}, NOW)


@pytest.mark.parametrize(
    "record",
    [{"priority": 500}, {"priority": 500, "lastseen": "yesterday"}, "garbage"],
    ids=["no-lastseen", "bad-lastseen", "not-a-mapping"],
)
def test_unreadable_records_of_others_do_not_count(record: Any) -> None:
    assert ME.acting({ME.identity: _peer(100), "pod-b/9/def": record}, NOW)


def test_drawn_priorities_are_positive_and_spread() -> None:
    drawn = {random_priority() for _ in range(50)}

    assert all(1 <= p <= MAX_RANDOM_PRIORITY for p in drawn)
    assert len(drawn) == 50


def test_a_priority_without_peering_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--priority", "5"])

    assert exited.value.code == 2
    assert "--priority needs --peering" in capsys.readouterr().err
