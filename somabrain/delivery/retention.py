"""Retention: purge a tenant's sent rows older than the retention period.

Purging runs in small transactions (`chunk` rows each) within a time budget, between
two batches of the publisher, so it never holds locks long enough to slow claims and
never delays delivery by more than the budget. Only `sent` rows are deleted; pending
and dead rows stay whatever their age, and nothing here changes a row's status.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from somabrain.config.types import TenantId
from somabrain.store.outbox import purge_sent


def purge_expired(
    engine: Engine,
    *,
    tenant: TenantId,
    retention_seconds: float,
    chunk: int,
    budget_seconds: float,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Delete expired sent rows until none are left or the budget is spent; return how many."""
    deadline = clock() + budget_seconds
    total = 0
    while True:
        with Session(engine) as session, session.begin():
            deleted = purge_sent(
                session, tenant_id=tenant, older_than_seconds=retention_seconds, chunk=chunk
            )
        total += deleted
        if deleted < chunk or clock() >= deadline:
            return total
