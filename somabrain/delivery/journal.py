"""The local journal (opt-in): events a producer emits while the database is unreachable,
kept on local disk until they are in the outbox.

For producers that emit events outside a database transaction of their own
(`emit_event`). With a journal, an event the database cannot take now is appended to
the journal instead, fsynced before `emit_event` returns JOURNALED; migration moves
journaled events into the outbox later, by `somabrain journal migrate` or in the
background (`JournalMigrator`).

**Format.** A directory of segment files, each written by one process and named in the
order they were opened. One record per line: the CRC-32 of the record's JSON (8 hex
digits), a space, the JSON, a newline. A record holds the event as enqueue validated
and encoded it (`ValidatedEvent`), dedupe key included: an event without one gets a
fresh one when journaled, so migration is idempotent (a repeated dedupe key is a
duplicate the outbox ignores) and running it twice, or again after a crash half-way,
puts each event in the outbox once.

**Safety.**
- A writer holds an exclusive `flock` on its open segment. Migration never deletes a
  segment that is locked (still being written) or that holds a record it could not put
  in the outbox (corrupt, or its tenant over its backlog cap); it deletes a segment
  only after every record in it is committed in the database.
- A torn last record (the process died mid-write: no newline, or a tail that does not
  match its checksum) is reported and skipped; the records before it are migrated. A
  record that does not match its checksum with good records after it is corruption,
  not a torn write: it is reported and its segment kept for a person to look at.
- Order: a producer's events keep their order per key. While its journal holds events
  not yet migrated, `emit_event` appends to the journal even when the database is back,
  so no later event reaches the outbox before an earlier one; migration inserts each
  tenant's records in journal order, and once one of a tenant's records cannot be
  inserted, none of its later ones are.
- A commit whose outcome is unknown (the connection lost during COMMIT) is journaled
  too: the journaled copy has the dedupe key the row may already have, so migration
  finds it there and adds nothing.
- Bounded: appending beyond `max_bytes` raises JournalFull; nothing is dropped.

One directory per producer process (a pod's volume); the CLI can migrate it from
anywhere that mounts it.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from sqlalchemy import Engine, func, select, tuple_
from sqlalchemy.orm import Session

from somabrain.config.errors import BacklogOverCap, PermanentError, RetriableError
from somabrain.config.types import TenantId
from somabrain.store.models import OutboxEvent
from somabrain.store.outbox import (
    EnqueueResult,
    EnqueueStatus,
    NewEvent,
    ValidatedEvent,
    enqueue_validated,
    validate_events,
)

log = logging.getLogger(__name__)

SUFFIX = ".journal"
_VERSION = 1


class JournalFull(RetriableError):
    """The journal is at its size limit; the event was not written anywhere."""


class JournalCorrupt(PermanentError):
    """A journal file holds a record that does not match its checksum."""


# Errors that mean "the database cannot be reached now", as opposed to a refusal of the
# event (InvalidEvent, BacklogOverCap) or a bug.
UNREACHABLE = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


def encode_record(row: ValidatedEvent, *, at: dt.datetime | None = None) -> bytes:
    """One journal line for a validated event."""
    body = json.dumps(
        {
            "v": _VERSION,
            "at": (at or dt.datetime.now(dt.UTC)).isoformat(),
            "event": list(row),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_record(line: bytes) -> ValidatedEvent | None:
    """The event of one line (without its newline), or None if the line does not match
    its checksum or is not a record."""
    crc, _, body = line.partition(b" ")
    if len(crc) != 8 or not body:
        return None
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
        fields = record["event"]
        if record.get("v") != _VERSION or not isinstance(fields, list):
            return None
        return ValidatedEvent(*fields)
    except (ValueError, KeyError, TypeError):
        return None


class Journal:
    """The appending side, for one process: thread-safe, one open segment at a time."""

    def __init__(
        self,
        directory: Path,
        *,
        max_segment_bytes: int = 64 * 1024 * 1024,
        max_bytes: int = 1024 * 1024 * 1024,
        max_message_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.max_segment_bytes = max_segment_bytes
        self.max_bytes = max_bytes
        self.max_message_bytes = max_message_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._seq = 0
        # Segments left by an earlier run hold events not in the outbox yet: later
        # events wait behind them, in the journal.
        self._backlogged = any(directory.glob(f"*{SUFFIX}"))
        self._total = self._journal_bytes()

    @property
    def backlogged(self) -> bool:
        """True while the journal may hold events not yet in the outbox."""
        return self._backlogged

    def append(self, rows: Sequence[ValidatedEvent]) -> None:
        """Write the events and fsync once for all of them; when this returns they
        survive a crash of the process or the machine."""
        lines = b"".join(encode_record(r) for r in rows)
        with self._lock:
            # The running total counts what this process wrote since it last looked;
            # migration deletes files meanwhile, so near the limit the directory is
            # measured again before refusing.
            if self._total + len(lines) > self.max_bytes:
                self._total = self._journal_bytes()
            if self._total + len(lines) > self.max_bytes:
                raise JournalFull(
                    f"journal {self.directory} is at its limit of {self.max_bytes} bytes; "
                    "migrate it (somabrain journal migrate) or give it more room"
                )
            if self._fd is None or self._size + len(lines) > self.max_segment_bytes:
                self._open_segment()
            assert self._fd is not None
            view = memoryview(lines)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
            self._size += len(lines)
            self._total += len(lines)
            self._backlogged = True

    def _journal_bytes(self) -> int:
        total = 0
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def _open_segment(self) -> None:
        self._close_segment()
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}{SUFFIX}"
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _fsync_directory(self.directory)  # the new name survives a crash too
        self._fd, self._path, self._size = fd, path, 0

    def _close_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock: migration may now delete it
            self._fd, self._path = None, None

    def seal(self) -> None:
        """Close the open segment so that migration can finish and delete it; the next
        append opens a new one."""
        with self._lock:
            self._close_segment()

    def drain(self, migrate: Callable[[], MigrationReport]) -> MigrationReport:
        """Migrate what was appended last with appends held back, and leave the
        backlogged state if nothing is left: events emitted meanwhile then wait for
        this short pass, and none reaches the outbox before an earlier one."""
        with self._lock:
            self._close_segment()
            report = migrate()
            if not any(self.directory.glob(f"*{SUFFIX}")):
                self._backlogged = False
            return report

    def close(self) -> None:
        self.seal()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def emit_events(
    engine: Engine,
    events: Sequence[NewEvent],
    *,
    journal: Journal | None = None,
) -> list[EnqueueResult]:
    """Enqueue events in a transaction of their own; with a journal, journal them
    when the database cannot be reached.

    Events are validated first, as `enqueue_events` does: an invalid one raises
    InvalidEvent whatever the database's state, and nothing is written. A tenant over
    its backlog cap raises BacklogOverCap (the journal is not a way around the cap).
    Without a journal, an unreachable database raises as it would for any enqueue.
    """
    limit = journal.max_message_bytes if journal is not None else None
    rows = validate_events(events, limit)
    if journal is not None and journal.backlogged:
        return _journaled(journal, rows)
    try:
        with Session(engine) as session, session.begin():
            return enqueue_validated(session, rows)
    except UNREACHABLE as exc:
        if journal is None:
            raise
        log.warning(
            "database unreachable (%s); %d events journaled in %s",
            str(exc.orig if hasattr(exc, "orig") else exc).strip().splitlines()[0],
            len(rows),
            journal.directory,
        )
        return _journaled(journal, rows)


def emit_event(
    engine: Engine,
    *,
    tenant_id: str,
    topic: str,
    payload: Any,
    key: str | None = None,
    dedupe_key: str | None = None,
    event_type: str | None = None,
    headers: dict[str, str] | None = None,
    journal: Journal | None = None,
) -> EnqueueResult:
    """One event in a transaction of its own; see `emit_events`."""
    event = NewEvent(
        tenant_id=tenant_id,
        topic=topic,
        payload=payload,
        key=key,
        dedupe_key=dedupe_key,
        event_type=event_type,
        headers=headers,
    )
    return emit_events(engine, [event], journal=journal)[0]


def _journaled(journal: Journal, rows: Sequence[ValidatedEvent]) -> list[EnqueueResult]:
    journal.append(rows)
    return [
        EnqueueResult(EnqueueStatus.JOURNALED, None, TenantId(r.tenant_id), r.dedupe_key)
        for r in rows
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class Damage:
    """A record migration could not read."""

    path: Path
    line: int  # 1-based
    length: int  # bytes
    torn: bool  # the tail of a segment no longer written: a write cut short


@dataclasses.dataclass(slots=True)
class TenantTally:
    records: int = 0
    inserted: int = 0
    duplicates: int = 0  # already in the outbox (an earlier migration, or enqueued twice)
    held: str | None = None  # why the rest of this tenant's records wait


@dataclasses.dataclass(slots=True)
class MigrationReport:
    """What a migration found and did (or, in a dry run, would do)."""

    dry_run: bool
    tenants: dict[str, TenantTally] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(TenantTally)
    )
    damaged: list[Damage] = dataclasses.field(default_factory=list)
    deleted: list[Path] = dataclasses.field(default_factory=list)
    kept: dict[Path, str] = dataclasses.field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(t.records for t in self.tenants.values())


@dataclasses.dataclass(frozen=True, slots=True)
class _Segment:
    path: Path
    rows: list[ValidatedEvent]
    damaged: list[Damage]
    writing: bool  # another holder of the lock (a live writer) is still appending


def segments(directory: Path) -> list[Path]:
    """The journal's segments, oldest first."""
    return sorted(directory.glob(f"*{SUFFIX}"))


@dataclasses.dataclass
class _Locked:
    fd: int | None


def _read_segment(path: Path, lock: _Locked) -> _Segment:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        writing = False
    except BlockingIOError:
        writing = True
    with os.fdopen(os.dup(fd), "rb") as f:
        data = f.read()
    if writing:
        os.close(fd)
    else:
        lock.fd = fd  # held until the segment is deleted or kept
    pieces = data.split(b"\n")
    complete, tail = pieces[:-1], pieces[-1]
    decoded = [decode_record(p) for p in complete]
    good_after = [False] * len(decoded)
    seen_good = False
    for i in range(len(decoded) - 1, -1, -1):
        good_after[i] = seen_good
        seen_good = seen_good or decoded[i] is not None
    rows: list[ValidatedEvent] = []
    damaged: list[Damage] = []
    for i, row in enumerate(decoded):
        if row is not None:
            rows.append(row)
        else:
            # Bad lines with no good one after them, in a segment nobody writes any
            # more, are a write cut short; anywhere else, corruption.
            torn = not writing and not good_after[i]
            damaged.append(Damage(path, i + 1, len(complete[i]), torn=torn))
    # A live writer's last line may be half-way through its write: left for later.
    if tail and not writing:
        damaged.append(Damage(path, len(complete) + 1, len(tail), torn=True))
    return _Segment(path, rows, damaged, writing)


def migrate_journal(
    directory: Path,
    engine: Engine,
    *,
    tenants: Sequence[str] | None = None,
    dry_run: bool = False,
    batch: int = 500,
    on_records: Callable[[int], None] | None = None,
) -> MigrationReport:
    """Move the journal's events into the outbox (only `tenants`' when given), oldest
    segment first, and delete each segment once all its records are committed.

    Idempotent: records already in the outbox (same tenant and dedupe key) count as
    duplicates. A dry run reads everything, asks the database which records are there
    already, and changes nothing. Raises the database's error if it is unreachable;
    what was committed before stays committed.
    """
    report = MigrationReport(dry_run=dry_run)
    wanted = None if tenants is None else set(tenants)
    for path in segments(directory):
        lock = _Locked(None)
        try:
            segment = _read_segment(path, lock)
        except FileNotFoundError:
            continue  # deleted by another migration meanwhile
        try:
            _migrate_segment(segment, engine, report, wanted, dry_run, batch, on_records)
        finally:
            if lock.fd is not None:
                os.close(lock.fd)
    for damage in report.damaged:
        what = "a write cut short at the end" if damage.torn else "does not match its checksum"
        log.warning(
            "journal %s line %d (%d bytes): %s; skipped",
            damage.path,
            damage.line,
            damage.length,
            what,
        )
    return report


def _migrate_segment(
    segment: _Segment,
    engine: Engine,
    report: MigrationReport,
    wanted: set[str] | None,
    dry_run: bool,
    batch: int,
    on_records: Callable[[int], None] | None,
) -> None:
    report.damaged += segment.damaged
    by_tenant: dict[str, list[ValidatedEvent]] = collections.defaultdict(list)
    for row in segment.rows:
        by_tenant[row.tenant_id].append(row)
    complete = True
    for tenant, rows in by_tenant.items():
        if wanted is not None and tenant not in wanted:
            complete = False
            continue
        tally = report.tenants[tenant]
        tally.records += len(rows)
        if tally.held is not None:
            complete = False
            continue
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            try:
                inserted = _insert(engine, chunk, dry_run)
            except BacklogOverCap as exc:
                tally.held = str(exc)
                complete = False
                break
            tally.inserted += inserted
            tally.duplicates += len(chunk) - inserted
            if on_records is not None:
                on_records(len(chunk))
    corrupt = [d for d in segment.damaged if not d.torn]
    if dry_run:
        return
    if segment.writing:
        report.kept[segment.path] = "still being written"
    elif corrupt:
        report.kept[segment.path] = f"{len(corrupt)} records do not match their checksum"
    elif not complete:
        report.kept[segment.path] = "holds records not migrated"
    else:
        segment.path.unlink(missing_ok=True)
        report.deleted.append(segment.path)


def _insert(engine: Engine, rows: Sequence[ValidatedEvent], dry_run: bool) -> int:
    """Insert the rows in one transaction; how many were new."""
    with Session(engine) as session, session.begin():
        if dry_run:
            keys = {(r.tenant_id, r.dedupe_key) for r in rows}
            present = session.execute(
                select(func.count()).where(
                    tuple_(OutboxEvent.tenant_id, OutboxEvent.dedupe_key).in_(list(keys))
                )
            ).scalar_one()
            return len(keys) - int(present)
        results = enqueue_validated(session, rows)
    return sum(1 for r in results if r.status is EnqueueStatus.ENQUEUED)


class JournalMigrator:
    """Migrates a process's journal in the background while it holds events: every
    `interval` seconds, sealing the open segment first so that it can be deleted."""

    def __init__(self, journal: Journal, engine: Engine, *, interval: float = 5.0) -> None:
        self.journal = journal
        self.engine = engine
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-migrator", daemon=True)

    def start(self) -> JournalMigrator:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def run_once(self) -> MigrationReport | None:
        """One pass, if the journal holds anything; None if it did not."""
        if not self.journal.backlogged:
            return None
        # First with appends going on (to a new segment), then the little appended
        # meanwhile with appends held back.
        self.journal.seal()
        report = migrate_journal(self.journal.directory, self.engine)
        if not report.kept or set(report.kept.values()) == {"still being written"}:
            final = self.journal.drain(lambda: migrate_journal(self.journal.directory, self.engine))
            _merge(report, final)
        if report.records:
            log.info(
                "journal %s: %d events migrated to the outbox, %d already there",
                self.journal.directory,
                sum(t.inserted for t in report.tenants.values()),
                sum(t.duplicates for t in report.tenants.values()),
            )
        return report

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except UNREACHABLE:
                continue  # still unreachable; the next pass tries again
            except Exception:
                log.exception("journal %s: migration failed; retrying", self.journal.directory)


def _merge(into: MigrationReport, more: MigrationReport) -> None:
    for tenant, tally in more.tenants.items():
        mine = into.tenants[tenant]
        mine.records += tally.records
        mine.inserted += tally.inserted
        mine.duplicates += tally.duplicates
        mine.held = mine.held or tally.held
    into.damaged += more.damaged
    into.deleted += more.deleted
    into.kept = {**{p: r for p, r in into.kept.items() if p.exists()}, **more.kept}
