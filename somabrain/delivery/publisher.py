"""The drain loop: claim pending rows, deliver them, settle them, one tenant at a time.

A publisher serves one tenant (dedicated mode) or several (shared mode, for many small
tenants). Each tenant is a `Lane` with its own lock, circuit breaker, quota and
failure state; the publisher takes the lanes in turns (see `scheduling`), one batch
per turn, over one database session and one Kafka producer.

Guarantees:
- No loss: a row is marked sent only from Kafka's confirmation, with its partition and
  offset. A crash at any point leaves unconfirmed rows pending for the next publisher.
- No duplicates for read_committed consumers in exactly-once mode: each batch is one
  Kafka transaction with a checkpoint record keyed by its tenant; before serving a
  tenant, recovery marks the rows of checkpoints Kafka committed before a crash, so they
  are never published twice. In at-least-once mode a crash may republish a batch;
  every copy has the same `event-id`.
- One active publisher per tenant: a lane is served only while this process holds the
  tenant's Postgres advisory lock (and, in exactly-once mode, the producer's
  transactional id fences an older incarnation of the same publisher); a second
  process waits as standby for each tenant it cannot lock. The lock key is the
  tenant's whatever the mode, so a dedicated and a shared publisher never serve one
  tenant at once.
- Order per key: rows are claimed in id order; a key with a retrying event (or, under
  poison policy `block`, a dead one) is skipped until that event is delivered, so a
  later event never overtakes an earlier one of its key.
- Tenant isolation: a tenant's circuit, quota, backoff and poison events hold back
  only its own lane; a flood waits its turn like everyone else.

What happens on failure: an event Kafka can never take (too large, invalid topic,
denied), or whose stored payload cannot be encoded, goes dead at once with the reason;
other failures back off exponentially with jitter, and after `max_attempts` the event
goes dead. Events failed only because another event of their transaction did are
retried without counting an attempt. A tenant whose batches keep failing trips its
circuit breaker: its lane pauses, then one probe event tests Kafka again (see `circuit`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg2.extensions
from confluent_kafka import KafkaException
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from somabrain.config import flags
from somabrain.config.errors import InvalidTenantConfig, RetriableError
from somabrain.config.settings import PublisherSettings, TenantOverrides, load_tenant_overrides
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
from somabrain.delivery.scheduling import Quota, RoundRobin, TokenBucket, bucket_for
from somabrain.store.outbox import (
    NOTIFY_CHANNEL,
    PendingEvent,
    TenantState,
    advisory_lock_key,
    backlogs,
    claim_pending,
    mark_dead,
    mark_dispatched,
    mark_sent,
    record_failure,
    report_tenants,
    save_checkpoint_position,
)

log = logging.getLogger(__name__)

BACKLOG_REPORT_SECONDS = 5.0
# Longest time Postgres keeps a vanished publisher's session, and so its locks (see
# `_listen`); a killed process's locks go at once.
LOCK_RELEASE_SECONDS = 25


@dataclasses.dataclass
class Lane:
    """One tenant a publisher serves, and all it keeps about that tenant."""

    tenant: TenantId
    quota: Quota
    circuit: CircuitBreaker
    poison_policy: str
    dead_letter_topic: str = ""
    max_pending: int | None = None
    bucket: TokenBucket | None = None
    holds_lock: bool = False
    standby_logged: bool = False
    # Exactly-once: the tenant's checkpoints were read since this process last (re)started
    # its Kafka session or took the tenant's lock.
    recovered: bool = False
    # May have rows due now: set by a notification, a poll tick or a full batch; cleared
    # when a claim comes back empty.
    due: bool = True
    # Kafka refused a multi-event batch as a whole: claim one event at a time until the
    # one at fault is found, then go back to full batches.
    isolating: bool = False
    next_purge_at: float = 0.0
    next_backlog_at: float = 0.0

    def log_extra(self) -> dict[str, str]:
        return {"tenant": self.tenant}


@dataclasses.dataclass(frozen=True, slots=True)
class LaneSettings:
    """What applies to one tenant's lane."""

    quota: Quota
    circuit_failure_threshold: int
    circuit_open_seconds: float
    poison_policy: str
    max_pending: int | None
    dead_letter_topic: str  # "" for none


def lane_settings(
    s: PublisherSettings, o: TenantOverrides | None, tenant: TenantId
) -> LaneSettings:
    """The publisher's settings overridden by the tenant's, as its feature flags allow:
    `tenant-quotas` off keeps the publisher's quotas, `dead-letter` off makes no copies."""
    o = o or TenantOverrides()
    own = flags.enabled(o.feature_flags, flags.TENANT_QUOTAS)
    template = s.dead_letter_topic if o.dead_letter_topic is None else o.dead_letter_topic
    if not flags.enabled(o.feature_flags, flags.DEAD_LETTER):
        template = ""
    return LaneSettings(
        quota=Quota(
            batch_size=(o.batch_size if own else None) or s.batch_size,
            max_in_flight=(o.max_in_flight if own else None) or s.max_in_flight,
            events_per_second=(o.events_per_second if own else None) or s.events_per_second,
        ),
        circuit_failure_threshold=o.circuit_failure_threshold or s.circuit_failure_threshold,
        circuit_open_seconds=o.circuit_open_seconds or s.circuit_open_seconds,
        poison_policy=o.poison_policy or s.poison_policy,
        max_pending=(o.max_pending if own else None) or s.max_pending,
        dead_letter_topic=template.replace("{tenant}", tenant),
    )


class Publisher:
    """Drains its tenants' pending events into Kafka until told to stop.

    `connect` makes a fresh Delivery (a new producer; in exactly-once mode this fences
    the previous incarnation) and `recover` settles, for the tenants it is given, what
    an earlier publisher left behind; recovery runs whenever the Kafka session restarts
    and whenever a tenant's lock is newly taken.
    """

    def __init__(
        self,
        *,
        owner: str,
        tenants: Sequence[TenantId],
        settings: PublisherSettings,
        engine: Engine,
        connect: Callable[[], Delivery],
        recover: Callable[[Sequence[TenantId]], int] | None = None,
    ) -> None:
        if not tenants:
            raise ValueError("a publisher needs at least one tenant")
        self.owner = owner
        self.settings = settings
        self.engine = engine
        self.connect = connect
        self.recover = recover
        self.stopping = threading.Event()
        self.delivery: Delivery | None = None
        self.heartbeat = time.monotonic()
        self.next_lock_try = 0.0
        self.next_poll_tick = 0.0
        self.lock_session: Any = None
        self.overrides: Mapping[str, TenantOverrides] = {}
        self.overrides_mtime: float | None = None
        self._load_overrides(initial=True)
        self.lanes: dict[TenantId, Lane] = {t: self._new_lane(t) for t in tenants}
        self.turns: RoundRobin[Lane] = RoundRobin(list(self.lanes.values()))

    # -- lanes and their settings -------------------------------------------------------

    def lane(self, tenant: str) -> Lane:
        return self.lanes[TenantId(tenant)]

    def _new_lane(self, tenant: TenantId) -> Lane:
        lane = Lane(
            tenant=tenant,
            quota=Quota(batch_size=1, max_in_flight=1),
            circuit=CircuitBreaker(failure_threshold=1, open_seconds=1.0),
            poison_policy="block",
        )
        self._configure(lane)
        return lane

    def _configure(self, lane: Lane) -> None:
        """Give the lane the publisher's settings, overridden by the tenant's own."""
        wanted = lane_settings(self.settings, self.overrides.get(lane.tenant), lane.tenant)
        if wanted.quota != lane.quota:
            lane.quota = wanted.quota
            lane.bucket = bucket_for(wanted.quota)
        lane.circuit.failure_threshold = wanted.circuit_failure_threshold
        lane.circuit.open_seconds = wanted.circuit_open_seconds
        lane.poison_policy = wanted.poison_policy
        lane.max_pending = wanted.max_pending
        lane.dead_letter_topic = wanted.dead_letter_topic

    def _load_overrides(self, *, initial: bool = False) -> bool:
        """Re-read the per-tenant file if it changed; True when it did."""
        path: Path | None = self.settings.tenant_config_file
        if path is None:
            return False
        try:
            mtime = path.stat().st_mtime
        except OSError as exc:
            if initial:
                raise InvalidTenantConfig(f"cannot read tenant config {path}: {exc}") from exc
            return False
        if mtime == self.overrides_mtime:
            return False
        try:
            self.overrides = load_tenant_overrides(path)
        except InvalidTenantConfig as exc:
            if initial:
                raise
            log.error("%s; keeping the previous per-tenant settings", exc)
        self.overrides_mtime = mtime
        return True

    def _apply_overrides(self) -> None:
        if not self._load_overrides():
            return
        for lane in self.lanes.values():
            self._configure(lane)
        log.info("per-tenant settings re-read from %s", self.settings.tenant_config_file)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        """Drain until `stopping` is set, riding out database restarts.

        Losing the database connection means losing the tenants' locks: the session
        ends, the locks are taken again from scratch (another publisher may have taken
        over meanwhile, and then this one waits as standby).
        """
        for lane in self.lanes.values():
            metrics.LOCK_HELD.labels(lane.tenant).set(0)
            metrics.CIRCUIT_STATE.labels(lane.tenant).set(lane.circuit.state)
            # Counters exist from the start at 0, so rate() and increase() see their
            # first increment (a series born at 1 shows no increase).
            for counter in metrics.TENANT_COUNTERS:
                counter.labels(lane.tenant)
        try:
            while not self.stopping.is_set():
                try:
                    self._session()
                except (DBAPIError, psycopg2.Error) as exc:
                    log.warning(
                        "%s: database connection lost (%s); reconnecting in %.1f s",
                        self.owner,
                        str(exc).strip().splitlines()[0],
                        self.settings.retry_backoff_seconds,
                    )
                    self.stopping.wait(self.settings.retry_backoff_seconds)
        finally:
            self._close()

    def _session(self) -> None:
        """One database session: hold the tenants' locks on it, drain while it lasts."""
        raw: Any = self.engine.raw_connection()
        # A connection of its own, outside the pool: the locks live exactly as long as
        # this session, and closing it releases them instead of parking them in the pool.
        raw.detach()
        self.lock_session = raw
        try:
            self._listen(raw)
            self.next_lock_try = 0.0
            while not self.stopping.is_set():
                self.heartbeat = time.monotonic()
                self._apply_overrides()
                self._take_locks(raw)
                if not any(lane.holds_lock for lane in self.lanes.values()):
                    self._wait_for_notify(raw, self.settings.poll_interval_seconds)
                    continue
                # The locks are only ours while their session lives; check before each turn.
                with raw.cursor() as cur:
                    cur.execute("SELECT 1")
                self._housekeeping()
                # Notifications that arrived during the last turn mark their tenants
                # due now, not when the publisher next runs out of work: a busy
                # neighbour must not hide a quiet tenant's new event.
                self._collect_notifications(raw)
                if self._turn() == 0:
                    # Woken for the next report too: a poll interval may be longer
                    # than the report interval, and an idle publisher must still report.
                    self._wait_for_notify(raw, self._idle_seconds(), wake_at=self._next_report_at())
        finally:
            for lane in self.lanes.values():
                if lane.holds_lock:
                    metrics.LOCK_HELD.labels(lane.tenant).set(0)
                lane.holds_lock = lane.recovered = False
            # A batch Kafka committed may not have been marked sent when the session
            # broke: the next session starts a new producer and runs recovery first.
            self.lock_session = None
            self._close()
            with contextlib.suppress(Exception):
                raw.close()

    def _turn(self) -> int:
        """Give the next able lane one batch; return how many rows it claimed.

        A lane whose claim comes back empty stops being due, and the next able lane
        gets the turn: 0 means no lane had anything to send.
        """
        while (lane := self.turns.next(self._may_take_turn)) is not None:
            try:
                if self.delivery is None:
                    self.delivery = self.connect()
                    for each in self.lanes.values():
                        each.recovered = False
                self._recover_lanes()
                claimed = self.drain_once(self.delivery, lane)
            except (RetriableError, KafkaException) as exc:
                self._kafka_session_failed(exc, lane)
                return 0
            lane.due = claimed > 0
            if claimed:
                return claimed
        return 0

    def _may_take_turn(self, lane: Lane) -> bool:
        if not (lane.holds_lock and lane.due):
            return False
        allowed = lane.circuit.allow()  # open -> half-open once the pause is over
        metrics.CIRCUIT_STATE.labels(lane.tenant).set(lane.circuit.state)
        if not allowed:
            return False
        if lane.bucket is not None and lane.bucket.available() < 1:
            metrics.THROTTLED.labels(lane.tenant).inc()
            return False
        return True

    def _idle_seconds(self) -> float:
        """How long to wait for a notification: until the poll tick, the next probe of an
        open circuit, or the next token of a throttled lane, whichever is first."""
        wait = self.settings.poll_interval_seconds
        for lane in self.lanes.values():
            if not (lane.holds_lock and lane.due):
                continue
            if lane.circuit.state is CircuitState.OPEN:
                wait = min(wait, lane.circuit.seconds_until_probe())
            elif lane.bucket is not None:
                wait = min(wait, lane.bucket.seconds_until(1))
        return max(wait, 0.005)

    def _recover_lanes(self) -> None:
        waiting = [t for t, lane in self.lanes.items() if lane.holds_lock and not lane.recovered]
        if not waiting:
            return
        if self.recover is not None:
            self.recover(waiting)
        for tenant in waiting:
            self.lanes[tenant].recovered = True

    def _kafka_session_failed(self, exc: Exception, lane: Lane) -> None:
        # A broken session with Kafka (broker gone, transaction state lost): start a new
        # one. Fatal errors (fenced by a newer publisher) stop the process. The failure
        # counts against the lane whose turn it was: a broker that is down for everyone
        # opens each tenant's circuit as its turn comes.
        if isinstance(exc, KafkaException) and exc.args[0].fatal():
            raise exc
        self._record_batch(lane, ok=False)
        log.warning(
            "tenant %s: %s; reconnecting to Kafka in %.1f s (recovery runs first)",
            lane.tenant,
            exc,
            self.settings.retry_backoff_seconds,
            extra=lane.log_extra(),
        )
        self._close()
        self.stopping.wait(self.settings.retry_backoff_seconds)

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
        """Serving: holds at least one tenant's lock and has a session with Kafka."""
        return self.delivery is not None and any(lane.holds_lock for lane in self.lanes.values())

    # -- housekeeping ------------------------------------------------------------------

    def _housekeeping(self) -> None:
        """Reports and retention, between two turns.

        Every lane due for a report is reported in this call, all in one transaction of
        a few statements: every tenant's row is refreshed within the report interval
        whatever the pool's size, idle (a turn then lasts up to a poll interval) or
        busy. Reported one lane per call, first due first, an idle pool's first five
        members took every turn of the 5 s interval and the later ones never reported:
        no backlog in their status, no cap for enqueue, a rollout waiting for them.

        Retention purges at most one lane per call, since a purge may run for its
        budget; the lane that has waited longest goes first, so every lane gets its
        purge however many there are.
        """
        now = time.monotonic()
        due = [x for x in self.lanes.values() if x.holds_lock and now >= x.next_backlog_at]
        if due:
            self._report(due, now)
        purge = min(
            (x for x in self.lanes.values() if x.holds_lock and now >= x.next_purge_at),
            key=lambda x: x.next_purge_at,
            default=None,
        )
        if purge is not None:
            purge.next_purge_at = now + self.settings.retention_interval_seconds
            self._purge(purge)

    def _report(self, lanes: Sequence[Lane], now: float) -> None:
        """Count the lanes' backlogs and record them with their caps and circuits in
        `outbox_tenants` (enqueue reads the cap and the count there, see check_backlog;
        the operator reads the rest), then set the lanes' gauges."""
        for lane in lanes:
            lane.next_backlog_at = now + BACKLOG_REPORT_SECONDS
        with Session(self.engine) as session, session.begin():
            counted = backlogs(
                session, {lane.tenant: lane.poison_policy == "block" for lane in lanes}
            )
            report_tenants(
                session,
                [
                    TenantState(
                        tenant_id=lane.tenant,
                        pending=counted[lane.tenant].pending,
                        max_pending=lane.max_pending,
                        oldest_pending_age=counted[lane.tenant].oldest_age_seconds,
                        circuit=lane.circuit.state.name.lower().replace("_", "-"),
                    )
                    for lane in lanes
                ],
                publisher=self.owner,
            )
        for lane in lanes:
            current = counted[lane.tenant]
            metrics.PENDING.labels(lane.tenant).set(current.pending)
            metrics.OLDEST_PENDING_AGE.labels(lane.tenant).set(current.oldest_age_seconds)
            metrics.BLOCKED_KEYS.labels(lane.tenant).set(current.blocked_keys)

    def _next_report_at(self) -> float | None:
        """When the next lane this process serves is due for a report (monotonic)."""
        return min((x.next_backlog_at for x in self.lanes.values() if x.holds_lock), default=None)

    def _purge(self, lane: Lane) -> None:
        purged = purge_expired(
            self.engine,
            tenant=lane.tenant,
            retention_seconds=self.settings.retention_seconds,
            chunk=self.settings.retention_chunk,
            budget_seconds=self.settings.retention_budget_seconds,
        )
        if purged:
            metrics.PURGED.labels(lane.tenant).inc(purged)
            log.info(
                "tenant %s: purged %d sent events older than %.0f s",
                lane.tenant,
                purged,
                self.settings.retention_seconds,
                extra=lane.log_extra(),
            )

    def _record_batch(self, lane: Lane, *, ok: bool) -> None:
        circuit = lane.circuit
        before = circuit.state
        if ok:
            circuit.record_success()
        else:
            circuit.record_failure()
        metrics.CIRCUIT_STATE.labels(lane.tenant).set(circuit.state)
        if circuit.state is not before:
            log.warning(
                "tenant %s: circuit %s -> %s%s",
                lane.tenant,
                before.name.lower(),
                circuit.state.name.lower(),
                f"; next probe in {circuit.open_seconds:.0f} s"
                if circuit.state is CircuitState.OPEN
                else "",
                extra=lane.log_extra(),
            )

    # -- one batch ---------------------------------------------------------------------

    def drain_once(self, delivery: Delivery, lane: Lane | None = None) -> int:
        """Deliver one batch of `lane` (the only one, when omitted); return rows claimed."""
        if lane is None:
            (lane,) = self.lanes.values()
        limit = lane.quota.batch_limit()
        if lane.isolating or lane.circuit.state is CircuitState.HALF_OPEN:
            limit = 1
        if lane.bucket is not None:
            limit = max(1, min(limit, lane.bucket.available()))
        with Session(self.engine) as session:
            events = claim_pending(
                session,
                tenant_id=lane.tenant,
                limit=limit,
                dead_blocks_key=lane.poison_policy == "block",
            )
        if not events:
            return 0
        if lane.bucket is not None:
            lane.bucket.take(len(events))
        metrics.BATCH_SIZE.labels(lane.tenant).observe(len(events))
        if self.settings.delivery_mode == "at-least-once":
            with Session(self.engine) as session, session.begin():
                mark_dispatched(session, [e.id for e in events])

        metrics.IN_FLIGHT.labels(lane.tenant).set(len(events))
        try:
            result = delivery.deliver(
                events,
                timeout=self.settings.delivery_timeout_seconds,
                before_commit=self._check_lock_session,
            )
        finally:
            metrics.IN_FLIGHT.labels(lane.tenant).set(0)
        for key in order_breaks(events, result):
            metrics.KEY_ORDER_BREAKS.labels(lane.tenant).inc()
            log.error(
                "tenant %s: a later event of key %r was confirmed after an earlier one failed "
                "(at-least-once mode cannot take it back; exactly-once mode aborts instead)",
                lane.tenant,
                key,
                extra=lane.log_extra(),
            )
        self._settle(lane, events, result, delivery)
        blamed = [f for f in result.failed if f.verdict is not Verdict.COLLATERAL]
        self._record_batch(lane, ok=bool(result.delivered) or not blamed)
        return len(events)

    def _settle(
        self, lane: Lane, events: list[PendingEvent], result: BatchResult, delivery: Delivery
    ) -> None:
        result = self._attribute(lane, events, result)
        attempts = {e.id: e.attempts for e in events}
        kept = self._dead_letter(lane, events, result, delivery)
        dead = 0
        with Session(self.engine) as session, session.begin():
            latencies = mark_sent(session, result.delivered, tenant_id=lane.tenant)
            if result.checkpoint is not None:
                save_checkpoint_position(
                    session,
                    tenant_id=lane.tenant,
                    partition=result.checkpoint.partition,
                    offset=result.checkpoint.offset,
                )
            for failure in result.failed:
                if failure.id in kept:
                    # Its dead-letter copy is not confirmed: it stays pending, and goes
                    # dead only once a later attempt's copy is.
                    record_failure(
                        session,
                        row_id=failure.id,
                        error=f"{failure.error} (dead-letter copy not confirmed; retrying)",
                        backoff_seconds=self._backoff(attempts[failure.id]),
                        max_attempts=attempts[failure.id] + 2,
                    )
                elif failure.verdict is Verdict.PERMANENT:
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
        metrics.PUBLISHED.labels(lane.tenant).inc(len(result.delivered))
        delivered = {d.id for d in result.delivered}
        again = sum(1 for e in events if e.dispatched and e.id in delivered)
        if again:
            metrics.REPUBLISHED.labels(lane.tenant).inc(again)
        latency = metrics.COMMIT_TO_ACK.labels(lane.tenant)
        for seconds in latencies:
            latency.observe(seconds)
        if result.delivered:
            metrics.LAST_PUBLISH.labels(lane.tenant).set_to_current_time()
        if dead:
            metrics.DEAD.labels(lane.tenant).inc(dead)
        if result.failed:
            metrics.DELIVERY_FAILURES.labels(lane.tenant).inc(len(result.failed))
            first = next(
                (f for f in result.failed if f.verdict is not Verdict.COLLATERAL), result.failed[0]
            )
            log.warning(
                "tenant %s: Kafka did not confirm %d of %d events (%d now dead; first error: "
                "%s); the others stay pending and are retried with backoff",
                lane.tenant,
                len(result.failed),
                len(events),
                dead,
                first.error,
                extra=lane.log_extra(),
            )

    def _dead_letter(
        self, lane: Lane, events: list[PendingEvent], result: BatchResult, delivery: Delivery
    ) -> set[int]:
        """Copy the events this batch gives up on to the tenant's dead-letter topic, if it
        has one; return the ids whose copy Kafka did not confirm (they must not go dead)."""
        if not lane.dead_letter_topic:
            return set()
        by_id = {e.id: e for e in events}
        dying = [
            (by_id[f.id], f.error)
            for f in result.failed
            if f.verdict is Verdict.PERMANENT
            or (
                f.verdict is Verdict.RETRIABLE
                and by_id[f.id].attempts + 1 >= self.settings.max_attempts
            )
        ]
        if not dying:
            return set()
        try:
            copied = delivery.dead_letter(
                dying, topic=lane.dead_letter_topic, timeout=self.settings.delivery_timeout_seconds
            )
        except (RetriableError, KafkaException) as exc:
            if isinstance(exc, KafkaException) and exc.args[0].fatal():
                raise
            log.warning("tenant %s: dead-letter copy failed: %s", lane.tenant, exc)
            copied = set()
        metrics.DEAD_LETTERED.labels(lane.tenant).inc(len(copied))
        kept = {event.id for event, _ in dying if event.id not in copied}
        if kept:
            log.warning(
                "tenant %s: dead-letter topic %s did not confirm copies of %d events; they "
                "stay pending (retried with backoff) until a copy lands",
                lane.tenant,
                lane.dead_letter_topic,
                len(kept),
                extra=lane.log_extra(),
            )
        return kept

    def _attribute(
        self, lane: Lane, events: list[PendingEvent], result: BatchResult
    ) -> BatchResult:
        # Kafka reports a refused request against every message it carried, so a
        # "permanent" verdict is trusted only for a batch of one event.
        permanent = any(f.verdict is Verdict.PERMANENT for f in result.failed)
        if len(events) > 1 and permanent:
            log.warning(
                "tenant %s: Kafka refused a batch of %d events (%s); sending one at a time "
                "to find the event at fault",
                lane.tenant,
                len(events),
                next(f.error for f in result.failed if f.verdict is Verdict.PERMANENT),
                extra=lane.log_extra(),
            )
            lane.isolating = True
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
            lane.isolating = False
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
                "%s: closing with %d messages unconfirmed by Kafka; their rows stay "
                "pending and the next publisher sends them",
                self.owner,
                unconfirmed,
            )

    # -- locks and wake-ups ------------------------------------------------------------

    def _take_locks(self, raw: Any) -> None:
        """Try, once per poll interval, to lock every tenant not locked yet."""
        now = time.monotonic()
        if now < self.next_lock_try:
            return
        self.next_lock_try = now + self.settings.poll_interval_seconds
        for lane in self.lanes.values():
            if lane.holds_lock:
                continue
            with raw.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (advisory_lock_key(lane.tenant),))
                (locked,) = cur.fetchone()
            if locked:
                lane.holds_lock = True
                lane.recovered = False
                lane.due = True
                lane.standby_logged = False
                metrics.LOCK_HELD.labels(lane.tenant).set(1)
                log.info(
                    "%s: active publisher of tenant %s",
                    self.owner,
                    lane.tenant,
                    extra=lane.log_extra(),
                )
            elif not lane.standby_logged:
                log.info(
                    "another publisher holds tenant %s; %s waits as standby",
                    lane.tenant,
                    self.owner,
                    extra=lane.log_extra(),
                )
                lane.standby_logged = True
        self.heartbeat = time.monotonic()

    def _listen(self, raw: Any) -> None:
        raw.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        with raw.cursor() as cur:
            # The locks end with this session. A killed process closes its socket and
            # Postgres ends the session at once; a host that vanishes is noticed by
            # these keepalives within LOCK_RELEASE_SECONDS instead of the OS default
            # of hours, so a standby takes over within that bound.
            cur.execute(
                "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5;"
                f" SET tcp_keepalives_count = 3; SET tcp_user_timeout = {LOCK_RELEASE_SECONDS}000"
            )
            cur.execute(f"LISTEN {NOTIFY_CHANNEL}")

    def _check_lock_session(self) -> None:
        """Raise if the session holding the tenants' locks is gone (then so are the locks,
        and another publisher may be serving them)."""
        if self.lock_session is None:
            return  # driven batch by batch, outside `run` (tests, benchmarks)
        with self.lock_session.cursor() as cur:
            cur.execute("SELECT 1")

    def _collect_notifications(self, raw: Any) -> None:
        dbapi = raw.dbapi_connection
        dbapi.poll()
        for notification in dbapi.notifies:
            lane = self.lanes.get(TenantId(notification.payload))
            if lane is not None:
                lane.due = True
        dbapi.notifies.clear()
        # The polling fallback runs on time even while some tenant always has work.
        if time.monotonic() >= self.next_poll_tick:
            self.next_poll_tick = time.monotonic() + self.settings.poll_interval_seconds
            for lane in self.lanes.values():
                lane.due = True

    def _wait_for_notify(self, raw: Any, seconds: float, *, wake_at: float | None = None) -> None:
        """Wait up to `seconds` for a notification naming one of our tenants.

        A notification marks its tenant due; the end of the wait marks every tenant due
        (the polling fallback that covers lost notifications and expired backoffs).
        `wake_at` (monotonic) ends the wait earlier for housekeeping, without marking
        anyone due: the polling fallback still comes at its own time, from the end of a
        later wait or from `_collect_notifications` once the poll tick has passed.
        """
        dbapi = raw.dbapi_connection
        deadline = time.monotonic() + seconds
        end = deadline if wake_at is None else min(deadline, wake_at)
        while not self.stopping.is_set():
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select([dbapi], [], [], min(remaining, 0.5))
            if not readable:
                continue
            dbapi.poll()
            woken = [self.lanes.get(TenantId(n.payload)) for n in dbapi.notifies]
            dbapi.notifies.clear()
            ours = [lane for lane in woken if lane is not None]
            for lane in ours:
                lane.due = True
            if ours:
                return
        if time.monotonic() < deadline:
            return  # woken for housekeeping (or stopping)
        for lane in self.lanes.values():
            lane.due = True


def build_publisher(
    settings: PublisherSettings,
    engine: Engine,
    *,
    producer_overrides: dict[str, Any] | None = None,
) -> Publisher:
    """A publisher of the configured tenants (one: dedicated; several: shared) in the
    configured delivery mode."""
    served = settings.served_tenants()
    if not served:
        raise InvalidTenantConfig(
            "no tenant to publish: set SOMABRAIN_TENANT (or SOMABRAIN_TENANTS and SOMABRAIN_POOL)"
        )
    tenants = [parse_tenant_id(t) for t in served]
    owner = settings.owner
    # The producer must take every message enqueue accepted (SOMABRAIN_MAX_MESSAGE_BYTES).
    overrides = {
        "message.max.bytes": max(1_000_000, settings.max_message_bytes + 4096),
        **(producer_overrides or {}),
    }
    timeout = settings.delivery_timeout_seconds
    servers = settings.kafka_bootstrap_servers

    if settings.delivery_mode == "at-least-once":
        config = build_config(
            bootstrap_servers=servers, delivery_timeout_seconds=timeout, overrides=overrides
        )
        return Publisher(
            owner=owner,
            tenants=tenants,
            settings=settings,
            engine=engine,
            connect=lambda: IdempotentDelivery(config),
        )

    config = build_config(
        bootstrap_servers=servers,
        delivery_timeout_seconds=timeout,
        overrides=overrides,
        transactional_id=transactional_id(owner),
    )

    def connect() -> Delivery:
        ensure_checkpoint_topic(servers, settings.checkpoint_topic, timeout=timeout)
        return TransactionalDelivery(
            config, owner=owner, checkpoint_topic=settings.checkpoint_topic, timeout=timeout
        )

    def recover_rows(of: Sequence[TenantId]) -> int:
        return recover(
            engine=engine,
            bootstrap_servers=servers,
            tenants=of,
            topic=settings.checkpoint_topic,
            timeout=timeout,
        )

    return Publisher(
        owner=owner,
        tenants=tenants,
        settings=settings,
        engine=engine,
        connect=connect,
        recover=recover_rows,
    )
