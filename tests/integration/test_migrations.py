"""Alembic migrations on the real database: round trip, the model agrees with them, and
the unique dedupe key added over a table that already holds duplicates."""

import datetime as dt
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy import inspect, text

from somabrain import EnqueueStatus, enqueue_event
from somabrain.store import migrate
from somabrain.store.engine import make_engine, make_sessionmaker
from somabrain.store.models import Base

SOMABRAIN = str(Path(sys.executable).parent / "somabrain")
DEDUPE_CONSTRAINT = "uq_outbox_events_tenant_id_dedupe_key"
MIGRATION_LOGGER = "alembic.runtime.migration"
LONG_KEY = "k" * 200  # the longest dedupe key the column holds


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_upgrade_downgrade_upgrade_round_trip(make_database: Callable[[], str]) -> None:
    url = make_database()

    migrate.upgrade(url)
    assert "outbox_events" in _tables(url)
    migrate.downgrade(url, "base")
    assert "outbox_events" not in _tables(url)
    migrate.upgrade(url)

    assert "outbox_events" in _tables(url)
    assert migrate.current_revision(url) == migrate.head_revision(url)
    assert _dedupe_constraints(url) == [["tenant_id", "dedupe_key"]]


def test_model_matches_the_migrated_schema(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()

    assert diffs == []


def test_next_pending_rows_of_a_tenant_use_the_partial_index(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.connect() as conn:
        conn.execute(text("SET enable_seqscan = off"))
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                text(
                    "EXPLAIN SELECT id FROM outbox_events WHERE tenant_id = 'acme'"
                    " AND status = 'pending' ORDER BY id LIMIT 100"
                )
            )
        )
    engine.dispose()

    assert "ix_outbox_events_pending_tenant_id" in plan


# Tables the migrations before 0003 created may hold rows sharing a (tenant_id, dedupe_key);
# 0003 keeps the earliest of each group and marks the others (its docstring has the rule).


def _insert(url: str, *rows: dict[str, Any]) -> list[int]:
    """Insert rows as they are, bypassing enqueue_event; return their ids in order."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            return [
                conn.execute(
                    text(
                        f"INSERT INTO outbox_events (topic, {', '.join(row)})"
                        f" VALUES ('t.orders', {', '.join(':' + name for name in row)})"
                        " RETURNING id"
                    ),
                    row,
                ).scalar_one()
                for row in rows
            ]
    finally:
        engine.dispose()


def _sent(tenant_id: str, dedupe_key: str, offset: int) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "dedupe_key": dedupe_key,
        "status": "sent",
        "sent_at": dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
        "kafka_partition": 0,
        "kafka_offset": offset,
    }


def _rows(url: str) -> dict[int, dict[str, Any]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            result = conn.execute(text("SELECT * FROM outbox_events ORDER BY id"))
            return {row.id: dict(row._mapping) for row in result}
    finally:
        engine.dispose()


def _dedupe_constraints(url: str) -> list[list[str]]:
    engine = make_engine(url)
    try:
        return [
            list(c["column_names"])
            for c in inspect(engine).get_unique_constraints("outbox_events")
            if c["name"] == DEDUPE_CONSTRAINT
        ]
    finally:
        engine.dispose()


def _note(kept: int, key: str) -> str:
    return f"duplicate of event {kept} (dedupe key '{key}'), resolved by migration 0003"


def _database_with_duplicates(make_database: Callable[[], str]) -> tuple[str, dict[str, int]]:
    """A database at 0002 holding duplicate groups of every kind, and the ids by name."""
    url = make_database()
    migrate.upgrade(url, "0002")
    names = [
        "pending_kept",
        "pending_dup",
        "sent_kept",
        "sent_dup",
        "three_kept",
        "three_pending_dup",
        "three_dead_dup",
        "long_kept",
        "long_dup",
        "other_tenant",
        "unique",
        "later_of_key",
    ]
    ids = _insert(
        url,
        {"tenant_id": "acme", "dedupe_key": "order-1", "message_key": "o1"},
        {
            "tenant_id": "acme",
            "dedupe_key": "order-1",
            "message_key": "o1",
            "attempts": 2,
            "last_error": "broker timed out",
        },
        _sent("acme", "order-2", offset=10),
        _sent("acme", "order-2", offset=11),
        {"tenant_id": "acme", "dedupe_key": "order-3"},
        {"tenant_id": "acme", "dedupe_key": "order-3"},
        {
            "tenant_id": "acme",
            "dedupe_key": "order-3",
            "status": "dead",
            "last_error": "message too large",
        },
        {"tenant_id": "acme", "dedupe_key": LONG_KEY},
        {"tenant_id": "acme", "dedupe_key": LONG_KEY},
        {"tenant_id": "globex", "dedupe_key": "order-1"},
        {"tenant_id": "acme", "dedupe_key": "order-4"},
        {"tenant_id": "acme", "dedupe_key": "order-1-shipped", "message_key": "o1"},
    )
    return url, dict(zip(names, ids, strict=True))


def test_upgrade_over_duplicates_keeps_every_row_and_the_earliest_of_each_group_unchanged(
    make_database: Callable[[], str],
) -> None:
    url, ids = _database_with_duplicates(make_database)
    before = _rows(url)

    migrate.upgrade(url, "0003")

    after = _rows(url)
    assert sorted(after) == sorted(before)
    marked = {ids[name] for name in ids if name.endswith("_dup")}
    for row_id in set(before) - marked:
        assert after[row_id] == before[row_id]
    for row_id in marked:
        changed = {k for k in before[row_id] if after[row_id][k] != before[row_id][k]}
        assert changed <= {"dedupe_key", "status", "last_error"}


def test_upgrade_over_duplicates_marks_the_later_rows_of_each_group(
    make_database: Callable[[], str],
) -> None:
    url, ids = _database_with_duplicates(make_database)

    migrate.upgrade(url)

    rows = _rows(url)

    def marked(name: str) -> tuple[str, str, str | None]:
        row = rows[ids[name]]
        return row["dedupe_key"], row["status"], row["last_error"]

    pending_dup, sent_dup = ids["pending_dup"], ids["sent_dup"]
    assert marked("pending_dup") == (
        f"order-1#duplicate-{pending_dup}",
        "dead",
        _note(ids["pending_kept"], "order-1") + "; earlier error: broker timed out",
    )
    assert marked("sent_dup") == (
        f"order-2#duplicate-{sent_dup}",
        "sent",
        _note(ids["sent_kept"], "order-2"),
    )
    assert marked("three_pending_dup") == (
        f"order-3#duplicate-{ids['three_pending_dup']}",
        "dead",
        _note(ids["three_kept"], "order-3"),
    )
    assert marked("three_dead_dup") == (
        f"order-3#duplicate-{ids['three_dead_dup']}",
        "dead",
        _note(ids["three_kept"], "order-3") + "; earlier error: message too large",
    )
    suffix = f"#duplicate-{ids['long_dup']}"
    assert marked("long_dup") == (
        LONG_KEY[: 200 - len(suffix)] + suffix,
        "dead",
        _note(ids["long_kept"], LONG_KEY),
    )
    assert len(rows[ids["long_dup"]]["dedupe_key"]) == 200


def test_upgrade_over_duplicates_adds_the_constraint_and_enqueue_reports_duplicates(
    make_database: Callable[[], str],
) -> None:
    url, _ = _database_with_duplicates(make_database)

    migrate.upgrade(url)

    assert _dedupe_constraints(url) == [["tenant_id", "dedupe_key"]]
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            results = [
                enqueue_event(
                    session, tenant_id=tenant, topic="t.orders", payload={}, dedupe_key=key
                ).status
                for tenant, key in [
                    ("acme", "order-1"),
                    ("acme", "order-3"),
                    ("acme", LONG_KEY),
                    ("globex", "order-1"),
                    ("acme", "order-5"),
                ]
            ]
    finally:
        engine.dispose()
    assert results == [EnqueueStatus.DUPLICATE] * 4 + [EnqueueStatus.ENQUEUED]


def test_upgrade_over_duplicates_warns_with_counts_and_examples(
    make_database: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    url, ids = _database_with_duplicates(make_database)

    with caplog.at_level(logging.WARNING, logger=MIGRATION_LOGGER):
        migrate.upgrade(url)

    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert warning.name == MIGRATION_LOGGER
    assert "migration 0003: 4 duplicate (tenant_id, dedupe_key) groups" in message
    assert "marked the 5 others" in message
    assert "3 of them were pending and are now dead" in message
    # order-1-shipped comes after the dead order-1 duplicate, with the same message key.
    assert "holding back 1 later pending events" in message
    assert (
        f"tenant acme key 'order-1': kept {ids['pending_kept']}, marked 1 ({ids['pending_dup']})"
        in message
    )
    assert (
        f"tenant acme key 'order-3': kept {ids['three_kept']}, marked 2"
        f" ({ids['three_pending_dup']}, {ids['three_dead_dup']})" in message
    )
    assert "globex" not in message


def test_upgrade_without_duplicates_warns_nothing(
    make_database: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    url = make_database()
    migrate.upgrade(url, "0002")
    _insert(url, {"tenant_id": "acme", "dedupe_key": "a"}, {"tenant_id": "beta", "dedupe_key": "a"})

    with caplog.at_level(logging.WARNING, logger=MIGRATION_LOGGER):
        migrate.upgrade(url)

    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [row["dedupe_key"] for row in _rows(url).values()] == ["a", "a"]


def _database_with_an_unresolvable_duplicate(
    make_database: Callable[[], str],
) -> tuple[str, int, int]:
    """A database at 0002 where the key 0003 would give a duplicate is already taken;
    returns the URL, the duplicate's id and the id of the row holding that key."""
    url = make_database()
    migrate.upgrade(url, "0002")
    _, dup = _insert(
        url, {"tenant_id": "acme", "dedupe_key": "x"}, {"tenant_id": "acme", "dedupe_key": "x"}
    )
    [taken] = _insert(url, {"tenant_id": "acme", "dedupe_key": f"x#duplicate-{dup}"})
    return url, dup, taken


def test_upgrade_that_cannot_resolve_a_duplicate_fails_and_changes_nothing(
    make_database: Callable[[], str],
) -> None:
    url, dup, taken = _database_with_an_unresolvable_duplicate(make_database)
    before = _rows(url)

    with pytest.raises(CommandError, match=f"event {dup} .* which event {taken} already has"):
        migrate.upgrade(url)

    assert _rows(url) == before
    assert migrate.current_revision(url) == "0002"
    assert _dedupe_constraints(url) == []


def test_upgrade_keeps_a_dedupe_constraint_the_table_already_has(
    make_database: Callable[[], str],
) -> None:
    url = make_database()
    migrate.upgrade(url, "0002")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                f"ALTER TABLE outbox_events ADD CONSTRAINT {DEDUPE_CONSTRAINT}"
                " UNIQUE (tenant_id, dedupe_key)"
            )
        )
    engine.dispose()

    migrate.upgrade(url)

    assert _dedupe_constraints(url) == [["tenant_id", "dedupe_key"]]
    assert migrate.current_revision(url) == migrate.head_revision(url)


def test_downgrade_from_0003_drops_the_constraint_and_leaves_marked_rows_marked(
    make_database: Callable[[], str],
) -> None:
    url, _ = _database_with_duplicates(make_database)
    migrate.upgrade(url, "0003")
    migrated = _rows(url)

    migrate.downgrade(url, "0002")

    assert _dedupe_constraints(url) == []
    assert _rows(url) == migrated
    migrate.upgrade(url, "0003")
    assert _rows(url) == migrated
    assert _dedupe_constraints(url) == [["tenant_id", "dedupe_key"]]


def _somabrain_db_upgrade(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SOMABRAIN, "db", "upgrade"],
        capture_output=True,
        text=True,
        env={**os.environ, "SOMABRAIN_DATABASE_URL": url},
        timeout=120,
        check=False,
    )


def test_db_upgrade_command_shows_the_duplicates_warning(
    make_database: Callable[[], str],
) -> None:
    url, _ = _database_with_duplicates(make_database)

    result = _somabrain_db_upgrade(url)

    assert result.returncode == 0
    assert result.stdout.strip() == f"schema at {migrate.head_revision(url)}"
    assert "WARNING alembic.runtime.migration: migration 0003: 4 duplicate" in result.stderr


def test_db_upgrade_command_that_cannot_resolve_a_duplicate_fails_with_one_line(
    make_database: Callable[[], str],
) -> None:
    url, _, _ = _database_with_an_unresolvable_duplicate(make_database)

    result = _somabrain_db_upgrade(url)

    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("FAILED: migration: cannot resolve duplicate dedupe keys")
    )
    assert "Traceback" not in result.stderr
