"""Enqueue throughput against a raw COPY of the same rows into the same table.

- reference: PostgreSQL's COPY of the same rows (tenant, topic, key, dedupe key,
  payload) into outbox_events, in chunks of the same size, one transaction per chunk,
  the payloads encoded to JSON text inside the timed loop;
- reference without encoding: the same COPY of rows whose payloads were encoded
  beforehand (what the database alone takes to store them);
- `enqueue_events`: the bulk API, one transaction per chunk;
- `enqueue_event`: one call per event, one transaction per chunk (the common case).

Every round measures all four, one after the other on fresh rows (each after a
VACUUM ANALYZE and a CHECKPOINT, in a database of the run's own), so each round's
ratios compare figures taken under the same load; the medians over rounds are the
headline. Each measure also records the CPU time per row of this process and of the
whole PostgreSQL server (backends and background processes): on a shared machine the
wall clock also counts waiting for a CPU, the CPU time does not.

Results go to bench/results/enqueue.json. Run: `.venv/bin/python -m bench.enqueue`.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text

from bench.common import (
    ROOT,
    command_line,
    fresh_database,
    local_stack,
    machine,
    process_tree_cpu_seconds,
    progress,
    write_result,
)
from somabrain import NewEvent, enqueue_event, enqueue_events
from somabrain.store import migrate
from somabrain.store.codec import encode_payload
from somabrain.store.engine import make_engine, make_sessionmaker

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


def _copy_line(e: NewEvent, payload: str) -> str:
    # COPY's text format: tab-separated; a backslash in the JSON text is doubled.
    escaped = payload.replace("\\", "\\\\")
    return f"{e.tenant_id}\t{e.topic}\t{e.key}\t{e.dedupe_key}\t{escaped}\n"


class _Clock:
    """Wall and CPU time (this process) of the measured part of a measure."""

    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


Measured = tuple[float, float]  # rows per second, client CPU seconds


def _copy(engine: Engine, events: list[NewEvent], chunk: int, *, encode_first: bool) -> Measured:
    encoded = [encode_payload(e.payload) for e in events] if encode_first else []
    raw: Any = engine.raw_connection()
    try:
        with _Clock() as clock:
            for start in range(0, len(events), chunk):
                buffer = io.StringIO()
                for i in range(start, min(start + chunk, len(events))):
                    e = events[i]
                    payload = encoded[i] if encode_first else encode_payload(e.payload)
                    buffer.write(_copy_line(e, payload))
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
    return len(events) / clock.wall, clock.cpu


def copy_rows(engine: Engine, events: list[NewEvent], chunk: int) -> Measured:
    return _copy(engine, events, chunk, encode_first=False)


def copy_encoded_rows(engine: Engine, events: list[NewEvent], chunk: int) -> Measured:
    return _copy(engine, events, chunk, encode_first=True)


def bulk(engine: Engine, events: list[NewEvent], chunk: int) -> Measured:
    sessions = make_sessionmaker(engine)
    with _Clock() as clock:
        for start in range(0, len(events), chunk):
            with sessions.begin() as session:
                enqueue_events(session, events[start : start + chunk])
    return len(events) / clock.wall, clock.cpu


def one_by_one(engine: Engine, events: list[NewEvent], chunk: int) -> Measured:
    sessions = make_sessionmaker(engine)
    with _Clock() as clock:
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
    return len(events) / clock.wall, clock.cpu


def _settle(engine: Engine) -> None:
    # Each measure starts from the same state: the previous one's dirty pages written
    # and the table vacuumed and analysed, so no background work it caused (autovacuum
    # after 50,000 inserts, a checkpoint) lands in the next one's figures.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE) outbox_events"))
        conn.execute(text("CHECKPOINT"))


MEASURES: dict[str, Callable[[Engine, list[NewEvent], int], Measured]] = {
    "copy_reference": copy_rows,
    "copy_reference_without_encoding": copy_encoded_rows,
    "enqueue_events": bulk,
    "enqueue_event": one_by_one,
}


def _cpu_ratios(cpu: dict[str, dict[str, float]]) -> dict[str, float]:
    def total(name: str) -> float:
        return cpu[name]["client"] + cpu[name]["database"]

    return {
        "enqueue_events_vs_copy": round(total("copy_reference") / total("enqueue_events"), 3),
        "enqueue_events_vs_copy_without_encoding": round(
            total("copy_reference_without_encoding") / total("enqueue_events"), 3
        ),
    }


def _ratios(figures: dict[str, float]) -> dict[str, float]:
    copy, raw_copy = figures["copy_reference"], figures["copy_reference_without_encoding"]
    return {
        "enqueue_events_vs_copy": round(figures["enqueue_events"] / copy, 3),
        "enqueue_event_vs_copy": round(figures["enqueue_event"] / copy, 3),
        "enqueue_events_vs_copy_without_encoding": round(figures["enqueue_events"] / raw_copy, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.enqueue", description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rounds: list[dict[str, Any]] = []
    with (
        local_stack(["postgres"]) as running,
        fresh_database(running.env["DATABASE_URL"]) as url,
    ):
        migrate.upgrade(url)
        engine = make_engine(url)
        for number in range(1, args.rounds + 1):
            figures: dict[str, float] = {}
            cpu: dict[str, dict[str, float]] = {}
            for name, measure in MEASURES.items():
                tenant = f"bench-{name.replace('_', '-')[:20]}-{number}"
                events = _events(tenant, args.events)
                _settle(engine)
                database = process_tree_cpu_seconds(running.pids["postgres"])
                figures[name], client = measure(engine, events, args.chunk)
                cpu[name] = {
                    "client": client / args.events * 1e6,
                    "database": (process_tree_cpu_seconds(running.pids["postgres"]) - database)
                    / args.events
                    * 1e6,
                }
                progress(
                    f"round {number}/{args.rounds}: {name} {figures[name]:,.0f} rows/s, "
                    f"CPU per row {cpu[name]['client']:.0f} us here + "
                    f"{cpu[name]['database']:.0f} us in PostgreSQL"
                )
            rounds.append(
                {
                    "rows_per_second": {k: round(v) for k, v in figures.items()},
                    "ratios": _ratios(figures),
                    "cpu_us_per_row": {
                        k: {part: round(us, 1) for part, us in v.items()} for k, v in cpu.items()
                    },
                    "rows_per_cpu_second_ratios": _cpu_ratios(cpu),
                }
            )
        engine.dispose()

    def median(kind: str) -> dict[str, float]:
        return {
            name: round(statistics.median(r[kind][name] for r in rounds), 3)
            for name in rounds[0][kind]
        }

    result = {
        "command": command_line("bench.enqueue"),
        "events": args.events,
        "chunk": args.chunk,
        "payload_bytes": len(encode_payload({"n": 0, "pad": "x" * 200})),
        "target": "enqueue_events >= 0.8 x copy_reference",
        "median_ratios": median("ratios"),
        "median_rows_per_cpu_second_ratios": median("rows_per_cpu_second_ratios"),
        "rounds": rounds,
        "machine": machine(),
    }
    write_result(RESULTS, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
