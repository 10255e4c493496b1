"""Engines and sessions. One engine per process and URL; sessions are short-lived."""

from __future__ import annotations

from sqlalchemy import URL, Engine, create_engine, make_url
from sqlalchemy.orm import Session, sessionmaker


def engine_url(url: str) -> URL:
    """The URL with the psycopg2 driver named, so `postgresql://...` means the same
    driver whatever SQLAlchemy's default for the scheme is."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed


# Seconds to establish a connection when the URL does not say (`?connect_timeout=`):
# without one, a database that accepts TCP but never answers blocks a caller for good.
CONNECT_TIMEOUT_SECONDS = 10


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine whose pool tests each connection before use (pre-ping), so connections
    left over from before a Postgres restart are replaced instead of failing a query,
    and whose connection attempts give up after CONNECT_TIMEOUT_SECONDS unless the URL
    sets its own `connect_timeout`."""
    parsed = engine_url(url)
    connect_args = (
        {} if "connect_timeout" in parsed.query else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    )
    return create_engine(parsed, pool_size=pool_size, pool_pre_ping=True, connect_args=connect_args)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (rows are read, then reported)."""
    return sessionmaker(engine, expire_on_commit=False)
