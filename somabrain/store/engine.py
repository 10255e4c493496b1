"""Engines and sessions. One engine per process and URL; sessions are short-lived."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine with pre-ping, so a restarted Postgres costs one failed checkout, not a crash."""
    return create_engine(url, pool_size=pool_size, pool_pre_ping=True, future=True)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (rows are read, then reported)."""
    return sessionmaker(engine, expire_on_commit=False)
