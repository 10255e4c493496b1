"""Every SQL statement on the outbox table.

Guarantees:
- `enqueue_event` writes inside the caller's transaction: the event exists exactly when
  the caller's business data does. A repeated `(tenant_id, dedupe_key)` is reported as
  a duplicate and never raises, even when two transactions race, so it cannot abort the
  caller's transaction.
- Pending rows are claimed in id order; ids are assigned by the database.
- A row becomes `sent` only through `mark_sent`, which requires Kafka's partition and
  offset; nothing else in the package sets that status.
- Rows other than sent ones are deleted only by `delete_tenant_events`, for a tenant
  removed on purpose.

Limits: one publisher per tenant is assumed to call `claim_pending` (the publisher holds
the tenant's advisory lock); claiming takes no row locks.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql import Executable

from somabrain.config.errors import BacklogOverCap, EventTooLarge, InvalidEvent, InvalidTenantId
from somabrain.config.settings import Settings, reserved_topic
from somabrain.config.types import EventId, TenantId, parse_tenant_id
from somabrain.store.codec import check_encodable, encode_payload, refuse_nul, validate_headers
from somabrain.store.models import EventStatus, OutboxEvent, OutboxTenant, PublisherCheckpoint

NOTIFY_CHANNEL = "somabrain_outbox"
# Set by the publisher on every message; callers may not set them (no spoofed ids).
RESERVED_HEADERS = frozenset(
    {
        "tenant-id",
        "event-id",
        "dedupe-key",
        "content-type",
        "event-type",
        # set on dead-letter copies
        "dead-reason",
        "original-topic",
    }
)
OUTBOX: Table = OutboxEvent.__table__  # type: ignore[assignment]
_NOTIFIED = "somabrain.notified"

# Room Kafka adds around key, value and headers in a record batch holding one record.
_RECORD_OVERHEAD_BYTES = 128
# What the publisher adds to every message, counted at its longest (tenant id, event id,
# dedupe key, content type), so an event accepted here is never refused for its size.
_PUBLISHER_HEADER_BYTES = sum(len(name) for name in RESERVED_HEADERS) + 40 + 36 + 200 + 16


class EnqueueStatus(enum.StrEnum):
    ENQUEUED = "enqueued"
    DUPLICATE = "duplicate"
    # The database was unreachable: the event is in the local journal, fsynced, and
    # goes to the outbox when the journal is migrated (`emit_event` only).
    JOURNALED = "journaled"


@dataclasses.dataclass(frozen=True, slots=True)
class EnqueueResult:
    """What `enqueue_event` did. `event_id` is None for a duplicate, and for an event
    journaled (it gets one when migrated)."""

    status: EnqueueStatus
    event_id: EventId | None
    tenant_id: TenantId
    dedupe_key: str


@dataclasses.dataclass(frozen=True, slots=True)
class PendingEvent:
    """A claimed row, with its payload already in the bytes that go to Kafka."""

    id: int
    event_id: EventId
    tenant_id: TenantId
    topic: str
    message_key: str | None
    dedupe_key: str
    event_type: str | None
    payload_json: str | None
    headers: dict[str, str]
    attempts: int
    # Handed to Kafka before without a confirmed outcome (at-least-once mode only).
    dispatched: bool = False


def enqueue_event(
    session: Session,
    *,
    tenant_id: str,
    topic: str,
    payload: Any,
    key: str | None = None,
    dedupe_key: str | None = None,
    event_type: str | None = None,
    headers: Mapping[str, str] | None = None,
    max_message_bytes: int | None = None,
) -> EnqueueResult:
    """Add one event to the outbox inside the caller's transaction.

    `payload=None` enqueues a tombstone (key with a null value). Without `dedupe_key`
    the event gets a fresh one, so it is never a duplicate. Every argument is checked
    before anything is written: a bad tenant id, topic, key, payload or header, or a
    message over `max_message_bytes` (default: SOMABRAIN_MAX_MESSAGE_BYTES) raises
    InvalidEvent and leaves the caller's transaction untouched. So does a tenant whose
    pending backlog is at its cap: BacklogOverCap names the tenant, backlog and cap.

    A repeated dedupe key returns DUPLICATE without error under READ COMMITTED (the
    default isolation). Under REPEATABLE READ or SERIALIZABLE, PostgreSQL reports a
    dedupe key inserted by a concurrent transaction as a serialization failure, which
    the caller retries like any other in those levels.
    """
    event = NewEvent(
        tenant_id=tenant_id,
        topic=topic,
        payload=payload,
        key=key,
        dedupe_key=dedupe_key,
        event_type=event_type,
        headers=headers,
    )
    return enqueue_events(session, [event], max_message_bytes=max_message_bytes)[0]


@dataclasses.dataclass(frozen=True, slots=True)
class NewEvent:
    """One event for `enqueue_events`; the fields mean what `enqueue_event`'s do."""

    tenant_id: str
    topic: str
    payload: Any
    key: str | None = None
    dedupe_key: str | None = None
    event_type: str | None = None
    headers: Mapping[str, str] | None = None


def enqueue_events(
    session: Session, events: Sequence[NewEvent], *, max_message_bytes: int | None = None
) -> list[EnqueueResult]:
    """Add many events in the caller's transaction, up to 1,000 per INSERT.

    All or nothing at validation: if any event is invalid, the error `enqueue_event`
    would raise for it (InvalidEvent or one of its kinds, or InvalidTenantId) names its
    position in `events`, and nothing is written; if a tenant's backlog would go over
    its cap, BacklogOverCap says so and nothing is written. Results come back in the
    order of `events`; a dedupe key repeated within the batch, or already in the outbox,
    is a DUPLICATE. Rows get their ids in the order of `events`.
    """
    return enqueue_validated(session, validate_events(events, max_message_bytes))


def validate_events(
    events: Sequence[NewEvent], max_message_bytes: int | None = None
) -> list[ValidatedEvent]:
    """Check and encode events as `enqueue_events` does, writing nothing; the error of
    the first invalid one names its position when there are several."""
    limit = max_message_bytes if max_message_bytes is not None else _default_max_bytes()
    rows: list[ValidatedEvent] = []
    for position, event in enumerate(events):
        try:
            rows.append(validate_event(event, limit))
        except (InvalidEvent, InvalidTenantId) as exc:
            if len(events) > 1:
                # The same error, so callers still tell its kind (EventTooLarge, ...)
                # and read its fields, with the event's position in its message.
                exc.args = (f"event {position}: {exc}",)
            raise
    return rows


def enqueue_validated(session: Session, rows: Sequence[ValidatedEvent]) -> list[EnqueueResult]:
    """Insert events `validate_events` checked (now or earlier: the local journal keeps
    them in this form) in the caller's transaction, with the backlog cap checked."""
    check_backlogs(session, rows)

    inserted: dict[tuple[str, str], uuid.UUID] = {}
    for chunk in _statement_chunks(rows):
        if len(chunk) == 1:
            returned = session.execute(_INSERT_ONE, chunk[0]._asdict())
        else:
            # Many rows travel as one JSON array parameter, unpacked by the database:
            # one short statement to parse and one value to send, whatever the count.
            text_rows = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
            returned = session.execute(_INSERT_ROWS, {"rows": text_rows})
        for tenant, dedupe, event_id in returned:
            inserted[(tenant, dedupe)] = event_id

    results: list[EnqueueResult] = []
    for row in rows:
        tenant, dedupe = TenantId(row.tenant_id), row.dedupe_key
        event_id = inserted.pop((tenant, dedupe), None)
        status = EnqueueStatus.DUPLICATE if event_id is None else EnqueueStatus.ENQUEUED
        results.append(
            EnqueueResult(status, None if event_id is None else EventId(event_id), tenant, dedupe)
        )
    for tenant in dict.fromkeys(r.tenant_id for r in results if r.event_id is not None):
        _notify_once(session, tenant)
    return results


class ValidatedEvent(NamedTuple):
    """An event checked and encoded for the outbox, as one row of the INSERT's JSON
    array (a tuple is a JSON array)."""

    tenant_id: str
    topic: str
    message_key: str | None
    dedupe_key: str
    event_type: str | None
    payload: str | None  # canonical JSON text; None is a tombstone
    headers: dict[str, str]


def validate_event(event: NewEvent, limit: int) -> ValidatedEvent:
    """One event checked and encoded, or InvalidEvent / InvalidTenantId."""
    tenant = parse_tenant_id(event.tenant_id) if isinstance(event.tenant_id, str) else None
    if tenant is None:
        raise InvalidEvent(f"tenant_id must be a string, got {type(event.tenant_id).__name__}")
    _check_topic(event.topic)
    dedupe = event.dedupe_key if event.dedupe_key is not None else uuid.uuid4().hex
    _check_text("key", event.key, max_length=None)
    _check_text("dedupe_key", dedupe, max_length=200, required=True)
    _check_text("event_type", event.event_type, max_length=200)
    encoded = None if event.payload is None else encode_payload(event.payload)
    clean_headers = validate_headers(event.headers)
    reserved = sorted(RESERVED_HEADERS.intersection(clean_headers))
    if reserved:
        raise InvalidEvent(
            f"headers {reserved} are set by the publisher on every message; use other names"
        )
    _check_size(encoded, event.key, event.event_type, clean_headers, limit)
    return ValidatedEvent(
        tenant, event.topic, event.key, dedupe, event.event_type, encoded, clean_headers
    )


# Rows per INSERT, and payload characters per INSERT (so a chunk of large events stays
# far below the 1 GB a statement and the 256 MB a jsonb value may hold); a single
# event over the second limit goes alone.
_STATEMENT_ROWS = 1000
_STATEMENT_PAYLOAD_CHARS = 16 * 1024 * 1024


def _statement_chunks(rows: Sequence[ValidatedEvent]) -> Iterator[Sequence[ValidatedEvent]]:
    start, size = 0, 0
    for end, row in enumerate(rows):
        length = len(row.payload or "")
        if end > start and (
            end - start == _STATEMENT_ROWS or size + length > _STATEMENT_PAYLOAD_CHARS
        ):
            yield rows[start:end]
            start, size = end, 0
        size += length
    if start < len(rows):
        yield rows[start:]


_INSERT_ONE = (
    insert(OUTBOX)
    .values(
        tenant_id=bindparam("tenant_id"),
        topic=bindparam("topic"),
        message_key=bindparam("message_key"),
        dedupe_key=bindparam("dedupe_key"),
        event_type=bindparam("event_type"),
        # The payload arrives as canonical JSON text; PostgreSQL parses it, once.
        payload=cast(bindparam("payload", type_=Text), JSONB),
        headers=bindparam("headers", type_=JSONB),
    )
    .on_conflict_do_nothing(index_elements=["tenant_id", "dedupe_key"])
    .returning(OUTBOX.c.tenant_id, OUTBOX.c.dedupe_key, OUTBOX.c.event_id)
)

# The same for many rows (for one, the statement above costs the database less).
# Element i of each array is field i of ValidatedEvent. Ids are assigned in array order (ORDER BY
# the ordinality), so a batch keeps its order per key; a dedupe key repeated within the
# array inserts its first row only. The payload is cast from its canonical text, as
# enqueue always stored it; a tombstone's null element becomes SQL NULL.
_INSERT_ROWS = (
    text(
        "INSERT INTO outbox_events"
        " (tenant_id, topic, message_key, dedupe_key, event_type, payload, headers)"
        " SELECT r->>0, r->>1, r->>2, r->>3, r->>4, CAST(r->>5 AS jsonb), r->6"
        " FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS a(r, n)"
        " ORDER BY n"
        " ON CONFLICT (tenant_id, dedupe_key) DO NOTHING"
        " RETURNING tenant_id, dedupe_key, event_id"
    )
    .bindparams(bindparam("rows", type_=Text))
    .columns(OUTBOX.c.tenant_id, OUTBOX.c.dedupe_key, OUTBOX.c.event_id)
)


@functools.cache
def _default_max_bytes() -> int:
    # Read once per process: settings do not change under a running application.
    return Settings().max_message_bytes


@functools.cache
def _default_max_pending() -> int | None:
    return Settings().max_pending


# A publisher reports its tenants' backlog every few seconds; a report older than this
# means no publisher is active, and enqueue counts the backlog itself (bounded by the
# cap, and at most once per interval per tenant and process).
REPORT_FRESH_SECONDS = 30.0
_COUNT_REUSE_SECONDS = 5.0
_counted: dict[tuple[str, str], tuple[float, int]] = {}


def check_backlogs(session: Session, rows: Sequence[ValidatedEvent]) -> None:
    """check_backlog for each tenant of `rows`, with as many events as it has there."""
    adding = collections.Counter(row.tenant_id for row in rows)
    for tenant, count in adding.items():
        check_backlog(session, tenant, adding=count)


def check_backlog(session: Session, tenant_id: str, *, adding: int = 1) -> None:
    """Raise BacklogOverCap if `adding` more events would take the tenant's pending
    backlog over its cap.

    The cap is the one the tenant's publisher recorded in `outbox_tenants`, else
    SOMABRAIN_MAX_PENDING. The backlog is the publisher's latest count (a few seconds
    old at most), so a burst may overshoot the cap by what arrives between two counts.
    """
    report = session.execute(
        select(
            OutboxTenant.max_pending,
            OutboxTenant.pending,
            func.extract("epoch", func.now() - OutboxTenant.counted_at),
        ).where(OutboxTenant.tenant_id == tenant_id)
    ).one_or_none()
    cap = report[0] if report is not None and report[0] is not None else _default_max_pending()
    if cap is None:
        return
    if report is not None and report[2] is not None and report[2] <= REPORT_FRESH_SECONDS:
        backlog = int(report[1])
    else:
        backlog = _count_pending_up_to(session, tenant_id, cap)
    if backlog + adding > cap:
        raise BacklogOverCap(tenant=tenant_id, backlog=backlog, cap=cap, adding=adding)


def _count_pending_up_to(session: Session, tenant_id: str, cap: int) -> int:
    bind = session.get_bind()
    key = (str(bind.engine.url), tenant_id)
    cached = _counted.get(key)
    if cached is not None and time.monotonic() - cached[0] < _COUNT_REUSE_SECONDS:
        return cached[1]
    count = count_pending(session, tenant_id, up_to=cap + 1)
    _counted[key] = (time.monotonic(), count)
    return count


def cap_and_backlog(session: Session, tenant_id: str) -> tuple[int, int] | None:
    """The tenant's backlog cap and its pending events now, counted from its rows (up
    to one past the cap); None when it has no cap."""
    cap = session.execute(
        select(OutboxTenant.max_pending).where(OutboxTenant.tenant_id == tenant_id)
    ).scalar_one_or_none()
    if cap is None:
        cap = _default_max_pending()
    if cap is None:
        return None
    return cap, count_pending(session, tenant_id, up_to=cap + 1)


def count_pending(session: Session, tenant_id: str, *, up_to: int) -> int:
    """The tenant's pending events now, counted up to `up_to` (an index range scan
    that stops there)."""
    pending = (
        select(literal(1))
        .where(OutboxEvent.tenant_id == tenant_id, OutboxEvent.status == EventStatus.PENDING.value)
        .limit(up_to)
        .subquery()
    )
    return int(session.execute(select(func.count()).select_from(pending)).scalar_one())


_REPORTED = (
    "pending",
    "oldest_pending_at",
    "max_pending",
    "counted_at",
    "circuit",
    "publisher",
    "publisher_seen_at",
)


def report_tenant(
    session: Session,
    *,
    tenant_id: str,
    pending: int,
    max_pending: int | None,
    publisher: str,
    oldest_pending_age: float = 0.0,
    circuit: str | None = None,
) -> None:
    """Record what the tenant's active publisher knows: backlog, cap, circuit, identity."""
    report = TenantState(
        tenant_id=TenantId(tenant_id),
        pending=pending,
        max_pending=max_pending,
        oldest_pending_age=oldest_pending_age,
        circuit=circuit,
    )
    report_tenants(session, [report], publisher=publisher)


@dataclasses.dataclass(frozen=True, slots=True)
class TenantState:
    """What a publisher records about one tenant it serves (see `report_tenants`)."""

    tenant_id: TenantId
    pending: int
    max_pending: int | None
    oldest_pending_age: float = 0.0  # seconds; ignored when nothing is pending
    circuit: str | None = None


def report_tenants(session: Session, reports: Sequence[TenantState], *, publisher: str) -> None:
    """Record, for each tenant of `reports`, what its active publisher knows, in one
    statement whatever their number.

    A shared publisher reports every tenant that is due at once: reported one per turn,
    a large pool's later members waited for the earlier ones and, idle, never came.
    Rows are written in tenant order, so two writers of overlapping sets cannot
    deadlock on them; a tenant given twice keeps its last report.
    """
    by_tenant = {report.tenant_id: report for report in reports}
    if not by_tenant:
        return
    rows = list(by_tenant.values())
    session.execute(
        _REPORT_ROWS,
        {
            "tenants": [r.tenant_id for r in rows],
            "pending": [r.pending for r in rows],
            "ages": [r.oldest_pending_age for r in rows],
            "caps": [r.max_pending for r in rows],
            "circuits": [r.circuit for r in rows],
            "publisher": publisher,
        },
    )


# Element i of each array is tenant i's report; now() is the transaction's, the same for
# every row, and is when the backlog was counted (in the same transaction, see the
# publisher's `_report`). The oldest pending event's time is kept as a timestamp, so its
# age keeps growing between two reports.
_REPORT_ROWS = text(
    "INSERT INTO outbox_tenants"
    " (tenant_id, pending, oldest_pending_at, max_pending, counted_at, circuit,"
    " publisher, publisher_seen_at)"
    " SELECT r.tenant_id, r.pending,"
    " CASE WHEN r.pending = 0 THEN NULL ELSE now() - make_interval(secs => r.age) END,"
    " r.max_pending, now(), r.circuit, :publisher, now()"
    " FROM unnest(CAST(:tenants AS text[]), CAST(:pending AS bigint[]),"
    " CAST(:ages AS float8[]), CAST(:caps AS bigint[]), CAST(:circuits AS text[]))"
    " AS r(tenant_id, pending, age, max_pending, circuit)"
    " ORDER BY r.tenant_id"
    " ON CONFLICT (tenant_id) DO UPDATE SET "
    + ", ".join(f"{column} = EXCLUDED.{column}" for column in _REPORTED)
)


def _check_text(
    name: str, value: object, *, max_length: int | None, required: bool = False
) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str):
        raise InvalidEvent(f"{name} must be a string, got {type(value).__name__}")
    if required and not value:
        raise InvalidEvent(f"{name} must not be empty")
    if max_length is not None and len(value) > max_length:
        raise InvalidEvent(f"{name} is {len(value)} characters; the limit is {max_length}")
    refuse_nul(name, value)
    check_encodable(name, value)


def wake_publisher(session: Session, tenant: TenantId) -> None:
    """Tell the tenant's publisher, at commit, that it has events to claim."""
    _notify_once(session, tenant)


def _notify_once(session: Session, tenant: TenantId) -> None:
    # NOTIFY is delivered at commit only, so a publisher never wakes for a row it cannot
    # see yet; one per tenant and transaction is enough (Postgres folds repeats anyway).
    # Keyed on the innermost transaction: a rolled-back savepoint takes its NOTIFY with it.
    transaction = session.get_nested_transaction() or session.get_transaction()
    marker = session.info.get(_NOTIFIED)
    if marker is None or marker[0] is not transaction:
        marker = (transaction, set[str]())
        session.info[_NOTIFIED] = marker
    if tenant not in marker[1]:
        session.execute(
            text("SELECT pg_notify(:channel, :tenant)"),
            {
                "channel": NOTIFY_CHANNEL,
                "tenant": tenant,
            },
        )
        marker[1].add(tenant)


_TOPIC_CHARACTERS = re.compile(r"[A-Za-z0-9._-]+")


def _check_topic(topic: str) -> None:
    if not isinstance(topic, str):
        raise InvalidEvent(f"topic must be a string, got {type(topic).__name__}")
    if not topic or len(topic) > 249 or topic in {".", ".."}:
        raise InvalidEvent(f"topic {topic!r}: must be 1-249 characters and not '.' or '..'")
    if not _TOPIC_CHARACTERS.fullmatch(topic):
        raise InvalidEvent(f"topic {topic!r}: use only ASCII letters, digits, '.', '_' or '-'")
    if reserved_topic(topic, _checkpoint_topic()):
        raise InvalidEvent(
            f"topic {topic!r} is reserved (Kafka's internal topics start with '__'; "
            "SOMABRAIN_CHECKPOINT_TOPIC holds the publishers' checkpoints)"
        )


@functools.cache
def _checkpoint_topic() -> str:
    return Settings().checkpoint_topic


def _check_size(
    encoded: str | None,
    key: str | None,
    event_type: str | None,
    headers: Mapping[str, str],
    limit: int,
) -> None:
    size = (
        len((encoded or "").encode())
        + len((key or "").encode())
        + len((event_type or "").encode())
        + sum(len(k.encode()) + len(v.encode()) for k, v in headers.items())
        + _PUBLISHER_HEADER_BYTES
        + _RECORD_OVERHEAD_BYTES
    )
    if size > limit:
        raise EventTooLarge(size=size, limit=limit)


def claim_pending(
    session: Session, *, tenant_id: TenantId, limit: int, dead_blocks_key: bool = True
) -> list[PendingEvent]:
    """The tenant's next pending rows due now, in id order, skipping blocked keys.

    A row is blocked when an earlier row of its key is retrying (pending, failed at
    least once, backing off) or, with `dead_blocks_key` (poison policy `block`), dead:
    later events of a key never overtake an earlier one that has not been delivered.
    Rows without a key are never blocked. Rows are read through the partial index on
    pending rows, so sent rows cost nothing however many there are.
    """
    rows = session.execute(
        _claim_statement(dead_blocks_key), {"tenant_id": tenant_id, "limit": limit}
    )
    return [
        PendingEvent(
            id=row.id,
            event_id=EventId(row.event_id),
            tenant_id=TenantId(row.tenant_id),
            topic=row.topic,
            message_key=row.message_key,
            dedupe_key=row.dedupe_key,
            event_type=row.event_type,
            payload_json=row.payload_json,
            headers=dict(row.headers),
            attempts=row.attempts,
            dispatched=row.dispatched,
        )
        for row in rows
    ]


# How migration 0003 marks a row it set aside: `<original key>#duplicate-<the row's id>`.
DUPLICATE_MARKER = "#duplicate-"


def set_aside(row: type[OutboxEvent] | Any = OutboxEvent) -> Any:
    """True for a row migration 0003 set aside as a repeat of another event's dedupe
    key: dead so that it is never published; never replayed, and blocking no key."""
    return row.dedupe_key.like(literal("%" + DUPLICATE_MARKER) + cast(row.id, String))


def _blocked(row: type[OutboxEvent], *, dead_blocks_key: bool) -> Any:
    """True for a row of `row` that an earlier undelivered row of its key holds back:
    one retrying (pending, failed at least once, backing off) or, with
    `dead_blocks_key` (poison policy `block`), one dead."""
    earlier = aliased(OutboxEvent)
    blocking = and_(
        earlier.status == EventStatus.PENDING.value,
        earlier.attempts > 0,
        earlier.next_attempt_at > func.now(),
    )
    if dead_blocks_key:
        # Not a row migration 0003 set aside as a repeat of another event's dedupe key:
        # it is dead so that it is never published, and is no event of the key's own.
        blocking = or_(
            blocking, and_(earlier.status == EventStatus.DEAD.value, ~set_aside(earlier))
        )
    return (
        select(literal(1))
        .where(
            earlier.tenant_id == row.tenant_id,
            earlier.message_key == row.message_key,
            earlier.id < row.id,
            # The partial index's own predicate, so the planner uses it.
            or_(
                earlier.status == EventStatus.DEAD.value,
                and_(earlier.status == EventStatus.PENDING.value, earlier.attempts > 0),
            ),
            blocking,
        )
        .exists()
    )


@functools.cache
def _claim_statement(dead_blocks_key: bool) -> Executable:
    # Built once per policy, with the tenant and the limit bound at execution: building
    # it (the ORM adapts every column of the alias) cost more than running it.
    blocked = _blocked(OutboxEvent, dead_blocks_key=dead_blocks_key)
    return (
        select(
            OutboxEvent.id,
            OutboxEvent.event_id,
            OutboxEvent.tenant_id,
            OutboxEvent.topic,
            OutboxEvent.message_key,
            OutboxEvent.dedupe_key,
            OutboxEvent.event_type,
            cast(OutboxEvent.payload, Text).label("payload_json"),
            OutboxEvent.headers,
            OutboxEvent.attempts,
            OutboxEvent.dispatched_at.is_not(None).label("dispatched"),
        )
        .where(
            OutboxEvent.tenant_id == bindparam("tenant_id", type_=String),
            OutboxEvent.status == EventStatus.PENDING.value,
            OutboxEvent.next_attempt_at <= func.now(),
            ~blocked,
        )
        .order_by(OutboxEvent.id)
        .limit(bindparam("limit", type_=Integer))
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Delivered:
    """Kafka's confirmation of one event."""

    id: int
    partition: int
    offset: int


def mark_sent(session: Session, delivered: Sequence[Delivered], *, tenant_id: str) -> list[float]:
    """Mark confirmed rows of `tenant_id` sent with their partition and offset.

    Only the tenant's rows still pending change, so a confirmation can never resurrect
    or rewrite a row some other path already settled, nor touch another tenant's
    rows whatever a checkpoint record claims. Returns, for each row changed, the seconds
    from its insert to now by the database's clock (the commit-to-ack latency).
    """
    if not delivered:
        return []
    result = session.execute(
        _MARK_SENT,
        {
            "ids": [d.id for d in delivered],
            "partitions": [d.partition for d in delivered],
            "offsets": [d.offset for d in delivered],
            "tenant_id": tenant_id,
        },
    )
    return [float(age) for (age,) in result]


def mark_dispatched(session: Session, row_ids: Sequence[int]) -> None:
    """Note that these rows are being handed to Kafka (at-least-once mode): if their
    outcome is never confirmed, the next send of each is a possible second copy."""
    session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id.in_(row_ids), OutboxEvent.status == EventStatus.PENDING.value)
        .values(dispatched_at=func.now())
    )


# One statement text whatever the batch size (three array parameters), so it is
# compiled once and PostgreSQL parses three values instead of three per row.
_MARK_SENT = text(
    "UPDATE outbox_events AS e SET status = 'sent', sent_at = now(),"
    " kafka_partition = v.p, kafka_offset = v.o, last_error = NULL"
    " FROM unnest(CAST(:ids AS bigint[]), CAST(:partitions AS integer[]),"
    " CAST(:offsets AS bigint[])) AS v(id, p, o)"
    " WHERE e.id = v.id AND e.status = 'pending' AND e.tenant_id = :tenant_id"
    " RETURNING extract(epoch FROM e.sent_at - e.created_at)"
).bindparams(
    bindparam("ids", type_=ARRAY(BigInteger)),
    bindparam("partitions", type_=ARRAY(Integer)),
    bindparam("offsets", type_=ARRAY(BigInteger)),
)


def record_failure(
    session: Session, *, row_id: int, error: str, backoff_seconds: float, max_attempts: int
) -> bool:
    """Count a failed attempt: back off, or go dead once `max_attempts` is reached.

    Returns True when the row went dead.
    """
    went_dead = session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id == row_id, OutboxEvent.status == EventStatus.PENDING.value)
        .values(
            attempts=OutboxEvent.attempts + 1,
            last_error=error[:2000],
            next_attempt_at=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, backoff_seconds),
            status=case(
                (OutboxEvent.attempts + 1 >= max_attempts, EventStatus.DEAD.value),
                else_=EventStatus.PENDING.value,
            ),
        )
        .returning(OutboxEvent.status)
    ).scalar_one_or_none()
    return went_dead == EventStatus.DEAD.value


def mark_dead(session: Session, *, row_id: int, error: str) -> None:
    """Give up on an event Kafka can never accept (too large, invalid topic, denied)."""
    session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id == row_id, OutboxEvent.status == EventStatus.PENDING.value)
        .values(
            attempts=OutboxEvent.attempts + 1,
            last_error=error[:2000],
            status=EventStatus.DEAD.value,
        )
    )


def checkpoint_position(session: Session, *, tenant_id: str) -> tuple[int, int] | None:
    """Partition and offset of the tenant's last checkpoint marked in the database."""
    row = session.execute(
        select(PublisherCheckpoint.kafka_partition, PublisherCheckpoint.kafka_offset).where(
            PublisherCheckpoint.tenant_id == tenant_id
        )
    ).one_or_none()
    return None if row is None else (int(row[0]), int(row[1]))


def save_checkpoint_position(
    session: Session, *, tenant_id: str, partition: int, offset: int
) -> None:
    """Record, in the transaction that marks a batch sent, where its checkpoint is."""
    stmt = insert(PublisherCheckpoint).values(
        tenant_id=tenant_id, kafka_partition=partition, kafka_offset=offset
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["tenant_id"],
            set_={
                "kafka_partition": stmt.excluded.kafka_partition,
                "kafka_offset": func.greatest(
                    PublisherCheckpoint.kafka_offset, stmt.excluded.kafka_offset
                ),
                "updated_at": func.now(),
            },
        )
    )


def purge_sent(
    session: Session,
    *,
    tenant_id: TenantId,
    older_than_seconds: float,
    chunk: int,
) -> int:
    """Delete up to `chunk` of the tenant's sent rows older than the retention.

    Only `sent` rows are ever deleted: pending and dead rows are never touched, and no
    path here changes a row's status. Callers loop in short transactions, so a purge
    never holds locks long enough to slow claims.
    """
    # A CTE runs once: a plain `id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` may be
    # rescanned by the planner and delete more than `chunk` rows.
    expired = (
        select(OutboxEvent.id)
        .where(
            OutboxEvent.tenant_id == tenant_id,
            OutboxEvent.status == EventStatus.SENT.value,
            OutboxEvent.sent_at
            < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_seconds),
        )
        .order_by(OutboxEvent.sent_at)
        .limit(chunk)
        .with_for_update(skip_locked=True)
        .cte("expired")
        .prefix_with("MATERIALIZED")
    )
    result = session.execute(
        delete(OutboxEvent).where(
            OutboxEvent.id == expired.c.id, OutboxEvent.status == EventStatus.SENT.value
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True, slots=True)
class Backlog:
    """What a tenant's publisher reports about its pending events."""

    pending: int
    oldest_age_seconds: float  # 0 when nothing is pending
    blocked_keys: int  # keys whose pending events wait behind an undelivered earlier one


def backlog(session: Session, *, tenant_id: TenantId, dead_blocks_key: bool = True) -> Backlog:
    """The tenant's pending events, the age of the oldest, and its blocked keys."""
    return backlogs(session, {tenant_id: dead_blocks_key})[tenant_id]


def backlogs(session: Session, tenants: Mapping[TenantId, bool]) -> dict[TenantId, Backlog]:
    """The backlog of each of `tenants` (mapped to its poison policy's `dead_blocks_key`),
    in at most three queries whatever their number: one count for all, and one count of
    blocked keys per policy among those with pending events."""
    if not tenants:
        return {}
    ids = list(tenants)
    counted = {
        TenantId(tenant): (int(count), float(age))
        for tenant, count, age in session.execute(_BACKLOG_STATEMENT, {"ids": ids})
    }
    blocked: dict[TenantId, int] = {}
    for dead_blocks_key in (True, False):
        waiting = [t for t in ids if tenants[t] == dead_blocks_key and t in counted]
        if waiting:
            blocked.update(
                (TenantId(tenant), int(keys))
                for tenant, keys in session.execute(
                    _blocked_keys_statement(dead_blocks_key), {"ids": waiting}
                )
            )
    return {
        tenant: Backlog(
            pending=counted.get(tenant, (0, 0.0))[0],
            oldest_age_seconds=counted.get(tenant, (0, 0.0))[1],
            blocked_keys=blocked.get(tenant, 0),
        )
        for tenant in ids
    }


# A tenant without pending events has no row here (it counts 0).
_BACKLOG_STATEMENT = (
    select(
        OutboxEvent.tenant_id,
        func.count(),
        func.extract("epoch", func.now() - func.min(OutboxEvent.created_at)),
    )
    .where(
        OutboxEvent.tenant_id == func.any(bindparam("ids", type_=ARRAY(String))),
        OutboxEvent.status == EventStatus.PENDING.value,
    )
    .group_by(OutboxEvent.tenant_id)
)


@functools.cache
def _blocked_keys_statement(dead_blocks_key: bool) -> Executable:
    return (
        select(OutboxEvent.tenant_id, func.count(func.distinct(OutboxEvent.message_key)))
        .where(
            OutboxEvent.tenant_id == func.any(bindparam("ids", type_=ARRAY(String))),
            OutboxEvent.status == EventStatus.PENDING.value,
            OutboxEvent.message_key.is_not(None),
            _blocked(OutboxEvent, dead_blocks_key=dead_blocks_key),
        )
        .group_by(OutboxEvent.tenant_id)
    )


def delete_tenant_events(session: Session, *, tenant_id: TenantId, chunk: int) -> int:
    """Delete up to `chunk` of the tenant's rows, whatever their status; once none are
    left, also what its publishers recorded (report, checkpoint position). Only for a
    tenant that is being removed on purpose (a Tenant with deletionPolicy Delete) and
    that no publisher serves any more. Returns the rows deleted."""
    doomed = (
        select(OutboxEvent.id)
        .where(OutboxEvent.tenant_id == tenant_id)
        .order_by(OutboxEvent.id)
        .limit(chunk)
        .cte("doomed")
        .prefix_with("MATERIALIZED")
    )
    deleted = int(
        session.execute(delete(OutboxEvent).where(OutboxEvent.id == doomed.c.id)).rowcount  # type: ignore[attr-defined]
    )
    if deleted == 0:
        session.execute(delete(OutboxTenant).where(OutboxTenant.tenant_id == tenant_id))
        session.execute(
            delete(PublisherCheckpoint).where(PublisherCheckpoint.tenant_id == tenant_id)
        )
    return deleted


@dataclasses.dataclass(frozen=True, slots=True)
class TenantReport:
    """What a tenant's active publisher last recorded (see `report_tenant`)."""

    tenant_id: TenantId
    pending: int
    oldest_pending_seconds: float | None
    circuit: str | None
    publisher: str | None
    seen_seconds_ago: float | None


def tenant_reports(session: Session, tenant_ids: Sequence[str]) -> dict[TenantId, TenantReport]:
    """The latest report of each of `tenant_ids` that has one, in one query."""
    if not tenant_ids:
        return {}
    rows = session.execute(
        select(
            OutboxTenant.tenant_id,
            OutboxTenant.pending,
            func.extract("epoch", func.now() - OutboxTenant.oldest_pending_at),
            OutboxTenant.circuit,
            OutboxTenant.publisher,
            func.extract("epoch", func.now() - OutboxTenant.publisher_seen_at),
        ).where(OutboxTenant.tenant_id == func.any(bindparam("ids", type_=ARRAY(String)))),
        {"ids": list(tenant_ids)},
    )
    return {
        TenantId(r[0]): TenantReport(
            tenant_id=TenantId(r[0]),
            pending=int(r[1]),
            oldest_pending_seconds=None if r[2] is None else max(0.0, float(r[2])),
            circuit=r[3],
            publisher=r[4],
            seen_seconds_ago=None if r[5] is None else max(0.0, float(r[5])),
        )
        for r in rows
    }


@dataclasses.dataclass(frozen=True, slots=True)
class PendingRow:
    """A pending event as an operator sees it (no payload)."""

    id: int
    event_id: EventId
    tenant_id: TenantId
    topic: str
    message_key: str | None
    attempts: int
    last_error: str | None
    age_seconds: float


def pending_events(
    session: Session, *, tenant_id: TenantId | None = None, limit: int = 100
) -> list[PendingRow]:
    """The oldest `limit` pending events, of one tenant or of all, in id order. Reads
    only: nothing is claimed."""
    stmt = (
        select(
            OutboxEvent.id,
            OutboxEvent.event_id,
            OutboxEvent.tenant_id,
            OutboxEvent.topic,
            OutboxEvent.message_key,
            OutboxEvent.attempts,
            OutboxEvent.last_error,
            func.extract("epoch", func.now() - OutboxEvent.created_at),
        )
        .where(OutboxEvent.status == EventStatus.PENDING.value)
        .order_by(OutboxEvent.id)
        .limit(limit)
    )
    if tenant_id is not None:
        stmt = stmt.where(OutboxEvent.tenant_id == tenant_id)
    return [
        PendingRow(
            id=r[0],
            event_id=EventId(r[1]),
            tenant_id=TenantId(r[2]),
            topic=r[3],
            message_key=r[4],
            attempts=r[5],
            last_error=r[6],
            age_seconds=float(r[7]),
        )
        for r in session.execute(stmt)
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class TenantCounts:
    """One tenant's rows by status, and the age of its oldest pending event.

    `dead` leaves out the rows migration 0003 set aside as repeats of another event's
    dedupe key: they are no events of their own, replay never touches them and no
    threshold should count them; `set_aside` counts them apart.
    """

    tenant_id: str
    pending: int
    sent: int
    dead: int
    oldest_pending_seconds: float | None
    set_aside: int = 0

    @classmethod
    def zero(cls, tenant_id: str) -> TenantCounts:
        """The counts of a tenant without rows."""
        return cls(tenant_id=tenant_id, pending=0, sent=0, dead=0, oldest_pending_seconds=None)


def tenant_counts(
    session: Session, *, tenant_ids: Sequence[str] | None = None
) -> list[TenantCounts]:
    """Every tenant with rows, or each of `tenant_ids` (with zeros when it has none), by
    tenant id, in one grouped pass over the table."""
    status = OutboxEvent.status
    dead = status == EventStatus.DEAD.value
    oldest = func.min(OutboxEvent.created_at).filter(status == EventStatus.PENDING.value)
    stmt = (
        select(
            OutboxEvent.tenant_id,
            func.count().filter(status == EventStatus.PENDING.value),
            func.count().filter(status == EventStatus.SENT.value),
            func.count().filter(dead, ~set_aside()),
            func.extract("epoch", func.now() - oldest),
            func.count().filter(dead, set_aside()),
        )
        .group_by(OutboxEvent.tenant_id)
        .order_by(OutboxEvent.tenant_id)
    )
    if tenant_ids is not None:
        stmt = stmt.where(OutboxEvent.tenant_id.in_(list(tenant_ids)))
    found = {
        str(tenant): TenantCounts(
            tenant_id=str(tenant),
            pending=int(pending),
            sent=int(sent),
            dead=int(dead),
            oldest_pending_seconds=None if age is None else max(0.0, float(age)),
            set_aside=int(aside),
        )
        for tenant, pending, sent, dead, age, aside in session.execute(stmt)
    }
    wanted = found if tenant_ids is None else set(tenant_ids)
    return [found.get(t) or TenantCounts.zero(t) for t in sorted(wanted)]


def count_by_status(session: Session, *, tenant_id: TenantId | None = None) -> dict[str, int]:
    """Rows per status, for one tenant or all."""
    stmt = select(OutboxEvent.status, func.count()).group_by(OutboxEvent.status)
    if tenant_id is not None:
        stmt = stmt.where(OutboxEvent.tenant_id == tenant_id)
    counts = {status.value: 0 for status in EventStatus}
    counts.update({status: int(n) for status, n in session.execute(stmt)})
    return counts


def advisory_lock_key(tenant_id: TenantId) -> int:
    """A stable signed 64-bit key for the tenant's publisher lock."""
    digest = hashlib.blake2b(f"somabrain:publisher:{tenant_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
