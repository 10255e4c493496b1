"""Enqueue throughput against a raw COPY of the same rows into the same table.

- reference: PostgreSQL's COPY of the same rows (tenant, topic, key, dedupe key,
  payload) into outbox_events, in chunks of the same size;
- `enqueue_events`: the bulk API, one transaction per chunk;
- `enqueue_event`: one call per event, one transaction per chunk (the common case).

Results go to bench/results/enqueue.json. Run: `.venv/bin/python -m bench.enqueue`.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from devenv import stack
from somabrain import NewEvent, enqueue_event, enqueue_events
from somabrain.store import migrate
from somabrain.store.codec import encode_payload
from somabrain.store.engine import make_engine, make_sessionmaker

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "enqueue.json"


def _events(tenant: str, count: int) -> list[NewEvent]:
    run = uuid.uuid4().hex[:8]
    return [
        NewEvent(
            tenant_id=tenant,
            topic="bench.enqueue",
            key=f"k{i % 100}",
            dedupe_key=f"{run}-{i}",
            payload={"n": i, "pad": "x" * 200},
        )
        for i in range(count)
    ]


def copy_rows(engine: Engine, events: list[NewEvent], chunk: int) -> float:
    raw: Any = engine.raw_connection()
    started = time.perf_counter()
    try:
        for start in range(0, len(events), chunk):
            buffer = io.StringIO()
            for e in events[start : start + chunk]:
                payload = encode_payload(e.payload).replace("\\", "\\\\")
                buffer.write(f"{e.tenant_id}\t{e.topic}\t{e.key}\t{e.dedupe_key}\t{payload}\n")
            buffer.seek(0)
            with raw.cursor() as cur:
                cur.copy_expert(
                    "COPY outbox_events (tenant_id, topic, message_key, dedupe_key, payload)"
                    " FROM STDIN",
                    buffer,
                )
            raw.commit()
    finally:
        raw.close()
    return len(events) / (time.perf_counter() - started)


def bulk(engine: Engine, events: list[NewEvent], chunk: int) -> float:
    sessions = make_sessionmaker(engine)
    started = time.perf_counter()
    for start in range(0, len(events), chunk):
        with sessions.begin() as session:
            enqueue_events(session, events[start : start + chunk])
    return len(events) / (time.perf_counter() - started)


def one_by_one(engine: Engine, events: list[NewEvent], chunk: int) -> float:
    sessions = make_sessionmaker(engine)
    started = time.perf_counter()
    for start in range(0, len(events), chunk):
        with sessions.begin() as session:
            for e in events[start : start + chunk]:
                enqueue_event(
                    session,
                    tenant_id=e.tenant_id,
                    topic=e.topic,
                    key=e.key,
                    dedupe_key=e.dedupe_key,
                    payload=e.payload,
                )
    return len(events) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.enqueue", description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--chunk", type=int, default=1000)
    args = parser.parse_args(argv)
    state_dir = ROOT / ".devenv" / "bench"
    running = stack.up(state_dir, only=("postgres",))
    try:
        url = stack.environment(running)["DATABASE_URL"]
        migrate.upgrade(url)
        engine = make_engine(url)
        figures = {
            "copy_reference": copy_rows(engine, _events("bench-copy", args.events), args.chunk),
            "enqueue_events": bulk(engine, _events("bench-bulk", args.events), args.chunk),
            "enqueue_event": one_by_one(engine, _events("bench-one", args.events), args.chunk),
        }
        engine.dispose()
    finally:
        stack.down(state_dir)
    result = {
        "events": args.events,
        "chunk": args.chunk,
        "rows_per_second": {k: round(v) for k, v in figures.items()},
        "ratios": {
            "enqueue_events_vs_copy": round(
                figures["enqueue_events"] / figures["copy_reference"], 3
            ),
            "enqueue_event_vs_copy": round(figures["enqueue_event"] / figures["copy_reference"], 3),
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
