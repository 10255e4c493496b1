"""The drain loop of one tenant: claim pending rows, deliver them, settle them.

Guarantees:
- No loss: a row is marked sent only from Kafka's confirmation, with its partition and
  offset. A crash at any point leaves unconfirmed rows pending for the next publisher.
- No duplicates for read_committed consumers in exactly-once mode: each batch is one
  Kafka transaction with a checkpoint record; on start, recovery marks the rows of
  checkpoints Kafka committed before a crash, so they are never published twice. In
  at-least-once mode a crash may republish a batch; every copy has the same `event-id`.
- One active publisher per tenant: the loop runs only while this process holds the
  tenant's Postgres advisory lock (and, in exactly-once mode, the producer's
  transactional id fences an older incarnation); a second process waits as standby.
- Order per key: rows are claimed in id order; a key with a retrying event (or, under
  poison policy `block`, a dead one) is skipped until that event is delivered, so a
  later event never overtakes an earlier one of its key.

What happens on failure: an event Kafka can never take (too large, invalid topic,
denied), or whose stored payload cannot be encoded, goes dead at once with the reason;
other failures back off exponentially with jitter, and after `max_attempts` the event
goes dead. Events failed only because another event of their transaction did are
retried without counting an attempt.

A tenant whose batches keep failing trips its circuit breaker: its publishing pauses,
then one probe event tests Kafka again (see `circuit`).

Limits (tracked in issue #3): no quotas or shared mode yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2.extensions
from confluent_kafka import KafkaException
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from somabrain.config.errors import RetriableError
from somabrain.config.settings import PublisherSettings
from somabrain.config.types import TenantId, parse_tenant_id
from somabrain.delivery import metrics
from somabrain.delivery.circuit import CircuitBreaker, CircuitState
from somabrain.delivery.classify import Verdict
from somabrain.delivery.producer import (
    BatchResult,
    Delivery,
    IdempotentDelivery,
    TransactionalDelivery,
    build_config,
    order_breaks,
    transactional_id,
)
from somabrain.delivery.recovery import ensure_checkpoint_topic, recover
from somabrain.delivery.retention import purge_expired
from somabrain.store.outbox import (
    NOTIFY_CHANNEL,
    PendingEvent,
    advisory_lock_key,
    backlog,
    claim_pending,
    mark_dead,
    mark_sent,
    record_failure,
    save_checkpoint_position,
)

log = logging.getLogger(__name__)


class TenantPublisher:
    """Drains one tenant's pending events into Kafka until told to stop.

    `connect` makes a fresh Delivery (a new producer; in exactly-once mode this fences
    the previous one) and `recover` settles what an earlier incarnation left behind;
    both run whenever the publisher (re)starts its session with Kafka.
    """

    def __init__(
        self,
        *,
        tenant: TenantId,
        settings: PublisherSettings,
        engine: Engine,
        connect: Callable[[], Delivery],
        recover: Callable[[], int] | None = None,
    ) -> None:
        self.tenant = tenant
        self.settings = settings
        self.engine = engine
        self.connect = connect
        self.recover = recover
        self.stopping = threading.Event()
        self.delivery: Delivery | None = None
        # Set when Kafka refused a multi-event batch as a whole: claim one event at a
        # time until the one at fault is found, then go back to full batches.
        self.isolating = False
        self.next_purge_at = 0.0
        self.next_backlog_at = 0.0
        self.holds_lock = False
        self.heartbeat = time.monotonic()
        self.circuit = CircuitBreaker(
            failure_threshold=settings.circuit_failure_threshold,
            open_seconds=settings.circuit_open_seconds,
        )

    def run(self) -> None:
        """Drain until `stopping` is set, riding out database restarts.

        Losing the database connection means losing the tenant's lock: the session
        ends, the lock is re-acquired from scratch (another publisher may have taken
        over meanwhile, and then this one waits as standby).
        """
        metrics.LOCK_HELD.labels(self.tenant).set(0)
        try:
            while not self.stopping.is_set():
                try:
                    self._session()
                except (DBAPIError, psycopg2.Error) as exc:
                    log.warning(
                        "tenant %s: database connection lost (%s); reconnecting in %.1f s",
                        self.tenant,
                        str(exc).strip().splitlines()[0],
                        self.settings.retry_backoff_seconds,
                        extra={"tenant": self.tenant},
                    )
                    self.stopping.wait(self.settings.retry_backoff_seconds)
        finally:
            self._close()

    def _session(self) -> None:
        """One database session: hold the tenant's lock on it, drain while it lasts."""
        raw: Any = self.engine.raw_connection()
        # A connection of its own, outside the pool: the lock lives exactly as long as
        # this session, and closing it releases the lock instead of parking it in the pool.
        raw.detach()
        try:
            if not self._acquire_lock(raw):
                return
            self.holds_lock = True
            metrics.LOCK_HELD.labels(self.tenant).set(1)
            log.info("publisher active for tenant %s", self.tenant, extra={"tenant": self.tenant})
            self._listen(raw)
            while not self.stopping.is_set():
                self.heartbeat = time.monotonic()
                # The lock is only ours while its session lives; check before each batch.
                with raw.cursor() as cur:
                    cur.execute("SELECT 1")
                self._maybe_purge()
                self._maybe_report_backlog()
                if self._drain_or_back_off() == 0:
                    self._wait_for_notify(raw)
        finally:
            self.holds_lock = False
            metrics.LOCK_HELD.labels(self.tenant).set(0)
            # A batch Kafka committed may not have been marked sent when the session
            # broke: the next session starts a new producer and runs recovery first.
            self._close()
            with contextlib.suppress(Exception):
                raw.close()

    def _drain_or_back_off(self) -> int:
        if not self.circuit.allow():
            self.stopping.wait(min(self.circuit.seconds_until_probe(), 1.0))
            return 1  # not idle: look again as soon as the pause ends
        try:
            if self.delivery is None:
                self.delivery = self.connect()
                if self.recover is not None:
                    self.recover()
            return self.drain_once(self.delivery)
        except (RetriableError, KafkaException) as exc:
            # A broken session with Kafka (broker gone, transaction state lost): start a
            # new one. Fatal errors (fenced by a newer publisher) stop the process.
            if isinstance(exc, KafkaException) and exc.args[0].fatal():
                raise
            self._record_batch(ok=False)
            log.warning(
                "tenant %s: %s; reconnecting to Kafka in %.1f s (recovery runs first)",
                self.tenant,
                exc,
                self.settings.retry_backoff_seconds,
                extra={"tenant": self.tenant},
            )
            self._close()
            self.stopping.wait(self.settings.retry_backoff_seconds)
            return 0

    @property
    def live(self) -> bool:
        """The loop went round recently: no iteration takes longer than a delivery
        timeout, a purge budget and a poll interval, with a wide margin."""
        limit = (
            2
            * (
                self.settings.delivery_timeout_seconds
                + self.settings.retention_budget_seconds
                + self.settings.poll_interval_seconds
            )
            + 30
        )
        return time.monotonic() - self.heartbeat < limit

    @property
    def ready(self) -> bool:
        """Active publisher of its tenant: holds the lock and has a session with Kafka."""
        return self.holds_lock and self.delivery is not None

    def _maybe_report_backlog(self) -> None:
        if time.monotonic() < self.next_backlog_at:
            return
        self.next_backlog_at = time.monotonic() + 5.0
        with Session(self.engine) as session:
            pending, oldest_age = backlog(session, tenant_id=self.tenant)
        metrics.PENDING.labels(self.tenant).set(pending)
        metrics.OLDEST_PENDING_AGE.labels(self.tenant).set(oldest_age)

    def _maybe_purge(self) -> None:
        if time.monotonic() < self.next_purge_at:
            return
        self.next_purge_at = time.monotonic() + self.settings.retention_interval_seconds
        purged = purge_expired(
            self.engine,
            tenant=self.tenant,
            retention_seconds=self.settings.retention_seconds,
            chunk=self.settings.retention_chunk,
            budget_seconds=self.settings.retention_budget_seconds,
        )
        if purged:
            metrics.PURGED.labels(self.tenant).inc(purged)
            log.info(
                "tenant %s: purged %d sent events older than %.0f s",
                self.tenant,
                purged,
                self.settings.retention_seconds,
                extra={"tenant": self.tenant},
            )

    def _record_batch(self, *, ok: bool) -> None:
        before = self.circuit.state
        if ok:
            self.circuit.record_success()
        else:
            self.circuit.record_failure()
        metrics.CIRCUIT_STATE.labels(self.tenant).set(self.circuit.state)
        if self.circuit.state is not before:
            log.warning(
                "tenant %s: circuit %s -> %s%s",
                self.tenant,
                before.name.lower(),
                self.circuit.state.name.lower(),
                f"; next probe in {self.circuit.open_seconds:.0f} s"
                if self.circuit.state is CircuitState.OPEN
                else "",
                extra={"tenant": self.tenant},
            )

    def drain_once(self, delivery: Delivery) -> int:
        """Deliver one batch; return how many rows it claimed."""
        with Session(self.engine) as session:
            events = claim_pending(
                session,
                tenant_id=self.tenant,
                limit=1
                if self.isolating or self.circuit.state is CircuitState.HALF_OPEN
                else self.settings.batch_size,
                dead_blocks_key=self.settings.poison_policy == "block",
            )
        if not events:
            return 0
        metrics.BATCH_SIZE.labels(self.tenant).observe(len(events))

        metrics.IN_FLIGHT.labels(self.tenant).set(len(events))
        try:
            result = delivery.deliver(events, timeout=self.settings.delivery_timeout_seconds)
        finally:
            metrics.IN_FLIGHT.labels(self.tenant).set(0)
        for key in order_breaks(events, result):
            metrics.KEY_ORDER_BREAKS.labels(self.tenant).inc()
            log.error(
                "tenant %s: a later event of key %r was confirmed after an earlier one failed "
                "(at-least-once mode cannot take it back; exactly-once mode aborts instead)",
                self.tenant,
                key,
                extra={"tenant": self.tenant},
            )
        self._settle(events, result)
        blamed = [f for f in result.failed if f.verdict is not Verdict.COLLATERAL]
        self._record_batch(ok=bool(result.delivered) or not blamed)
        return len(events)

    def _settle(self, events: list[PendingEvent], result: BatchResult) -> None:
        result = self._attribute(events, result)
        attempts = {e.id: e.attempts for e in events}
        dead = 0
        with Session(self.engine) as session, session.begin():
            mark_sent(session, result.delivered)
            if result.checkpoint is not None:
                save_checkpoint_position(
                    session,
                    owner=self.tenant,
                    partition=result.checkpoint.partition,
                    offset=result.checkpoint.offset,
                )
            for failure in result.failed:
                if failure.verdict is Verdict.PERMANENT:
                    mark_dead(session, row_id=failure.id, error=failure.error)
                    dead += 1
                elif failure.verdict is Verdict.RETRIABLE:
                    dead += record_failure(
                        session,
                        row_id=failure.id,
                        error=failure.error,
                        backoff_seconds=self._backoff(attempts[failure.id]),
                        max_attempts=self.settings.max_attempts,
                    )
        metrics.PUBLISHED.labels(self.tenant).inc(len(result.delivered))
        if result.delivered:
            metrics.LAST_PUBLISH.labels(self.tenant).set_to_current_time()
        if result.failed:
            metrics.DELIVERY_FAILURES.labels(self.tenant).inc(len(result.failed))
            first = next(
                (f for f in result.failed if f.verdict is not Verdict.COLLATERAL), result.failed[0]
            )
            log.warning(
                "tenant %s: Kafka did not confirm %d of %d events (%d now dead; first error: "
                "%s); the others stay pending and are retried with backoff",
                self.tenant,
                len(result.failed),
                len(events),
                dead,
                first.error,
                extra={"tenant": self.tenant},
            )

    def _attribute(self, events: list[PendingEvent], result: BatchResult) -> BatchResult:
        # Kafka reports a refused request against every message it carried, so a
        # "permanent" verdict is trusted only for a batch of one event.
        permanent = any(f.verdict is Verdict.PERMANENT for f in result.failed)
        if len(events) > 1 and permanent:
            log.warning(
                "tenant %s: Kafka refused a batch of %d events (%s); sending one at a time "
                "to find the event at fault",
                self.tenant,
                len(events),
                next(f.error for f in result.failed if f.verdict is Verdict.PERMANENT),
                extra={"tenant": self.tenant},
            )
            self.isolating = True
            return BatchResult(
                delivered=result.delivered,
                failed=[
                    dataclasses.replace(f, verdict=Verdict.COLLATERAL)
                    if f.verdict is Verdict.PERMANENT
                    else f
                    for f in result.failed
                ],
                checkpoint=result.checkpoint,
            )
        if len(events) == 1 and not result.failed:
            self.isolating = False
        return result

    def _backoff(self, attempts: int) -> float:
        # Exponential, capped, with full jitter in its upper half so retries spread out.
        growth: float = 2.0 ** min(attempts, 30)
        ceiling = min(
            self.settings.retry_backoff_max_seconds, self.settings.retry_backoff_seconds * growth
        )
        return ceiling * random.uniform(0.5, 1.0)

    def _close(self) -> None:
        if self.delivery is None:
            return
        unconfirmed = self.delivery.close(self.settings.shutdown_grace_seconds)
        self.delivery = None
        if unconfirmed:
            log.warning(
                "tenant %s: closing with %d messages unconfirmed by Kafka; their rows stay "
                "pending and the next publisher sends them",
                self.tenant,
                unconfirmed,
                extra={"tenant": self.tenant},
            )

    def _acquire_lock(self, raw: Any) -> bool:
        key = advisory_lock_key(self.tenant)
        waiting_logged = False
        while not self.stopping.is_set():
            with raw.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                (locked,) = cur.fetchone()
            raw.commit()
            self.heartbeat = time.monotonic()
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


def build_publisher(
    settings: PublisherSettings,
    engine: Engine,
    *,
    producer_overrides: dict[str, Any] | None = None,
) -> TenantPublisher:
    """A publisher for `settings.tenant` in the configured delivery mode."""
    tenant = parse_tenant_id(settings.tenant)
    overrides = producer_overrides or {}
    timeout = settings.delivery_timeout_seconds
    servers = settings.kafka_bootstrap_servers

    if settings.delivery_mode == "at-least-once":
        config = build_config(
            bootstrap_servers=servers, delivery_timeout_seconds=timeout, overrides=overrides
        )
        return TenantPublisher(
            tenant=tenant,
            settings=settings,
            engine=engine,
            connect=lambda: IdempotentDelivery(config),
        )

    config = build_config(
        bootstrap_servers=servers,
        delivery_timeout_seconds=timeout,
        overrides=overrides,
        transactional_id=transactional_id(tenant),
    )

    def connect() -> Delivery:
        ensure_checkpoint_topic(servers, settings.checkpoint_topic, timeout=timeout)
        return TransactionalDelivery(
            config, owner=tenant, checkpoint_topic=settings.checkpoint_topic, timeout=timeout
        )

    def recover_rows() -> int:
        return recover(
            engine=engine,
            bootstrap_servers=servers,
            owner=tenant,
            topic=settings.checkpoint_topic,
            timeout=timeout,
        )

    return TenantPublisher(
        tenant=tenant, settings=settings, engine=engine, connect=connect, recover=recover_rows
    )
