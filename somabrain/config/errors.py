"""The error taxonomy: every failure is retriable, permanent or fatal, decided here.

- retriable: the same operation may succeed later (broker unreachable, lock busy);
  callers back off and try again.
- permanent: this input will never succeed (invalid tenant id, payload too large);
  callers refuse it with the message, which names the value, the limit and the fix.
- fatal: the process cannot go on safely (unsafe producer configuration, schema behind);
  it stops with the message.
"""

from __future__ import annotations


class SomabrainError(Exception):
    """Base of every error this package raises on purpose."""

    retriable: bool = False
    fatal: bool = False


class RetriableError(SomabrainError):
    """The operation may succeed if tried again later."""

    retriable = True


class PermanentError(SomabrainError):
    """The input can never succeed; retrying is pointless."""


class FatalError(SomabrainError):
    """The process must stop; continuing could lose or duplicate events."""

    fatal = True


class InvalidTenantId(PermanentError):
    """A tenant id does not have the required format."""

    def __init__(self, value: str) -> None:
        super().__init__(
            f"invalid tenant id {value!r}: use 1-40 lowercase letters, digits or '-', "
            "starting with a letter and not ending with '-'"
        )
        self.value = value


class InvalidEvent(PermanentError):
    """An event is refused at enqueue; nothing was written."""


class EventEncodingError(InvalidEvent):
    """A payload holds a value the canonical JSON encoder refuses."""


class EventTooLarge(InvalidEvent):
    """The encoded message would exceed the broker's message size limit."""

    def __init__(self, *, size: int, limit: int) -> None:
        super().__init__(
            f"encoded event is {size} bytes, over the limit of {limit} bytes "
            "(SOMABRAIN_MAX_MESSAGE_BYTES); split the payload or store it elsewhere "
            "and enqueue a reference"
        )
        self.size = size
        self.limit = limit


class BacklogOverCap(RetriableError):
    """Enqueue refused: the tenant's pending backlog is at its cap. Nothing was written;
    the caller may retry once the publisher has caught up."""

    def __init__(self, *, tenant: str, backlog: int, cap: int, adding: int = 1) -> None:
        super().__init__(
            f"tenant {tenant} has {backlog:,} pending events and its cap is {cap:,}; "
            f"refusing {adding:,} more (nothing was written). Its publisher must catch up "
            "(is one running? see somabrain_publisher_active) or the cap be raised "
            "(max_pending)"
        )
        self.tenant = tenant
        self.backlog = backlog
        self.cap = cap
        self.adding = adding


class InvalidSelection(PermanentError):
    """An operator's selection of events is refused (a state that cannot be replayed, a
    time without a time zone, options that contradict each other); nothing was read or
    changed."""


class InvalidTenantConfig(PermanentError):
    """The per-tenant configuration file cannot be read or does not validate."""


class UnsafeProducerConfig(FatalError):
    """A producer setting would break the delivery guarantees."""
