"""A circuit breaker per tenant: stop hammering Kafka for a tenant whose batches keep
failing, and probe again after a pause.

closed --(threshold consecutive failed batches)--> open --(open_seconds)--> half-open
half-open --(probe batch delivered)--> closed;  half-open --(probe failed)--> open

Only the tenant's own publishing pauses; other tenants never see its circuit. A success
always closes the circuit, so a breaker can never stay open once Kafka accepts the
tenant's events again.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class CircuitState(enum.IntEnum):
    """Values are those of the `somabrain_circuit_state` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.clock = clock
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.opened_at = 0.0

    def allow(self) -> bool:
        """Whether the tenant may publish now; moves open to half-open when the pause ends."""
        if self.state is CircuitState.OPEN:
            if self.clock() - self.opened_at < self.open_seconds:
                return False
            self.state = CircuitState.HALF_OPEN
        return True

    def seconds_until_probe(self) -> float:
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self.open_seconds - (self.clock() - self.opened_at))

    def record_success(self) -> None:
        self.state = CircuitState.CLOSED
        self.failures = 0

    def record_failure(self) -> None:
        self.failures += 1
        if self.state is CircuitState.HALF_OPEN or self.failures >= self.failure_threshold:
            self.state = CircuitState.OPEN
            self.opened_at = self.clock()
