"""The local journal and admin replay, each against a reference doing the same work
without them, measured in the same run.

- append, one event per call (one fsync each), against the reference: the same lines
  written with `os.write` and fsynced one by one into a plain file in the same directory;
- append, 100 events per call (one fsync per group), against the same reference grouped
  the same way;
- migration of the journaled events into the outbox (`migrate_journal`, batches of
  500), against `enqueue_validated` of the same validated rows in the same batches (the
  insert the migration ends in, without reading, checking and deleting files);
- replay of dead rows (`run_replay`, chunks of 500, audited), against one plain
  `UPDATE ... SET status = 'pending'` of the same number of dead rows.

Every round measures all of them on fresh rows in a database of the run's own; the
medians over rounds are the headline. Results go to bench/results/journal.json.
Run: `.venv/bin/python -m bench.journal`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from bench.common import (
    ROOT,
    command_line,
    fresh_database,
    local_stack,
    machine,
    progress,
    write_result,
)
from somabrain.delivery.journal import Journal, encode_record, migrate_journal
from somabrain.store import admin, migrate
from somabrain.store.engine import make_engine, make_sessionmaker
from somabrain.store.outbox import NewEvent, ValidatedEvent, enqueue_validated, validate_events

RESULTS = ROOT / "bench" / "results" / "journal.json"


def _rows(tenant: str, count: int) -> list[ValidatedEvent]:
    run = uuid.uuid4().hex[:8]
    return validate_events(
        [
            NewEvent(
                tenant_id=tenant,
                topic="bench.journal",
                key=f"k{i % 100}",
                dedupe_key=f"{run}-{i}",
                payload={"n": i, "pad": "x" * 200},
            )
            for i in range(count)
        ]
    )


def _per_second(count: int, started: float) -> float:
    return count / (time.perf_counter() - started)


def raw_appends(directory: Path, rows: list[ValidatedEvent], group: int) -> float:
    lines = [encode_record(r) for r in rows]
    fd = os.open(directory / "reference.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        started = time.perf_counter()
        for start in range(0, len(lines), group):
            os.write(fd, b"".join(lines[start : start + group]))
            os.fsync(fd)
        return _per_second(len(lines), started)
    finally:
        os.close(fd)


def journal_appends(directory: Path, rows: list[ValidatedEvent], group: int) -> float:
    journal = Journal(directory)
    started = time.perf_counter()
    for start in range(0, len(rows), group):
        journal.append(rows[start : start + group])
    per_second = _per_second(len(rows), started)
    journal.close()
    return per_second


def migration(directory: Path, engine: Engine, count: int) -> float:
    started = time.perf_counter()
    report = migrate_journal(directory, engine, batch=500)
    per_second = _per_second(count, started)
    assert sum(t.inserted for t in report.tenants.values()) == count, report
    return per_second


def plain_inserts(engine: Engine, rows: list[ValidatedEvent]) -> float:
    sessions = make_sessionmaker(engine)
    started = time.perf_counter()
    for start in range(0, len(rows), 500):
        with sessions.begin() as session:
            enqueue_validated(session, rows[start : start + 500])
    return _per_second(len(rows), started)


def _dead(engine: Engine, tenant: str, count: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_events (tenant_id, topic, dedupe_key, payload, status,"
                " attempts, last_error)"
                " SELECT :t, 'bench.replay', 'd-' || g, '{}'::jsonb, 'dead', 9, 'gave up'"
                " FROM generate_series(1, :n) g"
            ),
            {"t": tenant, "n": count},
        )


def replay(engine: Engine, tenant: str, count: int) -> float:
    started = time.perf_counter()
    result = admin.run_replay(
        make_sessionmaker(engine),
        admin.EventFilter(tenant_id=tenant),  # type: ignore[arg-type]
        actor="bench",
        chunk=500,
    )
    per_second = _per_second(count, started)
    assert result.rows == count, result
    return per_second


def plain_update(engine: Engine, tenant: str, count: int) -> float:
    started = time.perf_counter()
    with engine.begin() as conn:
        changed = conn.execute(
            text(
                "UPDATE outbox_events SET status = 'pending', attempts = 0,"
                " next_attempt_at = now() WHERE tenant_id = :t AND status = 'dead'"
            ),
            {"t": tenant},
        ).rowcount
    per_second = _per_second(count, started)
    assert changed == count
    return per_second


def _round(engine: Engine, number: int, events: int, replays: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=ROOT / ".devenv") as scratch:
        base = Path(scratch)
        for group in (1, 100):
            rows = _rows(f"bench-append-{group}-{number}", events)
            (base / f"raw-{group}").mkdir()
            figures[f"raw_append_group_{group}"] = raw_appends(base / f"raw-{group}", rows, group)
            figures[f"journal_append_group_{group}"] = journal_appends(
                base / f"journal-{group}", rows, group
            )
        migrated = _rows(f"bench-migrate-{number}", events)
        journal = Journal(base / "to-migrate")
        for start in range(0, events, 100):
            journal.append(migrated[start : start + 100])
        journal.close()
        figures["migrate_journal"] = migration(base / "to-migrate", engine, events)
        figures["insert_reference"] = plain_inserts(engine, _rows(f"bench-insert-{number}", events))
    _dead(engine, f"bench-replay-{number}", replays)
    figures["run_replay"] = replay(engine, f"bench-replay-{number}", replays)
    _dead(engine, f"bench-update-{number}", replays)
    figures["update_reference"] = plain_update(engine, f"bench-update-{number}", replays)
    for name, value in figures.items():
        progress(f"round {number}: {name} {value:,.0f} rows/s")
    return figures


def _ratios(f: dict[str, float]) -> dict[str, float]:
    return {
        "journal_append_vs_raw_group_1": round(
            f["journal_append_group_1"] / f["raw_append_group_1"], 3
        ),
        "journal_append_vs_raw_group_100": round(
            f["journal_append_group_100"] / f["raw_append_group_100"], 3
        ),
        "migrate_vs_insert": round(f["migrate_journal"] / f["insert_reference"], 3),
        "replay_vs_update": round(f["run_replay"] / f["update_reference"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.journal", description=__doc__)
    parser.add_argument("--events", type=int, default=5_000, help="events appended/migrated")
    parser.add_argument("--replays", type=int, default=50_000, help="dead rows replayed")
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
            figures = _round(engine, number, args.events, args.replays)
            rounds.append(
                {
                    "rows_per_second": {k: round(v) for k, v in figures.items()},
                    "ratios": _ratios(figures),
                }
            )
        engine.dispose()
    result = {
        "command": command_line("bench.journal"),
        "events": args.events,
        "replays": args.replays,
        "median_ratios": {
            name: round(statistics.median(r["ratios"][name] for r in rounds), 3)
            for name in rounds[0]["ratios"]
        },
        "median_rows_per_second": {
            name: round(statistics.median(r["rows_per_second"][name] for r in rounds))
            for name in rounds[0]["rows_per_second"]
        },
        "rounds": rounds,
        "machine": machine(),
    }
    write_result(RESULTS, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
