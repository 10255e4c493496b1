import pytest

from somabrain.delivery.circuit import CircuitBreaker, CircuitState


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, open_seconds=30, clock=clock)


def test_circuit_opens_after_threshold_consecutive_failures() -> None:
    breaker = _breaker(FakeClock())

    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED
    breaker.record_failure()

    assert breaker.state is CircuitState.OPEN
    assert breaker.allow() is False


def test_success_between_failures_resets_the_count() -> None:
    breaker = _breaker(FakeClock())

    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()

    assert breaker.state is CircuitState.CLOSED


def test_open_circuit_probes_after_the_pause_and_closes_on_success() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.record_failure()

    clock.now = 29.9
    assert breaker.allow() is False
    assert breaker.seconds_until_probe() == pytest.approx(0.1)
    clock.now = 30.0
    assert breaker.allow() is True
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.record_success()

    assert breaker.state is CircuitState.CLOSED
    assert breaker.allow() is True


def test_failed_probe_reopens_for_a_full_pause() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    for _ in range(3):
        breaker.record_failure()
    clock.now = 31
    assert breaker.allow()

    breaker.record_failure()

    assert breaker.state is CircuitState.OPEN
    clock.now = 60
    assert breaker.allow() is False
    clock.now = 61
    assert breaker.allow() is True
