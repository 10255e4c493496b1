"""`somabrain.store.admin` replay selections on the real database: a selection is
replayed as given, or refused whole; never widened."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from somabrain import NewEvent, enqueue_events
from somabrain.config.errors import InvalidSelection
from somabrain.config.types import TenantId
from somabrain.store import admin
from somabrain.store.models import AdminAction, OutboxEvent
from somabrain.store.outbox import Delivered, mark_sent

pytestmark = pytest.mark.integration

S = admin.Selectable


def _seed(sessions: sessionmaker[Session]) -> tuple[TenantId, list[int]]:
    """A tenant with one event in each state: dead, failed, pending, sent (in id order)."""
    tenant = TenantId(f"adm-{uuid.uuid4().hex[:8]}")
    with sessions.begin() as session:
        enqueue_events(
            session, [NewEvent(tenant_id=tenant, topic="orders", payload={}) for _ in range(4)]
        )
        ids = list(
            session.scalars(
                select(OutboxEvent.id)
                .where(OutboxEvent.tenant_id == tenant)
                .order_by(OutboxEvent.id)
            )
        )
        session.execute(
            update(OutboxEvent).where(OutboxEvent.id == ids[0]).values(status="dead", attempts=3)
        )
        session.execute(update(OutboxEvent).where(OutboxEvent.id == ids[1]).values(attempts=1))
        mark_sent(session, [Delivered(ids[3], 0, 1)], tenant_id=tenant)
    return tenant, ids


def _states(sessions: sessionmaker[Session], ids: list[int]) -> list[tuple[str, int]]:
    with sessions() as session:
        return [
            (status, attempts)
            for status, attempts in session.execute(
                select(OutboxEvent.status, OutboxEvent.attempts)
                .where(OutboxEvent.id.in_(ids))
                .order_by(OutboxEvent.id)
            )
        ]


@pytest.mark.parametrize(
    "states",
    [{S.SENT}, {S.PENDING}, {S.SENT, S.DEAD}],
    ids=["sent", "pending", "sent-and-dead"],
)
def test_a_selection_naming_unreplayable_states_is_refused_and_changes_nothing(
    sessions: sessionmaker[Session], states: set[admin.Selectable]
) -> None:
    tenant, ids = _seed(sessions)
    before = _states(sessions, ids)
    selection = admin.EventFilter(tenant_id=tenant, states=frozenset(states))

    with sessions() as session, pytest.raises(InvalidSelection, match="only dead and failed"):
        admin.preview_replay(session, selection)
    with pytest.raises(InvalidSelection):
        admin.run_replay(sessions, selection, actor="test")

    assert _states(sessions, ids) == before
    with sessions() as session:
        audited = session.scalars(select(AdminAction).where(AdminAction.tenant_id == tenant))
        assert list(audited) == []


def test_a_selection_without_states_replays_dead_and_failed_rows_only(
    sessions: sessionmaker[Session],
) -> None:
    tenant, ids = _seed(sessions)
    selection = admin.EventFilter(tenant_id=tenant)

    with sessions() as session:
        preview = admin.preview_replay(session, selection)
    result = admin.run_replay(sessions, selection, actor="test", chunk=1)

    assert preview.rows == result.rows == 2
    assert _states(sessions, ids) == [("pending", 0), ("pending", 0), ("pending", 0), ("sent", 0)]
    with sessions() as session:
        [action] = session.scalars(select(AdminAction).where(AdminAction.tenant_id == tenant))
    # The audit trail names the states replayed, not an empty (every state) list.
    assert action.selection["filter"]["states"] == ["dead", "failed"]
    assert action.rows == 2
