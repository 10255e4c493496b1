"""The local journal (opt-in): events a producer emits while the database is unreachable,
kept on local disk until they are in the outbox.

For producers that emit events outside a database transaction of their own
(`emit_event`). With a journal, an event the database cannot take now is appended to
the journal instead, fsynced before `emit_event` returns JOURNALED; migration moves
journaled events into the outbox later, by `somabrain journal migrate` or in the
background (`JournalMigrator`).

**Format.** A directory of segment files named by a sequence number (never a clock),
so that they sort in the order they were started. One record per line: the CRC-32 of
the record's JSON (8 hex digits), a space, the JSON, a newline. A record holds the event
as enqueue validated and encoded it (`ValidatedEvent`), dedupe key included: an event
without one gets a fresh one when journaled, so migration is idempotent (a repeated
dedupe key is a duplicate the outbox ignores).

**Safety.**
- A writer opens, locks (`flock`), appends to, fsyncs and closes a segment for each
  append, and checks under the lock that the file it opened is still the one of that
  name; a migrator works on a segment under the same lock. A segment a migrator has
  replaced or deleted is never appended to: the writer starts a new one.
- After migrating a segment, the migrator deletes it if every record is committed in
  the database, or replaces it (write, fsync, rename) by a segment of the records still
  to migrate (a tenant over its backlog cap, a tenant not asked for): a record once
  committed is never migrated again, even after its row was purged from the outbox.
- A line that does not match its checksum is moved to `<segment>.corrupt`, reported
  with its line, and kept for a person to look at; it never holds back the rest.
- A last line without its newline is a write cut short (the process or the machine died
  in the middle of it, or the disk filled up): it was never acknowledged, and is
  reported and dropped. A failed append cuts the segment back to where it was before
  raising, or, if it cannot, starts a new segment for the next append.
- Order: a producer's events keep their order per key. While its journal holds events
  not yet migrated, `emit_event` appends to the journal even when the database is back,
  so no later event reaches the outbox before an earlier one; migration inserts each
  tenant's records in journal order, and once one of a tenant's records cannot be
  inserted, none of its later ones are.
- A commit whose outcome is unknown (the connection lost during COMMIT) is journaled
  too: the journaled copy has the dedupe key the row may already have, so migration
  finds it there and adds nothing.
- The backlog cap: while the journal holds events, `emit_event` still refuses a tenant
  the database says is over its cap (BacklogOverCap), as enqueue would; events journaled
  while the database could not say so are held back by migration until the tenant is
  under its cap.
- Bounded: appending beyond `max_bytes` raises JournalFull; nothing is dropped.

One directory per producer process (a pod's volume); the CLI can migrate it from
anywhere that mounts it, while the producer runs.
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
import uuid
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from sqlalchemy import Engine, func, select, tuple_
from sqlalchemy.orm import Session

from somabrain.config.errors import BacklogOverCap, RetriableError
from somabrain.config.types import TenantId
from somabrain.store.models import OutboxEvent
from somabrain.store.outbox import (
    EnqueueResult,
    EnqueueStatus,
    NewEvent,
    ValidatedEvent,
    check_backlog,
    enqueue_validated,
    validate_events,
)

log = logging.getLogger(__name__)

SUFFIX = ".journal"
CORRUPT_SUFFIX = ".corrupt"
_VERSION = 1
_SEQUENCE_DIGITS = 16
UNREACHABLE_GRACE_SECONDS = 5.0


class JournalFull(RetriableError):
    """The journal is at its size limit; the event was not written anywhere."""


# Errors that mean "the database cannot be reached now", as opposed to a refusal of the
# event (InvalidEvent, BacklogOverCap) or a bug.
UNREACHABLE = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


def encode_record(row: ValidatedEvent, *, at: str | None = None) -> bytes:
    """One journal line for a validated event."""
    body = json.dumps(
        {"v": _VERSION, "at": at or dt.datetime.now(dt.UTC).isoformat(), "event": list(row)},
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


def segments(directory: Path) -> list[Path]:
    """The journal's segments, oldest first."""
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if p.name[0] != ".")


def _sequence(path: Path) -> int:
    try:
        return int(path.name.removesuffix(SUFFIX))
    except ValueError:
        return 0


def _same_file(fd: int, path: Path) -> bool:
    """The open file is still the one `path` names (not deleted, not replaced)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_ino, named.st_dev) == (opened.st_ino, opened.st_dev)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The appending side, for one process: thread-safe."""

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
        self._path: Path | None = None
        self._last = 0
        self._total = self._journal_bytes()
        # Segments left by an earlier run hold events not in the outbox yet: later
        # events wait behind them, in the journal.
        self._backlogged = bool(segments(directory))
        self._checked = time.monotonic()
        self._unreachable_at: float | None = None

    def note_unreachable(self) -> None:
        """The database could not be reached just now."""
        self._unreachable_at = time.monotonic()

    @property
    def recently_unreachable(self) -> bool:
        """The database could not be reached within UNREACHABLE_GRACE_SECONDS: emits
        journal without asking it again, rather than each waiting for a connection."""
        at = self._unreachable_at
        return at is not None and time.monotonic() - at < UNREACHABLE_GRACE_SECONDS

    @property
    def backlogged(self) -> bool:
        """True while the journal may hold events not yet in the outbox. Re-checked
        against the directory (at most twice a second), so a migration by another
        process (`somabrain journal migrate`) ends it too."""
        if self._backlogged and time.monotonic() - self._checked > 0.5:
            self._checked = time.monotonic()
            if not segments(self.directory):
                self._backlogged = False
        return self._backlogged

    def append(self, rows: Sequence[ValidatedEvent]) -> None:
        """Write the events and fsync once for all of them; when this returns they
        survive a crash of the process or the machine."""
        at = dt.datetime.now(dt.UTC).isoformat()
        lines = b"".join(encode_record(r, at=at) for r in rows)
        with self._lock:
            # The running total counts what this process wrote since it last looked;
            # migrations delete files meanwhile, so near the limit the directory is
            # measured again before refusing.
            if self._total + len(lines) > self.max_bytes:
                self._total = self._journal_bytes()
            if self._total + len(lines) > self.max_bytes:
                raise JournalFull(
                    f"journal {self.directory} is at its limit of {self.max_bytes} bytes; "
                    "migrate it (somabrain journal migrate) or give it more room"
                )
            for _ in range(5):
                if self._append_to_segment(lines):
                    self._total += len(lines)
                    self._backlogged = True
                    return
            raise RetriableError(f"journal {self.directory}: no segment could be appended to")

    def _append_to_segment(self, lines: bytes) -> bool:
        """Append to the current segment, or start one; False when the segment went
        away or is busy (the caller tries again with a new one)."""
        path = self._path
        if path is None:
            path = self._path = self._new_segment()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            self._path = None
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._path = None  # a migrator has it: never wait behind the database
                return False
            if not _same_file(fd, path):
                self._path = None
                return False
            before = os.fstat(fd).st_size
            if before and before + len(lines) > self.max_segment_bytes:
                self._path = None
                return False
            try:
                view = memoryview(lines)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                self._cut_back(fd, before)
                raise
            return True
        finally:
            os.close(fd)  # releases the lock

    def _cut_back(self, fd: int, size: int) -> None:
        """After a failed write: leave the segment as it was, or, if that fails too,
        never append to it again (its cut-short last line is then reported and
        dropped by migration)."""
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError:
            self._path = None

    def _new_segment(self) -> Path:
        existing = segments(self.directory)
        # Never below a number this process used: names are not reused while it runs.
        number = max([_sequence(p) for p in existing] + [self._last]) + 1
        while True:
            path = self.directory / f"{number:0{_SEQUENCE_DIGITS}d}{SUFFIX}"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                number += 1
                continue
            os.close(fd)
            _fsync_directory(self.directory)  # the new name survives a crash too
            self._last = number
            return path

    def _journal_bytes(self) -> int:
        total = 0
        for path in segments(self.directory):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def drain(self, migrate: Callable[[], MigrationReport]) -> MigrationReport:
        """Migrate what was appended last with appends held back, and leave the
        backlogged state if nothing is left: events emitted meanwhile then wait for
        this short pass, and none reaches the outbox before an earlier one."""
        with self._lock:
            self._path = None
            report = migrate()
            self._backlogged = bool(segments(self.directory))
            self._checked = time.monotonic()
            return report

    def close(self) -> None:
        """Nothing stays open between appends; kept for symmetry with other resources."""
        with self._lock:
            self._path = None


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
        # Journaled behind the older events for their order, but refused as enqueue
        # would refuse them when the database can say a tenant is over its cap.
        if not journal.recently_unreachable:
            _check_caps_if_reachable(engine, journal, rows)
        return _journaled(journal, rows)
    try:
        with Session(engine) as session, session.begin():
            return enqueue_validated(session, rows)
    except UNREACHABLE as exc:
        if journal is None:
            raise
        journal.note_unreachable()
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


def _check_caps_if_reachable(
    engine: Engine, journal: Journal, rows: Sequence[ValidatedEvent]
) -> None:
    """Raise BacklogOverCap for a tenant the database says is over its cap; nothing
    when the database cannot be reached (the events are journaled, and migration holds
    them back while the tenant stays over its cap)."""
    adding = collections.Counter(row.tenant_id for row in rows)
    try:
        with Session(engine) as session:
            for tenant, count in adding.items():
                check_backlog(session, tenant, adding=count)
    except UNREACHABLE:
        journal.note_unreachable()


def _journaled(journal: Journal, rows: Sequence[ValidatedEvent]) -> list[EnqueueResult]:
    journal.append(rows)
    return [
        EnqueueResult(EnqueueStatus.JOURNALED, None, TenantId(r.tenant_id), r.dedupe_key)
        for r in rows
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class Damage:
    """A line migration could not read."""

    path: Path
    line: int  # 1-based
    length: int  # bytes
    torn: bool  # the last line, without its newline: a write cut short


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
    quarantined: list[Path] = dataclasses.field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(t.records for t in self.tenants.values())


@dataclasses.dataclass(frozen=True, slots=True)
class _Line:
    number: int  # 1-based
    raw: bytes  # without its newline
    row: ValidatedEvent | None


def _parse(path: Path, data: bytes) -> tuple[list[_Line], list[Damage]]:
    pieces = data.split(b"\n")
    complete, tail = pieces[:-1], pieces[-1]
    lines = [_Line(i + 1, raw, decode_record(raw)) for i, raw in enumerate(complete)]
    damaged = [Damage(path, x.number, len(x.raw), torn=False) for x in lines if x.row is None]
    if tail:
        damaged.append(Damage(path, len(complete) + 1, len(tail), torn=True))
    return lines, damaged


def _lock(path: Path, attempts: int = 50) -> int | None:
    """The segment opened and locked, waiting out appends in progress (each is short);
    None if it went away or stays busy (another migration)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    for _ in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.02)
            continue
        if _same_file(fd, path):
            return fd
        break
    os.close(fd)
    return None


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
    segment first; delete each segment once all its records are committed, or leave in
    it only the records still to migrate.

    Idempotent: records already in the outbox (same tenant and dedupe key) count as
    duplicates. A dry run reads everything, asks the database which records are there
    already and whether each tenant's cap would let the rest in, and changes nothing.
    Raises the database's error if it is unreachable; what was committed before stays
    committed, and its segment is rewritten or deleted on the next run.
    """
    report = MigrationReport(dry_run=dry_run)
    wanted = None if tenants is None else set(tenants)
    for path in segments(directory):
        fd = _lock(path)
        if fd is None:
            if path.exists():
                report.kept[path] = "busy (another migration)"
            continue
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            lines, damaged = _parse(path, data)
            report.damaged += damaged
            done = _migrate_lines(lines, engine, report, wanted, dry_run, batch, on_records)
            if not dry_run:
                _settle_segment(path, lines, done, damaged, report)
        finally:
            os.close(fd)
    for damage in report.damaged:
        what = (
            "a write cut short at the end, dropped"
            if damage.torn
            else f"does not match its checksum, moved to {damage.path.name}{CORRUPT_SUFFIX}"
        )
        log.warning(
            "journal %s line %d (%d bytes): %s", damage.path, damage.line, damage.length, what
        )
    return report


def _migrate_lines(
    lines: list[_Line],
    engine: Engine,
    report: MigrationReport,
    wanted: set[str] | None,
    dry_run: bool,
    batch: int,
    on_records: Callable[[int], None] | None,
) -> set[int]:
    """Insert the segment's records tenant by tenant, in order; the line numbers of
    the records now committed (or, in a dry run, that would be)."""
    by_tenant: dict[str, list[_Line]] = collections.defaultdict(list)
    for line in lines:
        if line.row is not None:
            by_tenant[line.row.tenant_id].append(line)
    done: set[int] = set()
    for tenant, mine in by_tenant.items():
        if wanted is not None and tenant not in wanted:
            continue
        tally = report.tenants[tenant]
        tally.records += len(mine)
        if tally.held is not None:
            continue
        for start in range(0, len(mine), batch):
            chunk = mine[start : start + batch]
            rows = [x.row for x in chunk if x.row is not None]
            try:
                inserted = _insert(engine, rows, dry_run, already=tally.inserted)
            except BacklogOverCap as exc:
                tally.held = str(exc)
                break
            tally.inserted += inserted
            tally.duplicates += len(chunk) - inserted
            done.update(x.number for x in chunk)
            if on_records is not None:
                on_records(len(chunk))
    return done


def _settle_segment(
    path: Path, lines: list[_Line], done: set[int], damaged: list[Damage], report: MigrationReport
) -> None:
    """Under the segment's lock: quarantine its corrupt lines, then delete it or leave
    in it only the records still to migrate."""
    # A replacement a migration killed before its rename left behind: the segment it
    # was to replace is still here, whole, so the copy is only in the way.
    for stale in path.parent.glob(f".{path.name}.*"):
        stale.unlink(missing_ok=True)
    corrupt = [x for x in lines if x.row is None]
    if corrupt:
        quarantine = path.with_name(path.name + CORRUPT_SUFFIX)
        # Lines a migration killed after this step already moved are not added twice.
        there = set(quarantine.read_bytes().split(b"\n")) if quarantine.exists() else set()
        with quarantine.open("ab") as f:
            f.write(b"".join(x.raw + b"\n" for x in corrupt if x.raw not in there))
            f.flush()
            os.fsync(f.fileno())
        report.quarantined.append(quarantine)
    left = [x for x in lines if x.row is not None and x.number not in done]
    if not left:
        path.unlink()
        _fsync_directory(path.parent)
        report.deleted.append(path)
        return
    report.kept[path] = (
        f"{len(left)} records not migrated (see the tenants held back or not asked for)"
    )
    if len(left) == len(lines) and not any(d.torn for d in damaged):
        return
    replacement = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with replacement.open("wb") as f:
        f.write(b"".join(x.raw + b"\n" for x in left))
        f.flush()
        os.fsync(f.fileno())
    os.replace(replacement, path)
    _fsync_directory(path.parent)


def _insert(engine: Engine, rows: Sequence[ValidatedEvent], dry_run: bool, *, already: int) -> int:
    """Insert the rows in one transaction; how many were new. A dry run counts the new
    ones and checks the cap as if the `already` counted before were in too."""
    if dry_run:
        with Session(engine) as session:  # closed without a commit: reads only
            keys = {(r.tenant_id, r.dedupe_key) for r in rows}
            present = session.execute(
                select(func.count()).where(
                    tuple_(OutboxEvent.tenant_id, OutboxEvent.dedupe_key).in_(list(keys))
                )
            ).scalar_one()
            new = len(keys) - int(present)
            if new:
                check_backlog(session, rows[0].tenant_id, adding=already + new)
            return new
    with Session(engine) as session, session.begin():
        results = enqueue_validated(session, rows)
    return sum(1 for r in results if r.status is EnqueueStatus.ENQUEUED)


class JournalMigrator:
    """Migrates a process's journal in the background while it holds events, every
    `interval` seconds; a pass that leaves nothing behind but what was appended while
    it ran migrates that too, with appends held back, and ends the backlog."""

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
        report = migrate_journal(self.journal.directory, self.engine)
        if not any(t.held for t in report.tenants.values()):
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
    into.quarantined += more.quarantined
    into.kept = {**{p: r for p, r in into.kept.items() if p.exists()}, **more.kept}
