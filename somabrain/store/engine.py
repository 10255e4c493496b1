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


# libpq settings every connection gets unless the URL sets its own: give up connecting
# after 10 s (a database that accepts TCP but never answers would block a caller for
# good), and find a connection whose peer went away (a network partition, a machine
# gone) within about 30 s, by TCP keepalives while idle and a bound on unacknowledged
# data while sending.
CONNECTION_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine whose pool tests each connection before use (pre-ping), so connections
    left over from before a Postgres restart are replaced instead of failing a query,
    and whose connections have the CONNECTION_DEFAULTS the URL does not override."""
    parsed = engine_url(url)
    connect_args = {k: v for k, v in CONNECTION_DEFAULTS.items() if k not in parsed.query}
    return create_engine(parsed, pool_size=pool_size, pool_pre_ping=True, connect_args=connect_args)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (rows are read, then reported)."""
    return sessionmaker(engine, expire_on_commit=False)
