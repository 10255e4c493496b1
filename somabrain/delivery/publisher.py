"""The drain loop of one tenant: claim pending rows, deliver them, mark them sent.

Guarantees:
- No loss: a row is marked sent only from Kafka's delivery report, with its partition
  and offset. A crash at any point leaves unconfirmed rows pending, and they are
  delivered again by the next publisher (at-least-once: every copy carries the same
  `event-id` header and key).
- One active publisher per tenant: the loop runs only while this process holds the
  tenant's Postgres advisory lock; a second process waits as a standby and takes over
  when the first one's session ends.
- Order per key among confirmed rows: rows are claimed and produced in id order through
  one idempotent producer, so Kafka keeps their order within a partition.

Limits (tracked in issue #3): no Kafka transactions yet, so a crash between Kafka's
confirmation and the database commit republishes the batch; a failed event does not
yet block later events of its key inside the same batch; no circuit breaker or quotas.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from typing import Any

import psycopg2.extensions
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from somabrain.config.settings import PublisherSettings
from somabrain.config.types import TenantId
from somabrain.delivery import metrics
from somabrain.delivery.producer import KafkaDelivery
from somabrain.store.outbox import (
    NOTIFY_CHANNEL,
    advisory_lock_key,
    claim_pending,
    mark_sent,
    record_failure,
)

log = logging.getLogger(__name__)


class TenantPublisher:
    """Drains one tenant's pending events into Kafka until told to stop."""

    def __init__(
        self,
        *,
        tenant: TenantId,
        settings: PublisherSettings,
        engine: Engine,
        delivery: KafkaDelivery,
    ) -> None:
        self.tenant = tenant
        self.settings = settings
        self.engine = engine
        self.delivery = delivery
        self.stopping = threading.Event()

    def run(self) -> None:
        """Hold the tenant's lock, then drain until `stopping` is set."""
        raw = self.engine.raw_connection()
        # A connection of its own, outside the pool: the lock lives exactly as long as
        # this session, and closing it releases the lock instead of parking it in the pool.
        raw.detach()
        try:
            if not self._acquire_lock(raw):
                return
            metrics.LOCK_HELD.labels(self.tenant).set(1)
            log.info("publisher active for tenant %s", self.tenant, extra={"tenant": self.tenant})
            self._listen(raw)
            while not self.stopping.is_set():
                if self.drain_once() == 0:
                    self._wait_for_notify(raw)
        finally:
            metrics.LOCK_HELD.labels(self.tenant).set(0)
            unconfirmed = self.delivery.close(self.settings.shutdown_grace_seconds)
            if unconfirmed:
                log.warning(
                    "stopping with %d messages unconfirmed by Kafka; their rows stay pending "
                    "and the next publisher of tenant %s sends them again",
                    unconfirmed,
                    self.tenant,
                    extra={"tenant": self.tenant},
                )
            raw.close()

    def drain_once(self) -> int:
        """Deliver one batch; return how many rows it claimed."""
        with self.engine.connect() as conn, Session(bind=conn) as session:
            events = claim_pending(session, tenant_id=self.tenant, limit=self.settings.batch_size)
            session.rollback()
        if not events:
            return 0
        metrics.BATCH_SIZE.labels(self.tenant).observe(len(events))

        delivered, failed = self.delivery.deliver(
            events, timeout=self.settings.delivery_timeout_seconds
        )
        attempts = {e.id: e.attempts for e in events}
        with self.engine.begin() as conn, Session(bind=conn) as session:
            mark_sent(session, delivered)
            for failure in failed:
                backoff = self.settings.retry_backoff_seconds * 2 ** min(attempts[failure.id], 10)
                record_failure(
                    session, row_id=failure.id, error=failure.error, backoff_seconds=backoff
                )
            session.flush()
        metrics.PUBLISHED.labels(self.tenant).inc(len(delivered))
        if failed:
            metrics.DELIVERY_FAILURES.labels(self.tenant).inc(len(failed))
            log.warning(
                "tenant %s: Kafka did not confirm %d of %d events (first error: %s); "
                "they stay pending and will be retried with backoff",
                self.tenant,
                len(failed),
                len(events),
                failed[0].error,
                extra={"tenant": self.tenant},
            )
        return len(events)

    def _acquire_lock(self, raw: Any) -> bool:
        key = advisory_lock_key(self.tenant)
        waiting_logged = False
        while not self.stopping.is_set():
            with raw.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                (locked,) = cur.fetchone()
            raw.commit()
            if locked:
                return True
            if not waiting_logged:
                log.info(
                    "another publisher holds tenant %s; waiting as standby",
                    self.tenant,
                    extra={"tenant": self.tenant},
                )
                waiting_logged = True
            self.stopping.wait(self.settings.poll_interval_seconds)
        return False

    def _listen(self, raw: Any) -> None:
        raw.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        with raw.cursor() as cur:
            cur.execute(f"LISTEN {NOTIFY_CHANNEL}")

    def _wait_for_notify(self, raw: Any) -> None:
        # Wake on a notification for this tenant, or after the poll interval (the
        # fallback that covers lost notifications and rows whose backoff expired).
        dbapi = raw.dbapi_connection
        deadline = time.monotonic() + self.settings.poll_interval_seconds
        while not self.stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            readable, _, _ = select.select([dbapi], [], [], min(remaining, 0.5))
            if not readable:
                continue
            dbapi.poll()
            ours = any(n.payload == self.tenant for n in dbapi.notifies)
            dbapi.notifies.clear()
            if ours:
                return
