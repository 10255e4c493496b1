"""`somabrain outbox stats|list|show|replay|purge|check` and `somabrain db check`
against the real database, each run as the installed command."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from somabrain import NewEvent, enqueue_event, enqueue_events
from somabrain.store import migrate
from somabrain.store.engine import make_engine
from somabrain.store.models import AdminAction, OutboxEvent
from somabrain.store.outbox import Delivered, mark_dead, mark_sent, record_failure
from tests.support import set_aside

pytestmark = pytest.mark.integration

SOMABRAIN = str(Path(sys.executable).parent / "somabrain")


def _run(database_url: str, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """`somabrain ARGS` on the database, with `settings` as SOMABRAIN_<NAME> variables."""
    named = {f"SOMABRAIN_{name.upper()}": value for name, value in settings.items()}
    return subprocess.run(
        [SOMABRAIN, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SOMABRAIN_DATABASE_URL": database_url, **named},
        timeout=60,
        check=False,
    )


def _tenant() -> str:
    return f"cli-{uuid.uuid4().hex[:8]}"


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# Nothing listens here: a command refused before connecting never notices.
NOWHERE = "postgresql://nobody@127.0.0.1:1/none"
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _enqueue(
    sessions: sessionmaker[Session],
    tenant: str,
    count: int,
    *,
    topic: str = "orders",
    key: str | None = None,
) -> list[tuple[int, str]]:
    """`count` events of the tenant, in one transaction: their row ids and event ids."""
    with sessions.begin() as session:
        results = enqueue_events(
            session,
            [
                NewEvent(tenant_id=tenant, topic=topic, payload={"n": n}, key=key)
                for n in range(count)
            ],
        )
        wanted = [r.event_id for r in results]
        rows = session.execute(
            select(OutboxEvent.id, OutboxEvent.event_id)
            .where(OutboxEvent.event_id.in_(wanted))
            .order_by(OutboxEvent.id)
        ).all()
    return [(row_id, str(event_id)) for row_id, event_id in rows]


def _make_dead(sessions: sessionmaker[Session], row_ids: list[int]) -> None:
    with sessions.begin() as session:
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id.in_(row_ids))
            .values(status="dead", attempts=3, last_error="broker refused it")
        )


def _fail_once(sessions: sessionmaker[Session], row_id: int) -> None:
    with sessions.begin() as session:
        record_failure(
            session, row_id=row_id, error="timed out", backoff_seconds=300, max_attempts=5
        )


def _rows(sessions: sessionmaker[Session], tenant: str) -> dict[int, tuple[str, str, int]]:
    """The tenant's rows: id -> (event id, status, attempts)."""
    with sessions() as session:
        return {
            row_id: (str(event_id), status, attempts)
            for row_id, event_id, status, attempts in session.execute(
                select(
                    OutboxEvent.id, OutboxEvent.event_id, OutboxEvent.status, OutboxEvent.attempts
                ).where(OutboxEvent.tenant_id == tenant)
            )
        }


def _actions(sessions: sessionmaker[Session], tenant: str) -> list[AdminAction]:
    with sessions() as session:
        return list(
            session.scalars(
                select(AdminAction).where(AdminAction.tenant_id == tenant).order_by(AdminAction.id)
            )
        )


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

    assert shown.returncode == 0, shown.stderr
    assert tenant in shown.stdout
    assert "pending" in shown.stdout


def test_stats_list_a_tenant_asked_for_by_name_with_zeros_when_it_has_no_events(
    database_url: str,
) -> None:
    nobody = _tenant()

    as_json = _run(database_url, "outbox", "stats", "--tenant", nobody, "--output", "json")
    as_table = _run(database_url, "outbox", "stats", "--tenant", nobody)

    assert _json(as_json)["tenants"] == [
        {
            "tenant_id": nobody,
            "pending": 0,
            "sent": 0,
            "dead": 0,
            "oldest_pending_seconds": None,
            "set_aside": 0,
        }
    ]
    assert as_table.returncode == 0, as_table.stderr
    assert re.search(rf"{nobody}\W+0\W+0\W+0\W+-\W+0", as_table.stdout), as_table.stdout
    assert "no events" not in as_table.stdout


def _set_aside(sessions: sessionmaker[Session], row_id: int) -> None:
    """Mark a row as migration 0003 marks a repeat of another event's dedupe key."""
    with sessions.begin() as session:
        set_aside(session, row_id)


def test_rows_migration_0003_set_aside_are_counted_apart_and_never_fail_check(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant = _tenant()
    [(repeat, _)] = _enqueue(sessions, tenant, 1)
    _set_aside(sessions, repeat)

    stats = _run(database_url, "outbox", "stats", "--tenant", tenant, "--output", "json")
    check = _run(database_url, "outbox", "check", "--tenant", tenant, "--max-dead", "0")

    [row] = _json(stats)["tenants"]
    assert (row["dead"], row["set_aside"]) == (0, 1)
    assert check.returncode == 0, check.stdout
    assert f"{tenant}: 0 pending, 0 sent, 0 dead," in check.stdout


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


def test_list_filters_by_state_topic_key_and_creation_time(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant, other = _tenant(), _tenant()
    orders = _enqueue(sessions, tenant, 4, topic="orders", key="k1")
    refunds = _enqueue(sessions, tenant, 2, topic="refunds", key="k2")
    _enqueue(sessions, other, 3, topic="orders", key="k1")
    (dead_a, _), (dead_b, _), (failed, _), (sent, _) = orders
    _make_dead(sessions, [dead_a, dead_b])
    _fail_once(sessions, failed)
    with sessions.begin() as session:
        mark_sent(session, [Delivered(sent, 0, 7)], tenant_id=tenant)
        # One hour apart, from 2026-01-01T00:00Z in id order.
        for hour, (row_id, _) in enumerate([*orders, *refunds]):
            session.execute(
                update(OutboxEvent)
                .where(OutboxEvent.id == row_id)
                .values(created_at=dt.datetime(2026, 1, 1, hour, tzinfo=dt.UTC))
            )

    def listed(*args: str) -> list[tuple[int, str]]:
        shown = _json(_run(database_url, "outbox", "list", "--tenant", tenant, "--output", "json",
                           *args))  # fmt: skip
        assert shown["next_after"] is None
        return [(e["id"], e["state"]) for e in shown["events"]]

    refund_ids = [row_id for row_id, _ in refunds]
    assert listed() == [
        (dead_a, "dead"), (dead_b, "dead"), (failed, "failed"), (sent, "sent"),
        *((row_id, "pending") for row_id in refund_ids),
    ]  # fmt: skip
    assert listed("--state", "dead") == [(dead_a, "dead"), (dead_b, "dead")]
    assert listed("--state", "failed") == [(failed, "failed")]
    # pending includes the failed ones (pending, backing off).
    assert listed("--state", "pending") == [
        (failed, "failed"), *((row_id, "pending") for row_id in refund_ids)
    ]  # fmt: skip
    assert listed("--state", "dead", "--state", "sent") == [
        (dead_a, "dead"), (dead_b, "dead"), (sent, "sent")
    ]  # fmt: skip
    assert [i for i, _ in listed("--topic", "refunds")] == refund_ids
    assert [i for i, _ in listed("--key", "k1")] == [dead_a, dead_b, failed, sent]
    assert listed("--key", "k1", "--state", "pending") == [(failed, "failed")]
    # --since is inclusive, --until exclusive; offsets are honoured (03:00+01:00 is 02:00Z).
    assert [i for i, _ in listed("--since", "2026-01-01T03:00:00+01:00",
                                 "--until", "2026-01-01T04:00:00Z")] == [failed, sent]  # fmt: skip
    assert listed("--since", "2026-01-02T00:00:00Z") == []


def test_list_pages_through_every_event_with_after(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant, other = _tenant(), _tenant()
    events: list[tuple[int, str]] = []
    for _ in range(4):  # interleaved with another tenant's rows: ids are not contiguous
        events += _enqueue(sessions, tenant, 2)
        _enqueue(sessions, other, 1)

    pages, after = [], "0"
    while True:
        page = _json(_run(database_url, "outbox", "list", "--tenant", tenant, "--limit", "3",
                          "--after", after, "--output", "json"))  # fmt: skip
        pages.append([(e["id"], e["event_id"]) for e in page["events"]])
        if page["next_after"] is None:
            break
        after = str(page["next_after"])

    assert [len(p) for p in pages] == [3, 3, 2]
    assert [e for p in pages for e in p] == events

    # As tables: each full page ends with the command for the next one, which works.
    shown: list[str] = []
    command = ["outbox", "list", "--tenant", tenant, "--limit", "3"]
    hints = []
    while True:
        result = _run(database_url, *command)
        assert result.returncode == 0, result.stderr
        shown += UUID_TEXT.findall(result.stdout)
        hint = re.search(r"^next page: (.*)$", result.stdout, re.MULTILINE)
        if hint is None:
            break
        hints.append(hint.group(1))
        command = shlex.split(hint.group(1))[1:]
    assert shown == [event_id for _, event_id in events]
    assert hints == [
        f"somabrain outbox list --tenant {tenant} --limit 3 --after {events[2][0]}",
        f"somabrain outbox list --tenant {tenant} --limit 3 --after {events[5][0]}",
    ]


def test_list_refuses_bad_options_before_connecting() -> None:
    naive = _run(NOWHERE, "outbox", "list", "--tenant", "acme", "--since", "2026-01-01T00:00")
    garbled = _run(NOWHERE, "outbox", "list", "--tenant", "acme", "--until", "yesterday")
    backwards = _run(NOWHERE, "outbox", "list", "--tenant", "acme",
                     "--since", "2026-01-02T00:00Z", "--until", "2026-01-01T00:00Z")  # fmt: skip
    too_many = _run(NOWHERE, "outbox", "list", "--tenant", "acme", "--limit", "1001")
    invalid = _run(NOWHERE, "outbox", "list", "--tenant", "Not_Valid")

    assert naive.returncode == 2
    assert naive.stderr.startswith("FAILED: --since '2026-01-01T00:00' has no time zone")
    assert "2026-01-01T00:00Z" in naive.stderr
    assert garbled.returncode == 2
    assert garbled.stderr.startswith("FAILED: --until 'yesterday' is not an ISO 8601 time")
    assert backwards.returncode == 2
    assert (
        "FAILED: since 2026-01-02T00:00:00+00:00 is not before until 2026-01-01T00:00:00+00:00"
    ) in backwards.stderr
    assert too_many.returncode == 2
    assert "1000" in too_many.stderr
    assert invalid.returncode == 2
    assert invalid.stderr.startswith("FAILED: invalid tenant id")
    for result in (naive, garbled, backwards, invalid):
        assert "cannot reach the database" not in result.stderr


def _event_in_full(sessions: sessionmaker[Session], tenant: str) -> str:
    """An event that failed once, then was sent to partition 2 at offset 42."""
    with sessions.begin() as session:
        event_id = enqueue_event(
            session,
            tenant_id=tenant,
            topic="orders",
            payload={"order": 17, "note": "secret-of-" + tenant},
            key="order-17",
            dedupe_key="order-17-created",
            event_type="order.created",
            headers={"trace": "abc"},
        ).event_id
    with sessions.begin() as session:
        row_id = session.scalars(
            select(OutboxEvent.id).where(OutboxEvent.event_id == event_id)
        ).one()
    _fail_once(sessions, row_id)
    with sessions.begin() as session:
        mark_sent(session, [Delivered(row_id, 2, 42)], tenant_id=tenant)
    return str(event_id)


def test_show_prints_one_of_the_tenants_events_in_full(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant = _tenant()
    event_id = _event_in_full(sessions, tenant)

    shown = _json(_run(database_url, "outbox", "show", event_id, "--tenant", tenant,
                       "--output", "json"))  # fmt: skip
    table = _run(database_url, "outbox", "show", event_id, "--tenant", tenant)

    assert shown["event_id"] == event_id
    assert shown["tenant_id"] == tenant
    assert shown["payload"] == {"order": 17, "note": f"secret-of-{tenant}"}
    assert shown["headers"] == {"trace": "abc"}
    assert (shown["key"], shown["dedupe_key"], shown["event_type"]) == (
        "order-17", "order-17-created", "order.created"
    )  # fmt: skip
    assert (shown["state"], shown["attempts"]) == ("sent", 1)
    assert (shown["partition"], shown["offset"]) == (2, 42)
    assert shown["sent_at"] is not None
    assert table.returncode == 0, table.stderr
    for expected in (event_id, "order-17-created", "order.created", '"trace": "abc"',
                     '"order": 17', f"secret-of-{tenant}"):  # fmt: skip
        assert expected in table.stdout
    for label, value in (("state", "sent"), ("attempts", "1"), ("partition", "2"),
                         ("offset", "42")):  # fmt: skip
        assert re.search(rf"^{label}: +{value}$", table.stdout, re.MULTILINE), label

    # A dead one: its last error, and no partition or offset.
    [(dead_row, dead_id)] = _enqueue(sessions, tenant, 1)
    with sessions.begin() as session:
        mark_dead(session, row_id=dead_row, error="too large for the broker")
    dead = _json(_run(database_url, "outbox", "show", dead_id, "--tenant", tenant,
                      "--output", "json"))  # fmt: skip
    dead_table = _run(database_url, "outbox", "show", dead_id, "--tenant", tenant)
    assert (dead["state"], dead["attempts"]) == ("dead", 1)
    assert dead["last_error"] == "too large for the broker"
    assert (dead["partition"], dead["offset"], dead["sent_at"]) == (None, None, None)
    assert re.search(r"^last error: +too large for the broker$", dead_table.stdout, re.MULTILINE)


def test_show_answers_an_unknown_id_and_another_tenants_id_alike(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant, other = _tenant(), _tenant()
    _event_in_full(sessions, tenant)
    others_event = _event_in_full(sessions, other)
    unknown = str(uuid.uuid4())

    missing = _run(database_url, "outbox", "show", unknown, "--tenant", tenant)
    foreign = _run(database_url, "outbox", "show", others_event, "--tenant", tenant)
    foreign_json = _run(database_url, "outbox", "show", others_event, "--tenant", tenant,
                        "--output", "json")  # fmt: skip
    malformed = _run(database_url, "outbox", "show", "not-an-id", "--tenant", tenant)

    assert missing.returncode == foreign.returncode == foreign_json.returncode == 1
    assert missing.stderr == f"tenant {tenant} has no event {unknown}\n"
    assert foreign.stderr.replace(others_event, unknown) == missing.stderr
    assert foreign_json.stderr == foreign.stderr
    for result in (missing, foreign, foreign_json):
        assert result.stdout == ""
        assert f"secret-of-{other}" not in result.stderr
        assert other not in result.stderr
    assert malformed.returncode == 2
    assert malformed.stderr.startswith("FAILED: 'not-an-id' is not an event id")


def test_replay_dry_run_reports_and_changes_nothing(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant = _tenant()
    rows = _enqueue(sessions, tenant, 4, key="k")
    _make_dead(sessions, [row_id for row_id, _ in rows[:3]])
    before = _rows(sessions, tenant)

    text_run = _run(database_url, "outbox", "replay", "--tenant", tenant, "--dry-run")
    as_json = _json(_run(database_url, "outbox", "replay", "--tenant", tenant, "--dry-run",
                         "--output", "json"))  # fmt: skip
    by_ids = _json(_run(database_url, "outbox", "replay", "--tenant", tenant, "--dry-run",
                        "--id", rows[0][1], "--id", rows[3][1], "--output", "json"))  # fmt: skip

    assert text_run.returncode == 0, text_run.stderr
    assert "would replay 3 dead events" in text_run.stdout
    assert "nothing changed (dry run)" in text_run.stdout
    assert (as_json["dry_run"], as_json["rows"], as_json["action_id"]) == (True, 3, None)
    assert by_ids["events"] == {rows[0][1]: "replayed", rows[3][1]: "already-pending"}
    assert by_ids["rows"] == 1
    assert _rows(sessions, tenant) == before
    assert _actions(sessions, tenant) == []


def test_replay_by_filter_moves_dead_rows_back_to_pending_with_their_ids_and_audits_it(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant, other = _tenant(), _tenant()
    rows = _enqueue(sessions, tenant, 5, topic="orders", key="k")
    elsewhere = _enqueue(sessions, tenant, 1, topic="refunds", key="r")
    others = _enqueue(sessions, other, 2, topic="orders", key="k")
    dead = [row_id for row_id, _ in rows[:3]]
    _make_dead(sessions, [*dead, elsewhere[0][0], *(row_id for row_id, _ in others)])
    _fail_once(sessions, rows[3][0])
    before = _rows(sessions, tenant)

    result = _run(database_url, "outbox", "replay", "--tenant", tenant, "--topic", "orders",
                  "--output", "json")  # fmt: skip

    replayed = _json(result)
    assert (replayed["dry_run"], replayed["rows"], replayed["overtaken"]) == (False, 3, 0)
    after = _rows(sessions, tenant)
    assert set(after) == set(before)  # the same rows, under the same ids
    for row_id in dead:
        assert after[row_id] == (before[row_id][0], "pending", 0)
    assert after[rows[3][0]] == before[rows[3][0]]  # failed: not asked for (default dead)
    assert after[elsewhere[0][0]] == before[elsewhere[0][0]]  # another topic
    assert all(status == "dead" for _, status, _ in _rows(sessions, other).values())
    [action] = _actions(sessions, tenant)
    assert action.id == replayed["action_id"]
    assert action.actor == f"cli:{getpass.getuser()}@{socket.gethostname()}"
    assert (action.action, action.tenant_id, action.rows) == ("replay", tenant, 3)
    assert action.selection["filter"]["states"] == ["dead"]
    assert action.selection["filter"]["topic"] == "orders"
    assert action.finished_at is not None

    failed = _run(database_url, "outbox", "replay", "--tenant", tenant, "--state", "failed")
    assert failed.returncode == 0, failed.stderr
    assert "replayed 1 failed event of tenant" in failed.stdout
    assert _rows(sessions, tenant)[rows[3][0]][1:] == ("pending", 0)


def test_replaying_twice_changes_nothing_the_second_time(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant = _tenant()
    rows = _enqueue(sessions, tenant, 3)
    _make_dead(sessions, [row_id for row_id, _ in rows])

    first = _json(_run(database_url, "outbox", "replay", "--tenant", tenant, "--output", "json"))
    with sessions() as session:
        due = session.execute(
            select(OutboxEvent.id, OutboxEvent.next_attempt_at).where(
                OutboxEvent.tenant_id == tenant
            )
        ).all()
    second = _run(database_url, "outbox", "replay", "--tenant", tenant)

    assert first["rows"] == 3
    assert second.returncode == 0, second.stderr
    assert "replayed 0 dead events" in second.stdout
    with sessions() as session:
        assert (
            session.execute(
                select(OutboxEvent.id, OutboxEvent.next_attempt_at).where(
                    OutboxEvent.tenant_id == tenant
                )
            ).all()
            == due
        )
    assert [a.rows for a in _actions(sessions, tenant)] == [3, 0]


def test_replay_by_ids_reports_each_ids_outcome_and_never_touches_another_tenant(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant, other = _tenant(), _tenant()
    (dead, dead_id), (pending, pending_id), (sent, sent_id) = _enqueue(sessions, tenant, 3)
    [(foreign, foreign_id)] = _enqueue(sessions, other, 1)
    _make_dead(sessions, [dead, foreign])
    with sessions.begin() as session:
        mark_sent(session, [Delivered(sent, 0, 1)], tenant_id=tenant)
    unknown = str(uuid.uuid4())
    ids = [dead_id, pending_id, sent_id, unknown, foreign_id]

    result = _run(database_url, "outbox", "replay", "--tenant", tenant, "--output", "json",
                  *(arg for i in ids for arg in ("--id", i)))  # fmt: skip
    as_table = _run(database_url, "outbox", "replay", "--tenant", tenant,
                    *(arg for i in ids for arg in ("--id", i)))  # fmt: skip

    replayed = _json(result)
    assert replayed["events"] == {
        dead_id: "replayed",
        pending_id: "already-pending",
        sent_id: "sent",
        unknown: "not-found",
        foreign_id: "not-found",
    }
    assert replayed["rows"] == 1
    rows = _rows(sessions, tenant)
    assert (rows[dead][1:], rows[pending][1:], rows[sent][1:]) == (
        ("pending", 0), ("pending", 0), ("sent", 0)
    )  # fmt: skip
    assert _rows(sessions, other)[foreign][1:] == ("dead", 3)
    # The second run finds the first one's work done.
    assert as_table.returncode == 0, as_table.stderr
    assert "0 replayed, 2 already-pending, 1 sent, 2 not-found" in as_table.stdout
    assert [a.rows for a in _actions(sessions, tenant)] == [1, 0]
    assert _actions(sessions, other) == []


def test_replay_refuses_sent_and_pending_states_and_ids_mixed_with_a_filter(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant = _tenant()
    [(sent, sent_id), _] = _enqueue(sessions, tenant, 2)
    with sessions.begin() as session:
        mark_sent(session, [Delivered(sent, 0, 1)], tenant_id=tenant)
    before = _rows(sessions, tenant)

    sent_state = _run(database_url, "outbox", "replay", "--tenant", tenant, "--state", "sent")
    pending_state = _run(database_url, "outbox", "replay", "--tenant", tenant,
                         "--state", "dead", "--state", "pending")  # fmt: skip
    mixed = _run(database_url, "outbox", "replay", "--tenant", tenant, "--id", sent_id,
                 "--topic", "orders")  # fmt: skip

    assert sent_state.returncode == 2
    assert sent_state.stderr.startswith("FAILED: sent events are in Kafka already")
    assert "only dead and failed events can be replayed" in sent_state.stderr
    assert pending_state.returncode == 2
    assert pending_state.stderr.startswith("FAILED: pending events are waiting for delivery")
    assert mixed.returncode == 2
    assert mixed.stderr.startswith("FAILED: --id names the events itself; leave out --topic")
    assert _rows(sessions, tenant) == before
    assert _actions(sessions, tenant) == []


def test_replay_killed_half_way_replays_each_row_exactly_once_when_run_again(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant, total, chunk = _tenant(), 3000, 50
    rows = _enqueue(sessions, tenant, total, key="k")
    row_ids = [row_id for row_id, _ in rows]
    _make_dead(sessions, row_ids)
    command = [SOMABRAIN, "outbox", "replay", "--tenant", tenant, "--chunk", str(chunk),
               "--output", "json"]  # fmt: skip
    env = {**os.environ, "SOMABRAIN_DATABASE_URL": database_url}

    # A row half-way held locked: the replay commits the chunks before it, then waits on
    # the chunk holding it, its audit row counted but not finished, until it is killed.
    with sessions() as blocker:
        blocker.execute(select(OutboxEvent.id).where(OutboxEvent.id == row_ids[total // 2])
                        .with_for_update())  # fmt: skip
        replay = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                assert replay.poll() is None, replay.communicate()
                actions = _actions(sessions, tenant)
                if actions and actions[0].rows > 0:
                    break
                assert time.monotonic() < deadline, "the replay never committed a chunk"
                time.sleep(0.05)
            _wait_until_waiting_for_a_lock(sessions, deadline)
            [started] = _actions(sessions, tenant)
            assert started.finished_at is None
        finally:
            replay.send_signal(signal.SIGKILL)
            replay.communicate(timeout=30)
        assert replay.returncode == -signal.SIGKILL
        with sessions() as session:
            replayed_before_kill = session.scalar(
                select(func.count()).where(
                    OutboxEvent.tenant_id == tenant, OutboxEvent.status == "pending"
                )
            )
        blocker.rollback()
    [killed] = _actions(sessions, tenant)
    assert killed.rows == replayed_before_kill == total // 2
    assert killed.finished_at is None

    again = _json(_run(database_url, "outbox", "replay", "--tenant", tenant,
                       "--chunk", str(chunk), "--output", "json"))  # fmt: skip

    assert again["rows"] == total - killed.rows
    first, second = _actions(sessions, tenant)
    assert first.finished_at is None
    assert second.finished_at is not None
    assert first.rows + second.rows == total
    after = _rows(sessions, tenant)
    assert sorted(after) == row_ids
    assert {(status, attempts) for _, status, attempts in after.values()} == {("pending", 0)}
    assert [after[row_id][0] for row_id in row_ids] == [event_id for _, event_id in rows]


def _wait_until_waiting_for_a_lock(sessions: sessionmaker[Session], deadline: float) -> None:
    """Until some backend of this database waits for a row lock (the replay's chunk)."""
    while True:
        with sessions() as session:
            waiting = session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE '%picked%'"
                )
            )
        if waiting:
            return
        assert time.monotonic() < deadline, "the replay never reached the locked row"
        time.sleep(0.05)


def _sent_rows(
    sessions: sessionmaker[Session], tenant: str, count: int, *, topic: str
) -> list[int]:
    rows = [row_id for row_id, _ in _enqueue(sessions, tenant, count, topic=topic)]
    with sessions.begin() as session:
        mark_sent(session, [Delivered(r, 0, r) for r in rows], tenant_id=tenant)
    return rows


def test_replay_and_purge_log_the_audit_line_on_stderr(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant = _tenant()
    [(dead, _)] = _enqueue(sessions, tenant, 1)
    _make_dead(sessions, [dead])
    _sent_rows(sessions, tenant, 2, topic="orders")
    actor = f"cli:{getpass.getuser()}@{socket.gethostname()}"

    replay = _run(database_url, "outbox", "replay", "--tenant", tenant, "--output", "json")
    purge = _run(database_url, "outbox", "purge", "--tenant", tenant, "--yes")

    replayed, purged = _json(replay), purge
    assert purged.returncode == 0, purged.stderr
    [replay_action, purge_action] = _actions(sessions, tenant)
    assert (
        f"INFO somabrain.store.admin: replay of tenant {tenant} by {actor}: 1 rows "
        f"(audit id {replayed['action_id']}, selection "
    ) in replay.stderr
    assert (
        f"INFO somabrain.store.admin: purge of tenant {tenant} by {actor}: 2 rows "
        f"(audit id {purge_action.id}, selection "
    ) in purge.stderr
    assert replay_action.id == replayed["action_id"]
    # The audit line, not Alembic's word on which dialect it found.
    assert "alembic" not in replay.stderr + purge.stderr


def test_purge_dry_run_counts_and_purge_without_yes_is_refused(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant = _tenant()
    _sent_rows(sessions, tenant, 3, topic="orders")
    before = _rows(sessions, tenant)

    dry = _run(database_url, "outbox", "purge", "--tenant", tenant, "--dry-run")
    refused = _run(database_url, "outbox", "purge", "--tenant", tenant)

    assert dry.returncode == 0, dry.stderr
    assert f"would delete 3 sent events of tenant {tenant}; nothing changed" in dry.stdout
    assert refused.returncode == 2
    assert refused.stderr.startswith("FAILED: purge deletes events for good: add --yes")
    assert "--dry-run" in refused.stderr
    assert _rows(sessions, tenant) == before
    assert _actions(sessions, tenant) == []


def test_purge_deletes_only_the_sent_rows_of_that_tenant_and_topic(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    tenant, other = _tenant(), _tenant()
    purged = _sent_rows(sessions, tenant, 3, topic="orders")
    kept_other_topic = _sent_rows(sessions, tenant, 2, topic="refunds")
    kept_other_tenant = _sent_rows(sessions, other, 2, topic="orders")
    [(pending, _), (dead, _)] = _enqueue(sessions, tenant, 2, topic="orders")
    _make_dead(sessions, [dead])

    result = _run(database_url, "outbox", "purge", "--tenant", tenant, "--topic", "orders",
                  "--yes", "--chunk", "2")  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert f"deleted 3 sent events of tenant {tenant}" in result.stdout
    assert set(_rows(sessions, tenant)) == {*kept_other_topic, pending, dead}
    assert set(_rows(sessions, other)) == set(kept_other_tenant)
    [action] = _actions(sessions, tenant)
    assert (action.action, action.rows) == ("purge", 3)
    assert action.selection["filter"]["states"] == ["sent"]
    assert action.finished_at is not None
    assert not set(purged) & set(_rows(sessions, tenant))


def test_check_exits_1_naming_each_threshold_a_tenant_is_over(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    healthy, poisoned, stuck = _tenant(), _tenant(), _tenant()
    _enqueue(sessions, healthy, 2)
    [(dead, _)] = _enqueue(sessions, poisoned, 1)
    _make_dead(sessions, [dead])
    [(old, _)] = _enqueue(sessions, stuck, 1)
    with sessions.begin() as session:
        session.execute(
            update(OutboxEvent)
            .where(OutboxEvent.id == old)
            .values(created_at=func.now() - dt.timedelta(hours=1))
        )

    passing = _run(database_url, "outbox", "check", "--tenant", healthy)
    failing = _run(database_url, "outbox", "check", "--tenant", healthy, "--tenant", poisoned,
                   "--tenant", stuck)  # fmt: skip
    relaxed = _run(database_url, "outbox", "check", "--tenant", poisoned, "--tenant", stuck,
                   "--max-dead", "1", "--max-oldest-seconds", "7200")  # fmt: skip
    capped = _run(database_url, "outbox", "check", "--tenant", healthy, "--max-pending", "1")
    everyone = _run(database_url, "outbox", "check")
    invalid = _run(NOWHERE, "outbox", "check", "--tenant", "Not_Valid")

    assert passing.returncode == 0, passing.stderr
    assert f"{healthy}: 2 pending, 0 sent, 0 dead, oldest pending" in passing.stdout
    assert passing.stdout.splitlines()[0].endswith(": ok")
    assert "1 tenant checked, none over a threshold" in passing.stdout
    assert failing.returncode == 1
    lines = {line.split(":")[0]: line for line in failing.stdout.splitlines()}
    assert lines[healthy].endswith(": ok")
    assert lines[poisoned].endswith("OVER 1 dead > --max-dead 0")
    assert re.search(r"OVER oldest pending 36\d\d s > --max-oldest-seconds 600$", lines[stuck])
    assert "2 of 3 tenants over a threshold" in failing.stderr
    assert relaxed.returncode == 0, relaxed.stdout
    assert capped.returncode == 1
    assert "OVER 2 pending > --max-pending 1" in capped.stdout
    # Without --tenant: every tenant with events, these three among them.
    assert everyone.returncode == 1
    assert {healthy, poisoned, stuck} <= {
        line.split(":")[0] for line in everyone.stdout.splitlines()
    }
    assert invalid.returncode == 2
    assert invalid.stderr.startswith("FAILED: invalid tenant id")


def test_publisher_and_admin_api_refuse_to_start_on_a_schema_behind_this_version(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    behind = make_database()
    migrate.upgrade(behind, "0004")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens: [{name: a, token: " + "t" * 32 + ", admin: true}]")
    head = migrate.head_revision(behind)

    publisher = _run(behind, "publisher", "run", "--tenant", "acme")
    admin_api = _run(behind, "admin", "serve", admin_tokens_file=str(tokens))

    for result in (publisher, admin_api):
        assert result.returncode == 2, result.stderr
        assert (
            f"FAILED: database schema is at revision 0004, this version needs {head}; "
            "run `somabrain db upgrade` first"
        ) in result.stderr


def test_every_command_says_a_schema_newer_than_this_version_needs_a_newer_somabrain(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    ahead = make_database()
    migrate.upgrade(ahead)
    engine = make_engine(ahead, pool_size=1)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens: [{name: a, token: " + "t" * 32 + ", admin: true}]")
    head = migrate.head_revision(ahead)
    said = (
        f"database schema is at revision 9999_future, newer than this version of somabrain "
        f"knows (its newest is {head}): a newer somabrain migrated it; run that somabrain "
        "version or a later one"
    )

    check = _run(ahead, "db", "check")
    upgrade = _run(ahead, "db", "upgrade")
    current = _run(ahead, "db", "current")
    publisher = _run(ahead, "publisher", "run", "--tenant", "acme")
    replay = _run(ahead, "outbox", "replay", "--tenant", "acme")
    replay_dry = _run(ahead, "outbox", "replay", "--tenant", "acme", "--dry-run")
    purge_dry = _run(ahead, "outbox", "purge", "--tenant", "acme", "--dry-run")
    (tmp_path / "journal").mkdir()
    journal = _run(ahead, "journal", "migrate", "--dir", str(tmp_path / "journal"))
    admin_api = _run(ahead, "admin", "serve", admin_tokens_file=str(tokens))

    assert check.returncode == 1
    assert said in check.stderr
    for result in (upgrade, publisher, replay, replay_dry, purge_dry, journal, admin_api):
        assert result.returncode == 2, result.stderr
        assert f"FAILED: {said}" in result.stderr
        assert "db upgrade" not in result.stderr
    assert "current: 9999_future (unknown to this version" in current.stdout
