"""Drain throughput against its two ceilings, measured in one run on the local stack.

- producer ceiling: the same 1 KiB messages produced straight to Kafka by one
  transactional producer in batches of the same size, without a database;
- database ceiling: claiming and marking the same rows on the same table in batches,
  without Kafka;
- drain: the publisher draining those rows into Kafka (exactly-once and at-least-once),
  on an empty table and with a large number of sent rows present;
- shared drain: one publisher serving 100 tenants in turns (its real run loop, woken by
  polling), the same number of events spread over them.

Each figure is events per second; ratios compare the drain with the lower ceiling, and
with the serial bound (what a loop that does the two ceilings' work one after the
other could reach). The ceilings and drains are measured in rounds, back to back;
medians are kept. Results go to bench/results/drain.json. Run:
`.venv/bin/python -m bench.drain`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from bench.common import command_line, machine, progress, timestamp, write_result
from devenv import stack
from devenv.mainjob import create_topics
from somabrain.config.settings import PublisherSettings
from somabrain.config.types import TenantId
from somabrain.delivery.producer import build_config
from somabrain.delivery.publisher import build_publisher
from somabrain.store import migrate
from somabrain.store.engine import make_engine
from somabrain.store.outbox import Delivered, claim_pending, mark_sent

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "drain.json"
PAYLOAD = "x" * 1000  # with the JSON wrapping, a value of about 1 KiB


def seed(engine: Engine, tenant: str, topic: str, count: int, *, status: str = "pending") -> None:
    """Insert rows with one set-based INSERT (fast, and the same rows every run)."""
    sent = status == "sent"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_events (tenant_id, topic, message_key, dedupe_key, payload,"
                " status, sent_at, kafka_partition, kafka_offset)"
                " SELECT :tenant, :topic, 'k' || (g % 100), :run || g,"
                " jsonb_build_object('n', g, 'pad', CAST(:pad AS text)),"
                " :status, CASE WHEN :sent THEN now() END, CASE WHEN :sent THEN 0 END,"
                " CASE WHEN :sent THEN g END"
                " FROM generate_series(1, :count) AS g"
            ),
            {
                "tenant": tenant,
                "topic": topic,
                "run": uuid.uuid4().hex[:8],
                "pad": PAYLOAD,
                "status": status,
                "sent": sent,
                "count": count,
            },
        )
        conn.execute(text("ANALYZE outbox_events"))


def producer_ceiling(bootstrap: str, topic: str, count: int, batch: int) -> float:
    config = build_config(
        bootstrap_servers=bootstrap,
        delivery_timeout_seconds=30,
        overrides={},
        transactional_id=f"bench-{uuid.uuid4().hex[:6]}",
    )
    producer = Producer(config)
    producer.init_transactions(30)
    value = json.dumps({"n": 0, "pad": PAYLOAD}).encode()
    started = time.perf_counter()
    for start in range(0, count, batch):
        producer.begin_transaction()
        for i in range(start, min(start + batch, count)):
            producer.produce(topic, key=f"k{i % 100}".encode(), value=value)
            producer.poll(0)
        producer.flush(30)
        producer.commit_transaction(30)
    return count / (time.perf_counter() - started)


def database_ceiling(engine: Engine, tenant: str, count: int, batch: int) -> float:
    started = time.perf_counter()
    done = 0
    while done < count:
        with Session(engine) as session:
            rows = claim_pending(session, tenant_id=TenantId(tenant), limit=batch)
        if not rows:
            break
        with Session(engine) as session, session.begin():
            mark_sent(session, [Delivered(r.id, 0, r.id) for r in rows], tenant_id=tenant)
        done += len(rows)
    return done / (time.perf_counter() - started)


def drain(
    engine: Engine,
    database_url: str,
    bootstrap: str,
    tenant: str,
    mode: str,
    count: int,
    batch: int,
) -> float:
    settings = PublisherSettings(
        tenant=tenant,
        database_url=database_url,
        kafka_bootstrap_servers=bootstrap,
        batch_size=batch,
        delivery_mode=mode,
    )
    publisher = build_publisher(settings, engine)
    delivery = publisher.connect()
    if publisher.recover:
        publisher.recover(list(publisher.lanes))
    started = time.perf_counter()
    done = 0
    while done < count:
        claimed = publisher.drain_once(delivery)
        if claimed == 0:
            break
        done += claimed
    elapsed = time.perf_counter() - started
    delivery.close(10)
    with engine.connect() as conn:
        sent = conn.execute(
            text("SELECT count(*) FROM outbox_events WHERE tenant_id = :t AND status = 'sent'"),
            {"t": tenant},
        ).scalar_one()
    if sent != count:
        raise RuntimeError(f"drain left {count - sent} of {count} rows unsent")
    return count / elapsed


def drain_shared(
    engine: Engine,
    database_url: str,
    bootstrap: str,
    topic: str,
    count: int,
    batch: int,
    tenants: int,
) -> float:
    """Events/s of one shared publisher draining `count` events spread over `tenants`."""
    names = [f"bench-pool-{i:03d}" for i in range(tenants)]
    for name in names:
        seed(engine, name, topic, count // tenants)
    settings = PublisherSettings(
        tenants=names,
        pool="bench",
        database_url=database_url,
        kafka_bootstrap_servers=bootstrap,
        batch_size=batch,
        poll_interval_seconds=0.2,
    )
    publisher = build_publisher(settings, engine)
    thread = threading.Thread(target=publisher.run, daemon=True)
    expected = (count // tenants) * tenants
    started = time.perf_counter()
    thread.start()
    sent = 0
    try:
        while sent < expected and time.perf_counter() - started < 600:
            time.sleep(0.05)
            with engine.connect() as conn:
                sent = conn.execute(
                    text(
                        "SELECT count(*) FROM outbox_events WHERE tenant_id LIKE 'bench-pool-%'"
                        " AND status = 'sent'"
                    )
                ).scalar_one()
        elapsed = time.perf_counter() - started
    finally:
        publisher.stopping.set()
        thread.join(30)
    if sent != expected:
        raise RuntimeError(f"shared drain left {expected - sent} of {expected} rows unsent")
    return expected / elapsed


def _round(
    engine: Engine, database_url: str, bootstrap: str, topic: str, count: int, batch: int, n: int
) -> dict[str, float]:
    """One round of the two ceilings and the drain in both modes, back to back, so
    that the figures a ratio compares were measured under the same load."""
    figures = {"producer_ceiling": producer_ceiling(bootstrap, topic, count, batch)}
    seed(engine, f"bench-db-{n}", topic, count)
    figures["database_ceiling"] = database_ceiling(engine, f"bench-db-{n}", count, batch)
    for mode in ("exactly-once", "at-least-once"):
        tenant = f"bench-{mode.split('-')[0]}-{n}"
        seed(engine, tenant, topic, count)
        figures[f"drain_{mode}"] = drain(
            engine, database_url, bootstrap, tenant, mode, count, batch
        )
    return figures


def _ratios(f: dict[str, float]) -> dict[str, float]:
    lower = min(f["producer_ceiling"], f["database_ceiling"])
    # A loop that claims, then produces, then marks, one after the other, can at best
    # spend the time of both ceilings' work on each event: 1/(1/p + 1/d).
    serial = 1 / (1 / f["producer_ceiling"] + 1 / f["database_ceiling"])
    return {
        "drain_exactly_once_vs_lower_ceiling": f["drain_exactly-once"] / lower,
        "drain_at_least_once_vs_lower_ceiling": f["drain_at-least-once"] / lower,
        "drain_exactly_once_vs_serial_bound": f["drain_exactly-once"] / serial,
    }


def run(
    env: dict[str, str], *, count: int, batch: int, old_rows: int, rounds: int
) -> dict[str, Any]:
    database_url, bootstrap = env["DATABASE_URL"], env["KAFKA_BOOTSTRAP_SERVERS"]
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    topic = "bench.drain"
    create_topics(bootstrap, [topic], partitions=3)

    per_round = []
    for n in range(rounds):
        progress(f"round {n + 1} of {rounds}: ceilings and drains of {count} events")
        per_round.append(_round(engine, database_url, bootstrap, topic, count, batch, n))
    ratios_per_round = [_ratios(f) for f in per_round]
    figures = {k: statistics.median(f[k] for f in per_round) for k in per_round[0]}
    ratios = {k: statistics.median(r[k] for r in ratios_per_round) for k in ratios_per_round[0]}

    progress("one shared publisher draining 100 tenants")
    figures["drain_exactly-once_100_tenants_shared"] = drain_shared(
        engine, database_url, bootstrap, topic, count, batch, 100
    )
    progress(f"drain with {old_rows} sent rows present")
    seed(engine, "bench-old", topic, old_rows, status="sent")
    seed(engine, "bench-full", topic, count)
    figures["drain_exactly-once_with_old_sent_rows"] = drain(
        engine, database_url, bootstrap, "bench-full", "exactly-once", count, batch
    )
    seed(engine, "bench-empty-again", topic, count)
    # The reference for the old-rows figure is measured right after it, same table size
    # apart from the old rows' effect on the index.
    figures["drain_exactly-once_right_after"] = drain(
        engine, database_url, bootstrap, "bench-empty-again", "exactly-once", count, batch
    )
    engine.dispose()

    ratios["drain_100_tenants_shared_vs_one_tenant"] = (
        figures["drain_exactly-once_100_tenants_shared"] / figures["drain_exactly-once"]
    )
    ratios["drain_with_old_rows_vs_median_drain"] = (
        figures["drain_exactly-once_with_old_sent_rows"] / figures["drain_exactly-once"]
    )
    return {
        "command": command_line("bench.drain"),
        "finished_at": timestamp(),
        "events": count,
        "batch_size": batch,
        "rounds": rounds,
        "payload_bytes": len(json.dumps({"n": 0, "pad": PAYLOAD})),
        "sent_rows_present": old_rows,
        "events_per_second_median": {k: round(v) for k, v in figures.items()},
        "ratios_median": {k: round(v, 3) for k, v in ratios.items()},
        "rounds_events_per_second": [{k: round(v) for k, v in f.items()} for f in per_round],
        "peak_rss_mib_of_this_process": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__)
    parser.add_argument("--events", type=int, default=50_000, help="events per measure")
    parser.add_argument("--batch", type=int, default=500, help="rows per batch")
    parser.add_argument("--old-rows", type=int, default=1_000_000, help="sent rows present")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of ceilings and drains (medians kept)"
    )
    args = parser.parse_args(argv)
    state_dir = ROOT / ".devenv" / "bench"
    running = stack.up(state_dir, only=("postgres", "kafka"))
    try:
        result = run(
            stack.environment(running),
            count=args.events,
            batch=args.batch,
            old_rows=args.old_rows,
            rounds=args.rounds,
        )
    finally:
        stack.down(state_dir)
    write_result(RESULTS, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
