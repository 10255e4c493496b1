"""`somabrain outbox stats` and `somabrain db check` against the real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from somabrain import enqueue_event
from somabrain.store import migrate
from somabrain.store.models import OutboxEvent
from somabrain.store.outbox import Delivered, mark_dead, mark_sent

pytestmark = pytest.mark.integration

SOMABRAIN = str(Path(sys.executable).parent / "somabrain")


def _run(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SOMABRAIN, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SOMABRAIN_DATABASE_URL": database_url},
        timeout=60,
        check=False,
    )


def _tenant() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


def test_stats_count_each_tenants_events_by_status(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    busy, quiet, other = _tenant(), _tenant(), _tenant()
    with sessions.begin() as session:
        for i in range(5):
            enqueue_event(session, tenant_id=busy, topic=f"{busy}.orders", payload={"i": i})
        enqueue_event(session, tenant_id=quiet, topic=f"{quiet}.orders", payload={"i": 0})
        enqueue_event(session, tenant_id=other, topic=f"{other}.orders", payload={"i": 0})
    with sessions.begin() as session:
        ids = session.scalars(
            select(OutboxEvent.id).where(OutboxEvent.tenant_id == busy).order_by(OutboxEvent.id)
        ).all()
        mark_sent(session, [Delivered(ids[0], 0, 1), Delivered(ids[1], 0, 2)], tenant_id=busy)
        mark_dead(session, row_id=ids[2], error="too large")
        [quiet_id] = session.scalars(
            select(OutboxEvent.id).where(OutboxEvent.tenant_id == quiet)
        ).all()
        mark_sent(session, [Delivered(quiet_id, 0, 3)], tenant_id=quiet)

    result = _run(database_url, "outbox", "stats", "--tenant", busy, "--tenant", quiet,
                  "--output", "json")  # fmt: skip

    assert result.returncode == 0, result.stderr
    rows = {r["tenant_id"]: r for r in json.loads(result.stdout)["tenants"]}
    # Only the tenants asked for: the other one's event is not shown.
    assert set(rows) == {busy, quiet}
    assert (rows[busy]["pending"], rows[busy]["sent"], rows[busy]["dead"]) == (2, 2, 1)
    assert rows[busy]["oldest_pending_seconds"] >= 0
    assert (rows[quiet]["pending"], rows[quiet]["sent"], rows[quiet]["dead"]) == (0, 1, 0)
    assert rows[quiet]["oldest_pending_seconds"] is None


def test_stats_as_a_table_name_each_tenant(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant = _tenant()
    with sessions.begin() as session:
        enqueue_event(session, tenant_id=tenant, topic=f"{tenant}.orders", payload={})

    shown = _run(database_url, "outbox", "stats", "--tenant", tenant)
    empty = _run(database_url, "outbox", "stats", "--tenant", _tenant())

    assert shown.returncode == 0, shown.stderr
    assert tenant in shown.stdout
    assert "pending" in shown.stdout
    assert empty.returncode == 0
    assert "no events for" in empty.stdout


def test_stats_refuse_an_invalid_tenant_id_before_connecting(database_url: str) -> None:
    result = _run(database_url, "outbox", "stats", "--tenant", "Not_Valid")

    assert result.returncode == 2
    assert result.stderr.startswith("FAILED: invalid tenant id")


def test_db_check_passes_at_the_newest_schema_and_fails_behind_it(
    database_url: str, make_database: Callable[[], str]
) -> None:
    behind = make_database()  # empty: no schema at all

    current = _run(database_url, "db", "check")
    empty = _run(behind, "db", "check")
    migrate.upgrade(behind)
    upgraded = _run(behind, "db", "check")

    assert current.returncode == 0, current.stderr
    assert empty.returncode == 1
    assert "run `somabrain db upgrade`" in empty.stderr
    assert upgraded.returncode == 0
