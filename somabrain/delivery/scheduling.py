"""Which tenant a publisher serves next, and how much of it: fair turns and quotas.

A publisher serving several tenants (shared mode) takes them in turns, round-robin,
one batch per turn. A tenant is passed over while it has nothing due, while its circuit
is open, or while its events/s quota has no tokens left; it never loses its place in
the rotation. So a tenant with one event waits at most one turn of every other tenant
that has work: the bound depends on the number of busy tenants and the batch size, never
on how large another tenant's backlog is.

Quotas per tenant:
- `events_per_second`: a token bucket refilled at that rate, holding at most one
  second's worth (or one batch, if larger); a batch never takes more events than there
  are tokens. None means unlimited.
- `batch_size`: the most rows one turn claims.
- `max_in_flight`: the most rows claimed and not yet settled at once. Batches are
  settled before the next one starts, so this caps the batch as well.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar


@dataclasses.dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's limits; see the module docstring."""

    batch_size: int
    max_in_flight: int
    events_per_second: float | None = None

    def batch_limit(self) -> int:
        return max(1, min(self.batch_size, self.max_in_flight))


class TokenBucket:
    """Events a tenant may publish now, refilled continuously at `rate` per second."""

    def __init__(
        self, *, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("a token bucket needs a positive rate and room for one event")
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.tokens = capacity
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def available(self) -> int:
        """Whole events that may be published now."""
        self._refill()
        return int(self.tokens)

    def take(self, events: int) -> None:
        self._refill()
        self.tokens -= events

    def seconds_until(self, events: int = 1) -> float:
        """How long until `events` tokens are there (0 if they are now)."""
        self._refill()
        return max(0.0, (events - self.tokens) / self.rate)


def bucket_for(quota: Quota, clock: Callable[[], float] = time.monotonic) -> TokenBucket | None:
    if quota.events_per_second is None:
        return None
    capacity = max(quota.events_per_second, float(quota.batch_limit()), 1.0)
    return TokenBucket(rate=quota.events_per_second, capacity=capacity, clock=clock)


T = TypeVar("T")


class RoundRobin(Generic[T]):
    """Hands out turns in a fixed rotation, skipping members that cannot take one.

    The rotation resumes after the member that had the last turn, so every member that
    is able gets a turn before any member gets a second one.
    """

    def __init__(self, members: Sequence[T]) -> None:
        self.members = list(members)
        self.position = 0

    def next(self, able: Callable[[T], bool]) -> T | None:
        """The next member able to take a turn, or None if none is."""
        count = len(self.members)
        for step in range(count):
            index = (self.position + step) % count
            member = self.members[index]
            if able(member):
                self.position = (index + 1) % count
                return member
        return None

    def replace(self, members: Sequence[T]) -> None:
        """Change the members; the rotation restarts at the first one."""
        self.members = list(members)
        self.position = 0
