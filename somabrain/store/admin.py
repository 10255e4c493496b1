"""What operators do to one tenant's events by hand: look at them, replay them, purge
them; and the audit trail of what was changed.

Every statement here is scoped to one tenant by an `EventFilter`, which cannot be
built without one: no function can touch two tenants' rows. The admin API and the CLI
decide who may call what; this module decides what each call does to the table.

- **Replay** moves `dead` events, and `failed` ones (pending, backing off after at
  least one failed attempt), back to pending with their attempts reset. A row keeps its
  id, so it is delivered before every later event of its key, as it would have been.
  Only rows in those states are touched: a replayed row is pending again and no longer
  matches, so replaying twice, or again after a crash half-way, changes each row once.
  A selection naming other states is refused (InvalidSelection), never narrowed.
- **Purge** deletes `sent` rows only; a selection naming other states is refused too.
- A selection whose creation period is empty (`created_after` not before
  `created_before`) is refused when it is built: it can only be a mistake.
- Both work in chunks of their own short transactions (never one long lock on the
  table), and each chunk adds its row count to the action's audit row in the same
  transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, aliased, sessionmaker

from somabrain.config.errors import InvalidSelection
from somabrain.config.types import EventId, TenantId
from somabrain.store.models import AdminAction, EventStatus, OutboxEvent
from somabrain.store.outbox import set_aside, wake_publisher

log = logging.getLogger(__name__)


class Selectable(enum.StrEnum):
    """The states an operator filters by. `failed` is a pending event that has failed at
    least once and is backing off; the other three are the row's status."""

    PENDING = "pending"
    FAILED = "failed"
    SENT = "sent"
    DEAD = "dead"


REPLAYABLE = frozenset({Selectable.DEAD, Selectable.FAILED})
PURGEABLE = frozenset({Selectable.SENT})


@dataclasses.dataclass(frozen=True, slots=True)
class EventFilter:
    """Which of one tenant's events an action applies to. Empty fields match all."""

    tenant_id: TenantId
    states: frozenset[Selectable] = frozenset()
    topic: str | None = None
    key: str | None = None
    created_after: dt.datetime | None = None
    created_before: dt.datetime | None = None

    def __post_init__(self) -> None:
        after, before = self.created_after, self.created_before
        if after is not None and before is not None and after >= before:
            raise InvalidSelection(
                f"since {after.isoformat()} is not before until {before.isoformat()}, so no "
                "event matches (since is inclusive, until exclusive); give a later until"
            )

    def conditions(self) -> list[ColumnElement[bool]]:
        row = OutboxEvent
        where: list[ColumnElement[bool]] = [row.tenant_id == self.tenant_id]
        if self.states:
            where.append(or_(*(_state_condition(s) for s in sorted(self.states))))
        if self.topic is not None:
            where.append(row.topic == self.topic)
        if self.key is not None:
            where.append(row.message_key == self.key)
        if self.created_after is not None:
            where.append(row.created_at >= self.created_after)
        if self.created_before is not None:
            where.append(row.created_at < self.created_before)
        return where

    def describe(self) -> dict[str, Any]:
        """The filter as recorded in the audit trail and shown back to the caller."""
        return {
            "states": sorted(self.states),
            "topic": self.topic,
            "key": self.key,
            "created_after": _iso(self.created_after),
            "created_before": _iso(self.created_before),
        }


def _state_condition(state: Selectable) -> ColumnElement[bool]:
    row = OutboxEvent
    if state is Selectable.FAILED:
        return and_(row.status == EventStatus.PENDING.value, row.attempts > 0)
    return row.status == state.value


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def state_of(status: str, attempts: int) -> Selectable:
    if status == EventStatus.PENDING.value and attempts > 0:
        return Selectable.FAILED
    return Selectable(status)


@dataclasses.dataclass(frozen=True, slots=True)
class EventSummary:
    """One event in a listing: everything but its payload and headers."""

    id: int
    event_id: EventId
    topic: str
    key: str | None
    event_type: str | None
    state: Selectable
    attempts: int
    last_error: str | None
    created_at: dt.datetime
    sent_at: dt.datetime | None
    partition: int | None
    offset: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class EventDetail:
    """One event in full."""

    summary: EventSummary
    tenant_id: TenantId
    dedupe_key: str
    payload: Any
    headers: Mapping[str, str]
    next_attempt_at: dt.datetime


_SUMMARY_COLUMNS = (
    OutboxEvent.id,
    OutboxEvent.event_id,
    OutboxEvent.topic,
    OutboxEvent.message_key,
    OutboxEvent.event_type,
    OutboxEvent.status,
    OutboxEvent.attempts,
    OutboxEvent.last_error,
    OutboxEvent.created_at,
    OutboxEvent.sent_at,
    OutboxEvent.kafka_partition,
    OutboxEvent.kafka_offset,
)


def _summary(r: Sequence[Any]) -> EventSummary:
    return EventSummary(
        id=r[0],
        event_id=EventId(r[1]),
        topic=r[2],
        key=r[3],
        event_type=r[4],
        state=state_of(r[5], r[6]),
        attempts=r[6],
        last_error=r[7],
        created_at=r[8],
        sent_at=r[9],
        partition=r[10],
        offset=r[11],
    )


def list_events(
    session: Session, selection: EventFilter, *, after_id: int = 0, limit: int = 100
) -> list[EventSummary]:
    """Up to `limit` matching events with ids above `after_id`, in id order (the order
    they are delivered in): a page, and its last id is the cursor of the next."""
    stmt = (
        select(*_SUMMARY_COLUMNS)
        .where(*selection.conditions(), OutboxEvent.id > after_id)
        .order_by(OutboxEvent.id)
        .limit(limit)
    )
    return [_summary(r) for r in session.execute(stmt)]


def get_event(session: Session, *, tenant_id: TenantId, event_id: uuid.UUID) -> EventDetail | None:
    """The tenant's event with this id; None when there is none (or it is another
    tenant's: the two are not told apart)."""
    stmt = select(
        *_SUMMARY_COLUMNS,
        OutboxEvent.dedupe_key,
        OutboxEvent.payload,
        OutboxEvent.headers,
        OutboxEvent.next_attempt_at,
    ).where(OutboxEvent.tenant_id == tenant_id, OutboxEvent.event_id == event_id)
    r = session.execute(stmt).one_or_none()
    if r is None:
        return None
    return EventDetail(
        summary=_summary(r),
        tenant_id=tenant_id,
        dedupe_key=r[12],
        payload=r[13],
        headers=r[14],
        next_attempt_at=r[15],
    )


def count_events(session: Session, selection: EventFilter) -> int:
    return int(session.execute(select(func.count()).where(*selection.conditions())).scalar_one())


def _overtaken(row: type[OutboxEvent] | Any) -> ColumnElement[bool]:
    """A later event of the row's key is already sent: replaying the row delivers it
    after that one (only possible under the poison policy `skip`)."""
    later = aliased(OutboxEvent)
    return exists().where(
        later.tenant_id == row.tenant_id,
        later.message_key == row.message_key,
        later.id > row.id,
        later.status == EventStatus.SENT.value,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class ReplayCount:
    """What a replay changes (or, in a dry run, would change)."""

    rows: int
    # Of those, rows a later event of their key has overtaken (sent before them).
    overtaken: int


def check_replayable(states: Iterable[Selectable]) -> None:
    """Raise InvalidSelection unless every one of `states` can be replayed."""
    refused = sorted(set(states) - REPLAYABLE)
    if refused:
        raise InvalidSelection(
            "; ".join(_NOT_REPLAYABLE[s] for s in refused)
            + ": only dead and failed events can be replayed"
        )


_NOT_REPLAYABLE = {
    Selectable.PENDING: "pending events are waiting for delivery already",
    Selectable.SENT: "sent events are in Kafka already (replaying one would publish it twice)",
}


def _replayable(selection: EventFilter) -> EventFilter:
    # Refused rather than narrowed: a selection of sent events alone would otherwise
    # lose its only state and match every row of the tenant.
    check_replayable(selection.states)
    return dataclasses.replace(selection, states=selection.states or REPLAYABLE)


def _replay_conditions(selection: EventFilter) -> list[ColumnElement[bool]]:
    return [*_replayable(selection).conditions(), ~set_aside()]


def preview_replay(session: Session, selection: EventFilter) -> ReplayCount:
    """What `replay_chunk` would change over the whole selection, changing nothing."""
    where = _replay_conditions(selection)
    rows, overtaken = session.execute(
        select(func.count(), func.count().filter(_overtaken(OutboxEvent))).where(*where)
    ).one()
    return ReplayCount(rows=int(rows), overtaken=int(overtaken))


def replay_chunk(
    session: Session, selection: EventFilter, *, after_id: int, chunk: int
) -> tuple[int, ReplayCount]:
    """Move the next `chunk` replayable rows above `after_id` back to pending. Returns
    the last id it changed (the next chunk's `after_id`; `after_id` itself when nothing
    is left) and what it changed. The caller commits."""
    where = _replay_conditions(selection)
    picked = (
        select(OutboxEvent.id, _overtaken(OutboxEvent).label("overtaken"))
        .where(*where, OutboxEvent.id > after_id)
        .order_by(OutboxEvent.id)
        .limit(chunk)
        .with_for_update(of=OutboxEvent)
        .cte("picked")
        .prefix_with("MATERIALIZED")
    )
    changed = session.execute(
        update(OutboxEvent)
        .where(OutboxEvent.id == picked.c.id)
        .values(
            status=EventStatus.PENDING.value,
            attempts=0,
            next_attempt_at=func.now(),
            dispatched_at=None,
        )
        .returning(OutboxEvent.id, picked.c.overtaken)
    ).all()
    if not changed:
        return after_id, ReplayCount(rows=0, overtaken=0)
    wake_publisher(session, selection.tenant_id)
    return max(r[0] for r in changed), ReplayCount(
        rows=len(changed), overtaken=sum(1 for r in changed if r[1])
    )


class IdOutcome(enum.StrEnum):
    """What a replay by ids did with one id."""

    REPLAYED = "replayed"
    ALREADY_PENDING = "already-pending"  # waiting for delivery already: nothing to do
    SENT = "sent"  # delivered already: replaying it would publish it twice
    NOT_FOUND = "not-found"  # no such event of this tenant
    SET_ASIDE = "set-aside"  # a repeat of another event's dedupe key (migration 0003)


def replay_ids(
    session: Session, *, tenant_id: TenantId, event_ids: Sequence[uuid.UUID], dry_run: bool
) -> tuple[dict[uuid.UUID, IdOutcome], ReplayCount]:
    """Replay these events of the tenant: those dead or failed go back to pending. The
    caller commits."""
    rows = session.execute(
        select(
            OutboxEvent.id,
            OutboxEvent.event_id,
            OutboxEvent.status,
            OutboxEvent.attempts,
            _overtaken(OutboxEvent),
            set_aside(),
        )
        .where(OutboxEvent.tenant_id == tenant_id, OutboxEvent.event_id.in_(list(event_ids)))
        .order_by(OutboxEvent.id)
        .with_for_update(of=OutboxEvent)
    ).all()
    outcomes = dict.fromkeys(event_ids, IdOutcome.NOT_FOUND)
    chosen: list[int] = []
    overtaken = 0
    for row_id, event_id, status, attempts, late, aside in rows:
        state = state_of(status, attempts)
        if aside:
            outcomes[event_id] = IdOutcome.SET_ASIDE
        elif state in REPLAYABLE:
            outcomes[event_id] = IdOutcome.REPLAYED
            chosen.append(row_id)
            overtaken += bool(late)
        elif state is Selectable.PENDING:
            outcomes[event_id] = IdOutcome.ALREADY_PENDING
        else:
            outcomes[event_id] = IdOutcome.SENT
    if chosen and not dry_run:
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(chosen))
            .values(
                status=EventStatus.PENDING.value,
                attempts=0,
                next_attempt_at=func.now(),
                dispatched_at=None,
            )
        )
        wake_publisher(session, tenant_id)
    return outcomes, ReplayCount(rows=len(chosen), overtaken=overtaken)


def check_purgeable(states: Iterable[Selectable]) -> None:
    """Raise InvalidSelection unless every one of `states` can be purged (only sent)."""
    refused = sorted(set(states) - PURGEABLE)
    if refused:
        raise InvalidSelection(
            f"{', '.join(refused)} events cannot be purged: only sent events are ever "
            "deleted; leave the states out or name sent only"
        )


def _purgeable(selection: EventFilter) -> EventFilter:
    # Refused rather than narrowed: a purge of dead events must not delete sent ones.
    check_purgeable(selection.states)
    return dataclasses.replace(selection, states=PURGEABLE)


def count_purgeable(session: Session, selection: EventFilter) -> int:
    return count_events(session, _purgeable(selection))


def purge_chunk(session: Session, selection: EventFilter, *, chunk: int) -> int:
    """Delete up to `chunk` of the selection's sent rows, oldest id first; a selection
    naming other states raises InvalidSelection. The caller commits."""
    picked = (
        select(OutboxEvent.id)
        .where(*_purgeable(selection).conditions())
        .order_by(OutboxEvent.id)
        .limit(chunk)
        .with_for_update(skip_locked=True)
        .cte("picked")
        .prefix_with("MATERIALIZED")
    )
    result = session.execute(
        delete(OutboxEvent).where(
            OutboxEvent.id == picked.c.id, OutboxEvent.status == EventStatus.SENT.value
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


class ActionKind(enum.StrEnum):
    REPLAY = "replay"
    PURGE = "purge"


@dataclasses.dataclass(frozen=True, slots=True)
class ActionRecord:
    """One audited replay or purge."""

    id: int
    actor: str
    action: ActionKind
    tenant_id: TenantId
    selection: Mapping[str, Any]
    rows: int
    started_at: dt.datetime
    finished_at: dt.datetime | None


def start_action(
    session: Session,
    *,
    actor: str,
    action: ActionKind,
    tenant_id: TenantId,
    selection: Mapping[str, Any],
) -> int:
    """Record that an action starts; returns its id. The caller commits."""
    return int(
        session.execute(
            insert(AdminAction)
            .values(actor=actor, action=action.value, tenant_id=tenant_id, selection=selection)
            .returning(AdminAction.id)
        ).scalar_one()
    )


def count_action_rows(session: Session, action_id: int, rows: int, *, finished: bool) -> None:
    """Add a chunk's rows to the action, in that chunk's transaction."""
    values: dict[str, Any] = {"rows": AdminAction.rows + rows}
    if finished:
        values["finished_at"] = func.now()
    session.execute(update(AdminAction).where(AdminAction.id == action_id).values(**values))


def list_actions(
    session: Session, *, tenant_ids: Sequence[str] | None, limit: int = 100
) -> list[ActionRecord]:
    """The latest actions, newest first, of these tenants (or of all)."""
    stmt = select(AdminAction).order_by(AdminAction.id.desc()).limit(limit)
    if tenant_ids is not None:
        stmt = stmt.where(AdminAction.tenant_id.in_(list(tenant_ids)))
    return [
        ActionRecord(
            id=a.id,
            actor=a.actor,
            action=ActionKind(a.action),
            tenant_id=TenantId(a.tenant_id),
            selection=a.selection,
            rows=a.rows,
            started_at=a.started_at,
            finished_at=a.finished_at,
        )
        for a in session.scalars(stmt)
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class ActionResult:
    """A finished replay or purge."""

    action_id: int
    rows: int
    overtaken: int = 0


def run_replay(
    sessions: sessionmaker[Session],
    selection: EventFilter,
    *,
    actor: str,
    chunk: int = 500,
    on_chunk: Callable[[int], None] | None = None,
) -> ActionResult:
    """Replay the whole selection chunk by chunk, audited. A crash leaves the chunks
    already committed replayed and counted; running it again replays the rest. A
    selection of states that cannot be replayed raises InvalidSelection before anything
    is written."""
    selection = _replayable(selection)
    described = {"filter": selection.describe()}
    with sessions.begin() as session:
        action_id = start_action(
            session,
            actor=actor,
            action=ActionKind.REPLAY,
            tenant_id=selection.tenant_id,
            selection=described,
        )
    after, rows, overtaken = 0, 0, 0
    while True:
        with sessions.begin() as session:
            after, count = replay_chunk(session, selection, after_id=after, chunk=chunk)
            # Only an empty chunk ends it: a short one may be short because rows it
            # picked changed under their lock, with more left after them.
            done = count.rows == 0
            count_action_rows(session, action_id, count.rows, finished=done)
        rows += count.rows
        overtaken += count.overtaken
        if on_chunk is not None:
            on_chunk(count.rows)
        if done:
            break
    _audit_line(actor, ActionKind.REPLAY, selection.tenant_id, described, rows, action_id)
    return ActionResult(action_id=action_id, rows=rows, overtaken=overtaken)


def run_replay_ids(
    sessions: sessionmaker[Session],
    *,
    tenant_id: TenantId,
    event_ids: Sequence[uuid.UUID],
    actor: str,
) -> tuple[dict[uuid.UUID, IdOutcome], ActionResult]:
    """Replay these events, audited, in one transaction (ids come a page at a time)."""
    described = {"event_ids": [str(e) for e in event_ids]}
    with sessions.begin() as session:
        action_id = start_action(
            session, actor=actor, action=ActionKind.REPLAY, tenant_id=tenant_id, selection=described
        )
        outcomes, count = replay_ids(
            session, tenant_id=tenant_id, event_ids=event_ids, dry_run=False
        )
        count_action_rows(session, action_id, count.rows, finished=True)
    _audit_line(actor, ActionKind.REPLAY, tenant_id, described, count.rows, action_id)
    return outcomes, ActionResult(action_id=action_id, rows=count.rows, overtaken=count.overtaken)


def run_purge(
    sessions: sessionmaker[Session],
    selection: EventFilter,
    *,
    actor: str,
    chunk: int = 1000,
    on_chunk: Callable[[int], None] | None = None,
) -> ActionResult:
    """Delete the selection's sent rows chunk by chunk, audited. A selection of other
    states raises InvalidSelection before anything is written."""
    described = {"filter": _purgeable(selection).describe()}
    with sessions.begin() as session:
        action_id = start_action(
            session,
            actor=actor,
            action=ActionKind.PURGE,
            tenant_id=selection.tenant_id,
            selection=described,
        )
    rows = 0
    while True:
        with sessions.begin() as session:
            count = purge_chunk(session, selection, chunk=chunk)
            # Only an empty chunk ends it: rows locked elsewhere are skipped, not last.
            done = count == 0
            count_action_rows(session, action_id, count, finished=done)
        rows += count
        if on_chunk is not None:
            on_chunk(count)
        if done:
            break
    _audit_line(actor, ActionKind.PURGE, selection.tenant_id, described, rows, action_id)
    return ActionResult(action_id=action_id, rows=rows)


def _audit_line(
    actor: str,
    action: ActionKind,
    tenant: TenantId,
    selection: Mapping[str, Any],
    rows: int,
    action_id: int,
) -> None:
    log.info(
        "%s of tenant %s by %s: %d rows (audit id %d, selection %s)",
        action.value,
        tenant,
        actor,
        rows,
        action_id,
        json.dumps(selection, sort_keys=True),
        extra={"tenant": tenant},
    )
