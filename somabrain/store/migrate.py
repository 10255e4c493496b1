"""Schema migrations through Alembic.

The scripts live in the checkout's `migrations/` folder; an installed package (the
container image) finds them through `SOMABRAIN_MIGRATIONS_DIR`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from somabrain.store.engine import engine_url, make_engine

MIGRATIONS_ENV = "SOMABRAIN_MIGRATIONS_DIR"


def migrations_dir() -> Path:
    """The Alembic script folder: `$SOMABRAIN_MIGRATIONS_DIR`, else the checkout's `migrations/`."""
    override = os.environ.get(MIGRATIONS_ENV)
    return Path(override) if override else Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("file_template", "%%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s")
    url = engine_url(database_url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision(database_url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


@dataclasses.dataclass(frozen=True, slots=True)
class SchemaState:
    """Where a database's schema stands against the revisions this version knows."""

    current: str | None
    head: str | None
    # False when `current` is a revision this version has no script for: a newer
    # somabrain migrated the database.
    known: bool

    def mismatch(self) -> str | None:
        """What is wrong and what to run, or None at the newest revision."""
        if not self.known:
            return (
                f"database schema is at revision {self.current}, newer than this version "
                f"of somabrain knows (its newest is {self.head}): a newer somabrain "
                "migrated it; run that somabrain version or a later one"
            )
        if self.current != self.head:
            return (
                f"database schema is at revision {self.current or 'none'}, this version "
                f"needs {self.head}; run `somabrain db upgrade` first"
            )
        return None


def schema_state(database_url: str) -> SchemaState:
    """The database's revision, this version's newest, and whether it knows the first."""
    script = ScriptDirectory.from_config(alembic_config(database_url))
    current = current_revision(database_url)
    known = current is None or current in {s.revision for s in script.walk_revisions()}
    return SchemaState(current=current, head=script.get_current_head(), known=known)
