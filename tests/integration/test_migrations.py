"""Alembic migrations on the real database: round trip, and the model agrees with them."""

from collections.abc import Callable

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from somabrain.store import migrate
from somabrain.store.engine import make_engine
from somabrain.store.models import Base


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
