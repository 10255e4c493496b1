"""Fair turns and token buckets: the pure parts of shared-mode scheduling."""

from __future__ import annotations

import pytest

from somabrain.delivery.scheduling import Quota, RoundRobin, TokenBucket, bucket_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_round_robin_gives_every_able_member_a_turn_before_any_gets_a_second() -> None:
    turns = RoundRobin(["a", "b", "c", "d"])
    able = {"a", "c", "d"}

    taken = [turns.next(lambda m: m in able) for _ in range(6)]

    assert taken == ["a", "c", "d", "a", "c", "d"]


def test_a_flooding_member_does_not_delay_another_beyond_one_rotation() -> None:
    # "flood" always has work; "small" gets one event after a while. It must be served
    # within one turn of every other member, however many turns the flood has had.
    turns = RoundRobin(["flood", "small", "idle"])
    small_has_work = False
    served: list[str] = []
    for step in range(10_000):
        if step == 7_777:
            small_has_work = True
        able = {"flood", "small"} if small_has_work else {"flood"}
        member = turns.next(able.__contains__)
        assert member is not None
        served.append(member)
        if member == "small":
            small_has_work = False

    assert served.index("small") - 7_777 <= 1


def test_round_robin_returns_none_when_no_member_is_able() -> None:
    assert RoundRobin(["a", "b"]).next(lambda m: False) is None
    assert RoundRobin([]).next(lambda m: True) is None


def test_round_robin_keeps_its_place_when_a_member_is_skipped() -> None:
    turns = RoundRobin(["a", "b", "c"])
    assert turns.next(lambda m: True) == "a"
    assert turns.next(lambda m: m != "b") == "c"
    assert turns.next(lambda m: True) == "a"


def test_token_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, capacity=20, clock=clock)
    assert bucket.available() == 20

    bucket.take(20)
    assert bucket.available() == 0
    assert bucket.seconds_until(5) == pytest.approx(0.5)

    clock.now += 0.5
    assert bucket.available() == 5
    clock.now += 60
    assert bucket.available() == 20


def test_token_bucket_limits_a_long_run_to_its_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100, capacity=100, clock=clock)
    published = 0
    for _ in range(1000):  # ten seconds in steps of 10 ms, taking all that is allowed
        grant = bucket.available()
        bucket.take(grant)
        published += grant
        clock.now += 0.01

    # One second's burst, then the rate: never more.
    assert published <= 100 + 100 * 10
    assert published >= 100 * 10 - 1


def test_token_bucket_refuses_a_rate_that_could_never_publish() -> None:
    with pytest.raises(ValueError, match="positive rate"):
        TokenBucket(rate=0, capacity=10)


def test_quota_batch_is_capped_by_in_flight_limit() -> None:
    assert Quota(batch_size=500, max_in_flight=50).batch_limit() == 50
    assert Quota(batch_size=20, max_in_flight=50).batch_limit() == 20


def test_unlimited_quota_has_no_bucket_and_a_limited_one_holds_a_batch() -> None:
    assert bucket_for(Quota(batch_size=10, max_in_flight=10)) is None
    bucket = bucket_for(Quota(batch_size=500, max_in_flight=500, events_per_second=5))
    assert bucket is not None
    assert bucket.capacity == 500
