"""Shared mode on the real database and broker: one publisher serving several tenants
in fair turns, with per-tenant quotas, and tenants moving between publishers."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from somabrain import NewEvent, enqueue_event, enqueue_events
from somabrain.config.errors import BacklogOverCap
from somabrain.config.settings import PublisherSettings
from somabrain.config.types import TenantId
from somabrain.delivery.publisher import BACKLOG_REPORT_SECONDS, Publisher, build_publisher
from somabrain.store.outbox import claim_pending
from tests.support import event_id, read_committed, wait_for


def _settings(bootstrap: str, **values: Any) -> PublisherSettings:
    defaults: dict[str, Any] = {"poll_interval_seconds": 0.2, "shutdown_grace_seconds": 2}
    return PublisherSettings(kafka_bootstrap_servers=bootstrap, **(defaults | values))


def _pool(engine: Engine, bootstrap: str, tenants: list[str], **values: Any) -> Publisher:
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    return build_publisher(_settings(bootstrap, tenants=tenants, pool=pool, **values), engine)


def _tenants(count: int) -> list[str]:
    return [f"s{uuid.uuid4().hex[:9]}" for _ in range(count)]


def _status(engine: Engine, tenant: str) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            str(s): int(n)
            for s, n in conn.execute(
                text("SELECT status, count(*) FROM outbox_events WHERE tenant_id = :t GROUP BY 1"),
                {"t": tenant},
            )
        }


def _flood(engine: Engine, tenant: str, topic: str, count: int) -> None:
    """Insert `count` pending rows for `tenant` at once, as a bulk producer would."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_events (tenant_id, topic, message_key, dedupe_key, payload)"
                " SELECT :t, :topic, 'k' || (g % 50), 'flood-' || g, '{\"n\": 1}'::jsonb"
                " FROM generate_series(1, :n) AS g"
            ),
            {"t": tenant, "topic": topic, "n": count},
        )


def _assert_once_in_key_order(bootstrap: str, topic: str, engine: Engine, tenant: str) -> None:
    with engine.connect() as conn:
        rows = [
            (str(r[0]), r[1])
            for r in conn.execute(
                text("SELECT event_id, message_key FROM outbox_events WHERE tenant_id = :t"),
                {"t": tenant},
            )
        ]
    records = read_committed(bootstrap, topic, expected=len(rows))
    ids = [event_id(r) for r in records]
    assert sorted(ids) == sorted(r[0] for r in rows)  # each committed row once, no more
    by_key: dict[str, list[str]] = {}
    for record in records:
        by_key.setdefault(record.key().decode(), []).append(event_id(record))
    with engine.connect() as conn:
        order = {
            str(r[0]): int(r[1])
            for r in conn.execute(
                text("SELECT event_id, id FROM outbox_events WHERE tenant_id = :t"), {"t": tenant}
            )
        }
    for key_ids in by_key.values():
        assert [order[i] for i in key_ids] == sorted(order[i] for i in key_ids)


@pytest.mark.parametrize("mode", ["exactly-once", "at-least-once"])
def test_one_shared_publisher_delivers_every_tenant_once_in_key_order(
    mode: str,
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    run_publisher: Callable[[Publisher], Publisher],
) -> None:
    tenants = _tenants(4)
    with sessions.begin() as session:
        for i in range(400):
            tenant = tenants[i % 4]
            enqueue_event(
                session, tenant_id=tenant, topic=f"{tenant}.orders", key=f"k{i % 7}", payload={}
            )

    run_publisher(_pool(engine, bootstrap, tenants, batch_size=30, delivery_mode=mode))

    for tenant in tenants:
        assert wait_for(lambda t=tenant: _status(engine, t) == {"sent": 100}, timeout=60)
    for tenant in tenants:
        _assert_once_in_key_order(bootstrap, f"{tenant}.orders", engine, tenant)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "dedicated"])
def test_a_flood_from_one_tenant_does_not_delay_another(
    shared: bool,
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    run_publisher: Callable[[Publisher], Publisher],
) -> None:
    """O-16: A enqueues 100,000 events at once, B one. B's event is published within a
    bound set by one turn of A (shared mode) or by what the shared database and broker
    give each publisher (dedicated mode), not by A's backlog: A still holds almost all
    of it when B's event is out."""
    flooding, small = _tenants(2)
    _flood(engine, flooding, f"{flooding}.flood", 100_000)
    if shared:
        run_publisher(_pool(engine, bootstrap, [flooding, small], batch_size=200))
    else:
        for tenant in (flooding, small):
            run_publisher(build_publisher(_settings(bootstrap, tenant=tenant), engine))
    assert wait_for(lambda: _status(engine, flooding).get("sent", 0) >= 1_000, timeout=60)

    enqueued = time.monotonic()
    with sessions.begin() as session:
        enqueue_event(session, tenant_id=small, topic=f"{small}.orders", key="k", payload={})
    assert wait_for(lambda: _status(engine, small) == {"sent": 1}, timeout=30)
    waited = time.monotonic() - enqueued

    assert _status(engine, flooding).get("pending", 0) >= 80_000
    # One turn of A is one batch: far below a second on any machine that can run this
    # suite; the generous bound only guards against B waiting for A's backlog.
    assert waited < 10


def test_an_events_per_second_quota_caps_a_tenant_but_not_its_neighbour(
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    run_publisher: Callable[[Publisher], Publisher],
    tmp_path: Path,
) -> None:
    limited, free = _tenants(2)
    config = tmp_path / "tenants.yaml"
    config.write_text(f"tenants:\n  {limited}:\n    events_per_second: 20\n", encoding="utf-8")
    for tenant in (limited, free):
        _flood(engine, tenant, f"{tenant}.q", 300)

    started = time.monotonic()
    run_publisher(
        _pool(engine, bootstrap, [limited, free], batch_size=50, tenant_config_file=config),
    )
    assert wait_for(lambda: _status(engine, free) == {"sent": 300}, timeout=60)
    time.sleep(1.0)
    sent = _status(engine, limited).get("sent", 0)
    elapsed = time.monotonic() - started

    # A bucket holds one batch (50) and refills at 20/s: never more than that.
    assert 0 < sent <= 50 + 20 * elapsed
    assert sent < 300


def test_a_quota_change_in_the_tenant_file_applies_without_a_restart(
    engine: Engine,
    bootstrap: str,
    run_publisher: Callable[[Publisher], Publisher],
    tmp_path: Path,
) -> None:
    limited, other = _tenants(2)
    config = tmp_path / "tenants.yaml"
    config.write_text(
        f"tenants:\n  {limited}:\n    events_per_second: 1\n    batch_size: 1\n", encoding="utf-8"
    )
    _flood(engine, limited, f"{limited}.q", 200)
    publisher = run_publisher(
        _pool(engine, bootstrap, [limited, other], batch_size=50, tenant_config_file=config),
    )
    assert wait_for(lambda: _status(engine, limited).get("sent", 0) >= 1, timeout=30)
    assert _status(engine, limited).get("sent", 0) < 20

    config.write_text(f"tenants:\n  {limited}: {{}}\n", encoding="utf-8")

    assert wait_for(lambda: _status(engine, limited) == {"sent": 200}, timeout=60)
    assert publisher.lane(limited).quota.events_per_second is None


def test_a_tenant_locked_by_a_dedicated_publisher_waits_in_the_pool_and_moves_when_it_stops(
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    run_publisher: Callable[[Publisher], Publisher],
) -> None:
    moving, neighbour = _tenants(2)
    dedicated = run_publisher(build_publisher(_settings(bootstrap, tenant=moving), engine))
    assert wait_for(lambda: dedicated.ready, timeout=30)
    pool = run_publisher(_pool(engine, bootstrap, [moving, neighbour]))
    assert wait_for(lambda: pool.lane(neighbour).holds_lock, timeout=30)
    assert not pool.lane(moving).holds_lock

    def enqueue(tenant: str, count: int) -> None:
        with sessions.begin() as session:
            for i in range(count):
                enqueue_event(
                    session, tenant_id=tenant, topic=f"{tenant}.m", key=f"k{i % 3}", payload={}
                )

    enqueue(moving, 50)
    enqueue(neighbour, 50)
    assert wait_for(lambda: _status(engine, moving) == {"sent": 50}, timeout=30)
    dedicated.stopping.set()
    assert wait_for(lambda: pool.lane(moving).holds_lock, timeout=30)
    enqueue(moving, 50)

    assert wait_for(lambda: _status(engine, moving) == {"sent": 100}, timeout=30)
    assert wait_for(lambda: _status(engine, neighbour) == {"sent": 50}, timeout=30)
    _assert_once_in_key_order(bootstrap, f"{moving}.m", engine, moving)


def test_a_batch_a_crashed_pool_committed_is_not_published_again_by_a_dedicated_publisher(
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    run_publisher: Callable[[Publisher], Publisher],
) -> None:
    """O-3 across modes: checkpoints are keyed by tenant, so whoever serves the tenant
    next finds the batch the pool committed in Kafka but never marked sent."""
    (tenant,) = _tenants(1)
    with sessions.begin() as session:
        for i in range(20):
            enqueue_event(session, tenant_id=tenant, topic=f"{tenant}.x", key=f"k{i}", payload={})
    pool = _pool(engine, bootstrap, [tenant, *_tenants(1)])
    delivery = pool.connect()
    with Session(engine) as session:
        batch = claim_pending(session, tenant_id=TenantId(tenant), limit=8)
    delivery.deliver(batch, timeout=10)  # committed in Kafka; the "crash" skips settling
    delivery.close(5)

    run_publisher(build_publisher(_settings(bootstrap, tenant=tenant), engine))

    assert wait_for(lambda: _status(engine, tenant) == {"sent": 20}, timeout=60)
    _assert_once_in_key_order(bootstrap, f"{tenant}.x", engine, tenant)


def test_a_quiet_tenants_notification_is_heard_while_a_neighbour_always_has_work(
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    run_publisher: Callable[[Publisher], Publisher],
) -> None:
    """The pool never runs out of work (A's flood), and B has been found idle: B's new
    event must still get the next turn, from its NOTIFY, not after A's backlog."""
    flooding, quiet = _tenants(2)
    _flood(engine, flooding, f"{flooding}.flood", 100_000)
    pool = run_publisher(
        _pool(engine, bootstrap, [flooding, quiet], batch_size=200, poll_interval_seconds=60)
    )
    assert wait_for(lambda: _status(engine, flooding).get("sent", 0) >= 1_000, timeout=60)
    assert wait_for(lambda: not pool.lane(quiet).due, timeout=30)

    with sessions.begin() as session:
        enqueue_event(session, tenant_id=quiet, topic=f"{quiet}.orders", key="k", payload={})

    assert wait_for(lambda: _status(engine, quiet) == {"sent": 1}, timeout=30)
    assert _status(engine, flooding).get("pending", 0) >= 80_000


def _reports(engine: Engine, tenants: list[str]) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """Each tenant's report row: when it was last counted and when its publisher was
    last seen (the database's clock, as enqueue and the operator read them)."""
    with engine.connect() as conn:
        return {
            str(r[0]): (r[1], r[2])
            for r in conn.execute(
                text(
                    "SELECT tenant_id, counted_at, publisher_seen_at FROM outbox_tenants"
                    " WHERE tenant_id = ANY(:ts)"
                    " AND counted_at IS NOT NULL AND publisher_seen_at IS NOT NULL"
                ),
                {"ts": tenants},
            )
        }


def _db_now(engine: Engine) -> dt.datetime:
    with engine.connect() as conn:
        now: dt.datetime = conn.execute(text("SELECT now()")).scalar_one()
    return now


def _assert_reported_every_interval(engine: Engine, tenants: list[str]) -> None:
    """Two rounds: each tenant's row is refreshed (counted_at and publisher_seen_at)
    within two report intervals from now, and then again within two intervals of its
    previous report."""
    interval = dt.timedelta(seconds=BACKLOG_REPORT_SECONDS)
    previous = dict.fromkeys(tenants, _db_now(engine))
    for _ in range(2):

        def refreshed(after: dict[str, dt.datetime]) -> bool:
            reports = _reports(engine, tenants)
            return all(t in reports and min(reports[t]) > after[t] for t in tenants)

        wait_for(lambda after=previous: refreshed(after), timeout=3 * BACKLOG_REPORT_SECONDS)
        reports = _reports(engine, tenants)
        missing = [n for n, t in enumerate(tenants, 1) if t not in reports]
        assert not missing, f"members {missing} of the {len(tenants)} never reported"
        for member, tenant in enumerate(tenants, 1):
            for stamp in reports[tenant]:  # counted_at, publisher_seen_at
                assert previous[tenant] < stamp <= previous[tenant] + 2 * interval, member
        previous = {t: reports[t][1] for t in tenants}


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_every_member_of_a_large_pool_reports_within_two_intervals_and_its_cap_holds(
    busy: bool,
    engine: Engine,
    sessions: sessionmaker[Session],
    bootstrap: str,
    run_publisher: Callable[[Publisher], Publisher],
    tmp_path: Path,
) -> None:
    """Every tenant of a 12-tenant pool has its row in outbox_tenants (backlog, cap,
    circuit, publisher) refreshed within two report intervals, idle or with a neighbour
    that always has work, at the default poll interval. A publisher that reported one
    tenant per idle turn (about 1 s) on a 5 s interval, first due tenant first, never
    reported members after the fifth: the operator saw them NoReport/ReportStale and
    enqueue never learnt their cap. The last member's cap (max_pending 2) is enforced
    from its report."""
    tenants = _tenants(12)
    late = tenants[-1]
    config = tmp_path / "tenants.yaml"
    config.write_text(f"tenants:\n  {late}:\n    max_pending: 2\n", encoding="utf-8")
    if busy:
        _flood(engine, tenants[0], f"{tenants[0]}.flood", 100_000)
    pool = run_publisher(
        _pool(
            engine,
            bootstrap,
            tenants,
            batch_size=200,
            delivery_mode="at-least-once",
            tenant_config_file=config,
            poll_interval_seconds=1.0,  # the default: an idle turn lasts about a second
        )
    )
    assert wait_for(lambda: pool.ready and all(lane.holds_lock for lane in pool.lanes.values()))
    if busy:
        assert wait_for(lambda: _status(engine, tenants[0]).get("sent", 0) >= 1_000, timeout=60)
    _assert_reported_every_interval(engine, tenants)
    if busy:
        assert _status(engine, tenants[0]).get("pending", 0) > 0  # busy all along

    with engine.connect() as conn:
        cap = conn.execute(
            text("SELECT max_pending FROM outbox_tenants WHERE tenant_id = :t"), {"t": late}
        ).scalar_one()
    assert cap == 2
    over = [NewEvent(tenant_id=late, topic=f"{late}.orders", payload={}) for _ in range(3)]
    with pytest.raises(BacklogOverCap) as refused, sessions.begin() as session:
        enqueue_events(session, over)
    assert (refused.value.tenant, refused.value.cap) == (late, 2)
    with sessions.begin() as session:
        enqueue_events(session, over[:2])  # up to the cap is accepted


def test_an_idle_publisher_with_a_poll_interval_longer_than_the_report_interval_still_reports(
    engine: Engine,
    bootstrap: str,
    run_publisher: Callable[[Publisher], Publisher],
) -> None:
    """An idle publisher waits up to a poll interval (at most 60 s) for a notification;
    it wakes for its reports too, or its rows would be older than the 30 s after which
    enqueue and the operator take it for gone."""
    tenants = _tenants(3)
    pool = run_publisher(
        _pool(engine, bootstrap, tenants, delivery_mode="at-least-once", poll_interval_seconds=60)
    )
    assert wait_for(lambda: pool.ready and all(lane.holds_lock for lane in pool.lanes.values()))
    _assert_reported_every_interval(engine, tenants)
