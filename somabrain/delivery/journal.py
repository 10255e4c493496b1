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
  name; a migrator works on a segment under the same lock. The writer never appends to
  the old copy of a segment a migrator has replaced or deleted: it appends to what the
  name holds now, or starts a new segment.
- One migration of a journal at a time (a lock file in the directory): two at once
  would each take segments the other had not, out of order.
- After migrating a segment, the migrator deletes it if every record is committed in
  the database, or replaces it (write, fsync, rename) by a segment of the records still
  to migrate (a tenant over its backlog cap, a tenant not asked for). Until then each
  committed chunk is recorded beside it (`<segment>.done`), so a record once committed
  is never migrated again, even when a run was killed half-way and the row purged from
  the outbox before the next run. The exception: a run killed between a chunk's commit
  and its record (the time of one fsync), whose rows are then purged (sent, and past
  retention) before the next run; the background migrator runs again within seconds.
- A segment that cannot be read or locked stops the run there: later segments wait, as
  they may hold later events of a tenant in it.
- A line that does not match its checksum is moved to `<segment>.corrupt`, reported
  with its line, and kept for a person to look at; it never holds back the rest.
- A last line without its newline is a write cut short (the process or the machine died
  in the middle of it, or the disk filled up): it was never acknowledged, and is
  reported and dropped. A failed append cuts the segment back to where it was before
  raising, or, if it cannot, starts a new segment for the next append.
- Order: a producer's events keep their order per key. While its journal may hold
  events of a tenant not yet migrated, `emit_event` journals that tenant's events even
  when the database is back, so none reaches the outbox before an earlier one; other
  tenants' events go to the database. Migration inserts each tenant's records in
  journal order, and once one of a tenant's records cannot be inserted, none of its
  later ones are.
- A commit whose outcome is unknown (the connection lost during COMMIT) is journaled
  too: the journaled copy has the dedupe key the row may already have, so migration
  finds it there and adds nothing (while the row is in the outbox: until retention
  purges it after it was sent).
- The backlog cap: while the journal holds a tenant's events, `emit_event` still
  refuses the tenant when the database says it is over its cap (BacklogOverCap), as
  enqueue would. Migration inserts as many of a tenant's records as its cap has room
  for and holds back the rest until there is room again; a held tenant holds back no
  other.
- Unreachable: a connection refused or broken, or a database that does not answer an
  emit within `database_timeout` (5 s; its connection may hang, neither answering nor
  breaking). Each database call runs in a daemon thread of its own, so a hung one holds
  up no later emit and never the process's exit. The call it was waiting on may still
  commit later; the journaled copies carry the same dedupe keys, so migration adds
  nothing twice (unless that commit comes after the copy was migrated, sent and purged
  by retention). Should the journal refuse the events too, EmitOutcomeUnknown says so,
  with the dedupe keys to emit them again with. For 5 s after, emits journal without
  asking. An emit's transaction is ended by the server after 30 s idle, so one whose
  COMMIT was lost does not hold its rows' keys for long; a migration waits 5 s for such
  a key, then holds back that tenant alone until its next pass.
- Bounded: appending beyond `max_bytes` raises JournalFull; nothing is dropped.

One directory per producer process (a pod's volume); the CLI can migrate it from
anywhere that mounts it, while the producer runs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy.exc
from sqlalchemy import Engine, func, select, text, tuple_
from sqlalchemy.orm import Session

from somabrain.config.errors import BacklogOverCap, RetriableError
from somabrain.config.types import TenantId
from somabrain.store.models import OutboxEvent
from somabrain.store.outbox import (
    EnqueueResult,
    EnqueueStatus,
    NewEvent,
    ValidatedEvent,
    cap_and_backlog,
    check_backlogs,
    enqueue_validated,
    validate_events,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SUFFIX = ".journal"
CORRUPT_SUFFIX = ".corrupt"
_VERSION = 1
_SEQUENCE_DIGITS = 16
_SEGMENT_NAME = re.compile(rf"[0-9]{{{_SEQUENCE_DIGITS}}}{re.escape(SUFFIX)}")
UNREACHABLE_GRACE_SECONDS = 5.0

# How long a migration's insert waits for a row lock: a transaction that has not ended
# (its client gone during COMMIT, the server not told yet) may hold one of the dedupe
# keys it inserts. The tenant then waits for the next pass instead of every tenant.
MIGRATION_LOCK_TIMEOUT_MS = 5_000
_LOCK_NOT_AVAILABLE = "55P03"
# How long the server lets an emit's transaction sit idle before ending it: were its
# client gone during COMMIT without the server knowing, its row locks would otherwise
# hold the tenant's migration back until the server's own keepalives noticed (hours).
EMIT_IDLE_TIMEOUT_MS = 30_000


class JournalFull(RetriableError):
    """The journal is at its size limit; the event was not written anywhere."""


class JournalWriteFailed(RetriableError):
    """The journal's file system refused the write (full, read-only, failing); the
    event was not written anywhere."""


class JournalBusy(RetriableError):
    """Another migration of the same journal is running, or a migration pass holding
    appends back did not finish in time; nothing was done or written."""


class DatabaseTimeout(RetriableError):
    """The database did not answer an emit within the journal's `database_timeout`."""


class EmitOutcomeUnknown(RetriableError):
    """The database did not answer in time and the journal could not take the events
    either: the database call may still commit them. Emit them again with the same
    dedupe keys (`dedupe_keys`, in the events' order) so that they are kept once."""

    def __init__(self, refused: RetriableError, rows: Sequence[ValidatedEvent]) -> None:
        self.dedupe_keys = [r.dedupe_key for r in rows]
        super().__init__(
            f"{refused}; the database did not answer in time and may still commit these "
            f"{len(rows)} events: emit them again with the same dedupe keys "
            "(EmitOutcomeUnknown.dedupe_keys) so that they are kept once"
        )


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
    """The journal's segments, oldest first: regular files named as the writer names
    them (a sequence number of 16 digits); anything else in the directory, a symbolic
    link or a file of another name, is left alone."""
    found = [
        p
        for p in directory.glob(f"*{SUFFIX}")
        if _SEGMENT_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink()
    ]
    return sorted(found, key=_sequence)


def _sequence(path: Path) -> int:
    return int(path.name.removesuffix(SUFFIX))


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
        database_timeout: float = 5.0,
    ) -> None:
        self.directory = directory
        self.max_segment_bytes = max_segment_bytes
        self.max_bytes = max_bytes
        self.max_message_bytes = max_message_bytes
        self.database_timeout = database_timeout
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._last = 0
        self._total = self._journal_bytes()
        # The tenants whose events may be in the journal and not yet in the outbox:
        # their later events wait behind them, in the journal. Segments left by an
        # earlier run may hold any tenant's (None: every tenant waits until a
        # migration has said which are left).
        self._held: set[str] | None = None if segments(directory) else set()
        self._checked = time.monotonic()
        self._unreachable_at: float | None = None

    def note_unreachable(self) -> None:
        """The database could not be reached just now."""
        self._unreachable_at = time.monotonic()

    def note_reachable(self) -> None:
        """The database took events just now."""
        self._unreachable_at = None

    @property
    def recently_unreachable(self) -> bool:
        """The database could not be reached within UNREACHABLE_GRACE_SECONDS: emits
        journal without asking it again, rather than each waiting for a connection."""
        at = self._unreachable_at
        return at is not None and time.monotonic() - at < UNREACHABLE_GRACE_SECONDS

    @property
    def backlogged(self) -> bool:
        """True while the journal may hold events of any tenant not yet in the
        outbox."""
        with self._lock:
            self._recheck()
            return self._held is None or bool(self._held)

    def holds(self, tenants: Iterable[str]) -> bool:
        """True while the journal may hold events of one of `tenants` not yet in the
        outbox: their next events must be journaled too, behind them."""
        with self._emitting():
            self._recheck()
            return self._held is None or not self._held.isdisjoint(tenants)

    @property
    def held_tenants(self) -> frozenset[str] | None:
        """The tenants whose events may wait in the journal (None: not known yet, any)."""
        with self._lock:
            return None if self._held is None else frozenset(self._held)

    @contextlib.contextmanager
    def _emitting(self) -> Iterator[None]:
        """The lock, for an emit: waited for as long as a migration pass holding
        appends back may take with a database that answers (`drain`), and no longer,
        so that one hanging on the database never holds an emit for good."""
        if not self._lock.acquire(timeout=self.database_timeout + 5):
            raise JournalBusy(
                f"journal {self.directory}: a migration pass holding appends back has "
                f"not finished within {self.database_timeout + 5:g}s (the database may "
                "have stopped answering); nothing was written, retry later"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _recheck(self) -> None:
        """Under the lock: a journal left without segments holds nothing, whoever
        migrated it (`somabrain journal migrate` from another process too). Looked at
        no more than twice a second."""
        if (self._held is None or self._held) and time.monotonic() - self._checked > 0.5:
            self._checked = time.monotonic()
            if not segments(self.directory):
                self._held = set()

    def append(self, rows: Sequence[ValidatedEvent]) -> None:
        """Write the events and fsync once for all of them; when this returns they
        survive a crash of the process or the machine."""
        at = dt.datetime.now(dt.UTC).isoformat()
        lines = b"".join(encode_record(r, at=at) for r in rows)
        with self._emitting():
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
                try:
                    appended = self._append_to_segment(lines)
                except OSError as exc:
                    raise JournalWriteFailed(
                        f"journal {self.directory}: the events could not be written "
                        f"({exc.strerror or exc}); they were not journaled. Give the "
                        "journal's volume room, or retry later"
                    ) from exc
                if appended:
                    self._total += len(lines)
                    if self._held is not None:
                        self._held.update(r.tenant_id for r in rows)
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
        # Above every number in the directory, a segment's notes and quarantine
        # (SEGMENT.done, SEGMENT.corrupt) included, so that no new segment inherits
        # them; and never below a number this process used.
        used = [
            int(p.name[:_SEQUENCE_DIGITS])
            for p in self.directory.glob(f"*{SUFFIX}*")
            if _SEGMENT_NAME.match(p.name)
        ]
        number = max([*used, self._last]) + 1
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
        """Migrate what was appended last with appends held back, then release every
        tenant with nothing left in the journal: events emitted meanwhile wait for
        this short pass, and none reaches the outbox before an earlier one of its
        tenant. A tenant still held (over its cap) holds back no other."""
        with self._lock:
            self._path = None
            report = migrate()
            if not segments(self.directory):
                self._held = set()
            elif report.complete:
                self._held = set(report.left)
            self._checked = time.monotonic()
            return report

    def call_database(self, call: Callable[[], T]) -> T:
        """`call()`'s result, or DatabaseTimeout once it has taken `database_timeout`
        seconds. The call runs in a daemon thread of its own, so that a database that
        stops answering (its connection neither answers nor breaks) costs the caller
        no more than that, holds up no later call, and never keeps the process from
        exiting; a call that times out may still finish later (see emit_events)."""
        outcome: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                outcome.set_result(call())
            except Exception as exc:  # noqa: BLE001 - raised again in the caller's thread
                outcome.set_exception(exc)

        threading.Thread(target=run, name="journal-database-call", daemon=True).start()
        try:
            return outcome.result(timeout=self.database_timeout)
        except concurrent.futures.TimeoutError:
            raise DatabaseTimeout(
                f"the database did not answer within {self.database_timeout:g}s"
            ) from None

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
    Events of a tenant the journal still holds events of are journaled behind them,
    whatever the database's state. A database that does not answer within the
    journal's `database_timeout` counts as unreachable; for UNREACHABLE_GRACE_SECONDS
    after that, events are journaled without asking it again.
    """
    if journal is None:
        rows = validate_events(events, None)
        return _enqueue_now(engine, rows)
    rows = validate_events(events, journal.max_message_bytes)
    if journal.recently_unreachable:
        return _journaled(journal, rows)
    if journal.holds({r.tenant_id for r in rows}):
        # Journaled behind the older events for their order, but refused as enqueue
        # would refuse them when the database can say a tenant is over its cap.
        _check_caps_if_reachable(engine, journal, rows)
        return _journaled(journal, rows)
    try:
        results = journal.call_database(lambda: _enqueue_now(engine, rows))
    except UNREACHABLE as exc:
        journal.note_unreachable()
        _log_journaled(exc, rows, journal)
        return _journaled(journal, rows)
    except DatabaseTimeout as exc:
        journal.note_unreachable()
        _log_journaled(exc, rows, journal)
        try:
            return _journaled(journal, rows)
        except RetriableError as refused:
            # The call that timed out may still commit them: the caller must know
            # that, and with which dedupe keys to try again without a second copy.
            raise EmitOutcomeUnknown(refused, rows) from refused
    journal.note_reachable()
    return results


def _log_journaled(exc: Exception, rows: Sequence[ValidatedEvent], journal: Journal) -> None:
    log.warning(
        "database unreachable (%s); %d events journaled in %s",
        _first_line(exc),
        len(rows),
        journal.directory,
    )


def _enqueue_now(engine: Engine, rows: Sequence[ValidatedEvent]) -> list[EnqueueResult]:
    with Session(engine) as session, session.begin():
        session.execute(
            text(f"SET LOCAL idle_in_transaction_session_timeout = {EMIT_IDLE_TIMEOUT_MS}")
        )
        return enqueue_validated(session, rows)


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]


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

    def check() -> None:
        with Session(engine) as session:
            check_backlogs(session, rows)

    try:
        journal.call_database(check)
    except (*UNREACHABLE, DatabaseTimeout):
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
    # A segment that could not be read or locked, where the run stopped: the segments
    # after it were left alone, so that no event overtakes one of its tenant in it.
    stopped_at: tuple[Path, str] | None = None
    # The tenants with records still in the journal after this run.
    left: set[str] = dataclasses.field(default_factory=set)

    @property
    def records(self) -> int:
        return sum(t.records for t in self.tenants.values())

    @property
    def complete(self) -> bool:
        """Every segment was read and settled (never true of a dry run)."""
        return not self.dry_run and self.stopped_at is None


@dataclasses.dataclass(frozen=True, slots=True)
class _Line:
    number: int  # 1-based
    raw: bytes  # without its newline
    row: ValidatedEvent | None

    @property
    def identity(self) -> str:
        """The record's (tenant, dedupe key), which the outbox holds once."""
        assert self.row is not None
        return json.dumps([self.row.tenant_id, self.row.dedupe_key])


def _parse(path: Path, data: bytes) -> tuple[list[_Line], list[Damage]]:
    pieces = data.split(b"\n")
    complete, tail = pieces[:-1], pieces[-1]
    lines = [_Line(i + 1, raw, decode_record(raw)) for i, raw in enumerate(complete)]
    damaged = [Damage(path, x.number, len(x.raw), torn=False) for x in lines if x.row is None]
    if tail:
        damaged.append(Damage(path, len(complete) + 1, len(tail), torn=True))
    return lines, damaged


MIGRATION_LOCK = ".migration.lock"
DONE_SUFFIX = ".done"


@contextlib.contextmanager
def _migration_lock(directory: Path, *, wait: float) -> Iterator[None]:
    """One migration of a journal at a time: two at once would each take the segments
    the other has not locked, and a tenant's later events could reach the outbox
    before its earlier ones."""
    fd = os.open(directory / MIGRATION_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise JournalBusy(
                        f"another migration of journal {directory} is running (the "
                        "producer's background migrator or `somabrain journal migrate`); "
                        "nothing was done, try again when it has finished"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _lock(path: Path, attempts: int = 50) -> int | None:
    """The segment opened and locked, waiting out an append in progress (each is
    short); None if it went away meanwhile. Raises OSError if it cannot be opened or
    stays locked."""
    for _ in range(attempts):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            time.sleep(0.02)
            continue
        if _same_file(fd, path):
            return fd
        os.close(fd)  # replaced since it was opened: open the new one
    raise BlockingIOError(f"still locked after {attempts} attempts")


@dataclasses.dataclass(frozen=True, slots=True)
class _Pass:
    """One migration run's settings and report."""

    engine: Engine
    report: MigrationReport
    wanted: set[str] | None
    dry_run: bool
    batch: int
    on_records: Callable[[int], None] | None
    rooms: dict[str, tuple[int, int] | None] = dataclasses.field(default_factory=dict)


def migrate_journal(
    directory: Path,
    engine: Engine,
    *,
    tenants: Sequence[str] | None = None,
    dry_run: bool = False,
    batch: int = 500,
    on_records: Callable[[int], None] | None = None,
    wait: float = 0.0,
) -> MigrationReport:
    """Move the journal's events into the outbox (only `tenants`' when given), oldest
    segment first; delete each segment once all its records are committed, or leave in
    it only the records still to migrate.

    Idempotent: records already in the outbox (same tenant and dedupe key) count as
    duplicates, and so do records a run killed half-way had committed (each committed
    chunk is recorded next to its segment, in `<segment>.done`, until the segment is
    settled). A dry run reads everything, asks the database which records are there
    already and whether each tenant's cap would let the rest in, and changes nothing.
    One run at a time per journal: raises JournalBusy if another does not finish within
    `wait` seconds. Raises the database's error if it is unreachable; what was committed
    before stays committed, and is not migrated again.
    """
    report = MigrationReport(dry_run=dry_run)
    run = _Pass(
        engine=engine,
        report=report,
        wanted=None if tenants is None else set(tenants),
        dry_run=dry_run,
        batch=batch,
        on_records=on_records,
    )
    with _migration_lock(directory, wait=wait):
        if not dry_run:
            _remove_orphans(directory)
        for path in segments(directory):
            try:
                fd = _lock(path)
            except OSError as exc:
                # Stop here: a later segment may hold later events of a tenant in this one.
                report.stopped_at = (path, f"cannot be read or locked ({exc}); later files wait")
                break
            if fd is None:
                continue  # gone meanwhile: nothing to do
            try:
                _migrate_segment(run, path, fd)
            finally:
                os.close(fd)
    _log_damage(report)
    return report


def _migrate_segment(run: _Pass, path: Path, fd: int) -> None:
    with os.fdopen(os.dup(fd), "rb") as f:
        data = f.read()
    lines, damaged = _parse(path, data)
    run.report.damaged += damaged
    done = _migrate_lines(run, path, lines)
    if not run.dry_run:
        _settle_segment(path, lines=lines, done=done, damaged=damaged, report=run.report)


def _log_damage(report: MigrationReport) -> None:
    for damage in report.damaged:
        moved = "would be moved" if report.dry_run else "moved"
        what = (
            "a write cut short at the end, never acknowledged: dropped"
            if damage.torn
            else f"does not match its checksum, {moved} to {damage.path.name}{CORRUPT_SUFFIX}"
        )
        log.warning(
            "journal %s line %d (%d bytes): %s", damage.path, damage.line, damage.length, what
        )


def _remove_orphans(directory: Path) -> None:
    """Under the migration lock: records of committed chunks whose segment is gone
    (a run killed after settling it)."""
    for marks in directory.glob(f"*{SUFFIX}{DONE_SUFFIX}"):
        if not marks.with_name(marks.name.removesuffix(DONE_SUFFIX)).exists():
            marks.unlink(missing_ok=True)


def _done_marks(path: Path) -> set[str]:
    """The identities of the records an earlier, killed run committed from `path`."""
    marks = path.with_name(path.name + DONE_SUFFIX)
    try:
        return set(marks.read_text().splitlines())
    except FileNotFoundError:
        return set()


def _mark_done(path: Path, chunk: Sequence[_Line]) -> None:
    """Record a committed chunk before going on: were its rows purged from the outbox
    (sent, then past retention) before this segment is settled, a later run still
    knows they were migrated."""
    marks = path.with_name(path.name + DONE_SUFFIX)
    with marks.open("a") as f:
        f.write("".join(x.identity + "\n" for x in chunk))
        f.flush()
        os.fsync(f.fileno())


def _migrate_lines(run: _Pass, path: Path, lines: list[_Line]) -> set[int]:
    """Insert the segment's records tenant by tenant, in order; the line numbers of
    the records now committed (or, in a dry run, that would be)."""
    by_tenant: dict[str, list[_Line]] = collections.defaultdict(list)
    for line in lines:
        if line.row is not None:
            by_tenant[line.row.tenant_id].append(line)
    marked = _done_marks(path)
    done: set[int] = set()
    for tenant, mine in by_tenant.items():
        if run.wanted is not None and tenant not in run.wanted:
            continue
        tally = run.report.tenants[tenant]
        tally.records += len(mine)
        if tally.held is not None:
            continue
        todo = mine
        if marked:
            already = [x for x in mine if x.identity in marked]
            tally.duplicates += len(already)
            done.update(x.number for x in already)
            todo = [x for x in mine if x.number not in done]
        for start in range(0, len(todo), run.batch):
            chunk = todo[start : start + run.batch]
            taken = _migrate_chunk(run, path=path, tenant=tenant, tally=tally, chunk=chunk)
            done.update(x.number for x in taken)
            if tally.held is not None:
                break
    return done


def _migrate_chunk(
    run: _Pass, *, path: Path, tenant: str, tally: TenantTally, chunk: list[_Line]
) -> list[_Line]:
    """Insert a chunk of one tenant's records, or as many of its first records as the
    tenant's cap has room for (then the tenant is held); the records taken."""
    room = _room(run, tenant)
    if room is not None:
        cap, backlog = room
        allowed = cap - backlog - tally.inserted
        if allowed < len(chunk):
            tally.held = (
                f"tenant {tenant} had {backlog:,} pending events and its cap is {cap:,}; its "
                "journaled events beyond the room left wait until its publisher has sent "
                "some (is one running? see somabrain_publisher_active) or the cap is raised "
                "(max_pending)"
            )
            chunk = chunk[: max(0, allowed)]
            if not chunk:
                return []
    rows = [x.row for x in chunk if x.row is not None]
    try:
        inserted = _insert(run.engine, rows, run.dry_run)
    except BacklogOverCap as exc:
        tally.held = str(exc)  # its publisher's latest report says so
        return []
    except sqlalchemy.exc.OperationalError as exc:
        if getattr(exc.orig, "pgcode", None) != _LOCK_NOT_AVAILABLE:
            raise
        tally.held = (
            f"a transaction that has not ended holds one of tenant {tenant}'s dedupe keys "
            f"(waited {MIGRATION_LOCK_TIMEOUT_MS / 1000:g}s); tried again at the next pass"
        )
        return []
    tally.inserted += inserted
    tally.duplicates += len(chunk) - inserted
    if not run.dry_run:
        _mark_done(path, chunk)
    if run.on_records is not None:
        run.on_records(len(chunk))
    return chunk


def _room(run: _Pass, tenant: str) -> tuple[int, int] | None:
    """The tenant's cap and its backlog when this run first came to it, counted from
    its rows: the publisher's report may be seconds old, and what this run inserts is
    added to the backlog as it goes (`TenantTally.inserted`)."""
    if tenant not in run.rooms:
        with Session(run.engine) as session:
            run.rooms[tenant] = cap_and_backlog(session, tenant)
    return run.rooms[tenant]


def _settle_segment(
    path: Path,
    *,
    lines: list[_Line],
    done: set[int],
    damaged: list[Damage],
    report: MigrationReport,
) -> None:
    """Under the segment's lock: quarantine its corrupt lines, then delete it or leave
    in it only the records still to migrate; then forget its committed chunks."""
    # A replacement a migration killed before its rename left behind: the segment it
    # was to replace is still here, whole, so the copy is only in the way.
    for stale in path.parent.glob(f".{path.name}.*"):
        stale.unlink(missing_ok=True)
    corrupt = [x for x in lines if x.row is None]
    if corrupt:
        _quarantine(path, corrupt, report)
    left = [x for x in lines if x.row is not None and x.number not in done]
    report.left.update(x.row.tenant_id for x in left if x.row is not None)
    if not left:
        path.unlink()
        report.deleted.append(path)
    else:
        report.kept[path] = (
            f"{len(left)} records not migrated (see the tenants held back or not asked for)"
        )
        if len(left) < len(lines) or any(d.torn for d in damaged):
            _rewrite(path, left)
    _fsync_directory(path.parent)
    path.with_name(path.name + DONE_SUFFIX).unlink(missing_ok=True)


def _quarantine(path: Path, corrupt: list[_Line], report: MigrationReport) -> None:
    quarantine = path.with_name(path.name + CORRUPT_SUFFIX)
    # Lines a migration killed after this step already moved are not added twice.
    there = set(quarantine.read_bytes().split(b"\n")) if quarantine.exists() else set()
    with quarantine.open("ab") as f:
        f.write(b"".join(x.raw + b"\n" for x in corrupt if x.raw not in there))
        f.flush()
        os.fsync(f.fileno())
    report.quarantined.append(quarantine)


def _rewrite(path: Path, left: list[_Line]) -> None:
    """Replace the segment by one of `left` alone: written and fsynced aside, then
    renamed over it, so a crash leaves one or the other whole."""
    replacement = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with replacement.open("wb") as f:
        f.write(b"".join(x.raw + b"\n" for x in left))
        f.flush()
        os.fsync(f.fileno())
    os.replace(replacement, path)


def _insert(engine: Engine, rows: Sequence[ValidatedEvent], dry_run: bool) -> int:
    """Insert the rows in one transaction; how many were new (a dry run counts them
    and changes nothing)."""
    if dry_run:
        with Session(engine) as session:  # closed without a commit: reads only
            keys = {(r.tenant_id, r.dedupe_key) for r in rows}
            present = session.execute(
                select(func.count()).where(
                    tuple_(OutboxEvent.tenant_id, OutboxEvent.dedupe_key).in_(list(keys))
                )
            ).scalar_one()
            return len(keys) - int(present)
    with Session(engine) as session, session.begin():
        session.execute(text(f"SET LOCAL lock_timeout = {MIGRATION_LOCK_TIMEOUT_MS}"))
        results = enqueue_validated(session, rows)
    return sum(1 for r in results if r.status is EnqueueStatus.ENQUEUED)


class JournalMigrator:
    """Migrates a process's journal in the background while it holds events, every
    `interval` seconds: one pass with appends going on, then one with appends held
    back for what was appended meanwhile, which releases every tenant left with
    nothing in the journal. A tenant held back (over its backlog cap) is logged when
    it starts and stops waiting, and holds back no other tenant."""

    def __init__(self, journal: Journal, engine: Engine, *, interval: float = 5.0) -> None:
        self.journal = journal
        self.engine = engine
        self.interval = interval
        self._held: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-migrator", daemon=True)

    def start(self) -> JournalMigrator:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def run_once(self) -> MigrationReport | None:
        """One pass, if the journal holds anything; None if it did not, or if another
        migration of it was running."""
        if not self.journal.backlogged:
            return None
        directory = self.journal.directory
        try:
            report = migrate_journal(directory, self.engine)
            _merge(report, self.journal.drain(lambda: migrate_journal(directory, self.engine)))
        except JournalBusy:
            log.info("journal %s: another migration is running; trying again later", directory)
            return None
        self.journal.note_reachable()  # it took the journal's events just now
        if report.records:
            log.info(
                "journal %s: %d events migrated to the outbox, %d already there",
                directory,
                sum(t.inserted for t in report.tenants.values()),
                sum(t.duplicates for t in report.tenants.values()),
            )
        self._log_held(report)
        return report

    def _log_held(self, report: MigrationReport) -> None:
        held = {t: tally.held for t, tally in report.tenants.items() if tally.held}
        for tenant, why in held.items():
            if tenant not in self._held:
                log.warning(
                    "journal %s: tenant %s's events wait in the journal, retried every %ss: %s",
                    self.journal.directory,
                    tenant,
                    self.interval,
                    why,
                    extra={"tenant": tenant},
                )
        for tenant in self._held.keys() - held.keys():
            log.info(
                "journal %s: tenant %s's events are no longer held back",
                self.journal.directory,
                tenant,
                extra={"tenant": tenant},
            )
        self._held = held

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except UNREACHABLE:
                continue  # still unreachable; the next pass tries again
            except Exception:
                log.exception("journal %s: migration failed; retrying", self.journal.directory)


def _merge(into: MigrationReport, more: MigrationReport) -> None:
    """Add a later pass's report to an earlier one's; where the journal stands (what
    is left, where a pass stopped) is the later pass's."""
    for tenant, tally in more.tenants.items():
        mine = into.tenants[tenant]
        mine.records += tally.records
        mine.inserted += tally.inserted
        mine.duplicates += tally.duplicates
        mine.held = tally.held
    into.damaged += more.damaged
    into.deleted += more.deleted
    into.quarantined += more.quarantined
    into.kept = {**{p: r for p, r in into.kept.items() if p.exists()}, **more.kept}
    into.stopped_at = more.stopped_at
    into.left = more.left
