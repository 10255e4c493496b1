"""The local journal against the real database: events emitted while it is unreachable
are journaled, and migration puts each in the outbox once, in order, whatever stops it
half-way."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.engine
import sqlalchemy.event
import sqlalchemy.exc
from sqlalchemy import Engine, delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from somabrain import (
    EnqueueStatus,
    Journal,
    JournalMigrator,
    emit_event,
    emit_events,
    enqueue_event,
)
from somabrain.config.errors import BacklogOverCap
from somabrain.delivery import journal as journal_module
from somabrain.delivery.journal import EmitOutcomeUnknown, migrate_journal, segments
from somabrain.store.engine import make_engine
from somabrain.store.models import OutboxEvent
from somabrain.store.outbox import NewEvent, report_tenant
from tests.silent_proxy import SilentProxy
from tests.support import wait_for

pytestmark = pytest.mark.integration

SOMABRAIN = str(Path(sys.executable).parent / "somabrain")


@pytest.fixture
def unreachable() -> Iterator[Engine]:
    """A database nobody listens for: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    # The port was bound, then closed: nothing listens there now.
    engine = make_engine(f"postgresql://postgres@127.0.0.1:{port}/somabrain?connect_timeout=2")
    yield engine
    engine.dispose()


def _events(tenant: str, n: int, *, start: int = 0, key: str = "k") -> list[NewEvent]:
    return [
        NewEvent(tenant_id=tenant, topic="orders", payload={"i": i}, key=key)
        for i in range(start, start + n)
    ]


def _outbox(sessions: sessionmaker[Session], tenant: str) -> list[int]:
    """The `i` of each of the tenant's events, in id order."""
    with sessions() as session:
        payloads = session.scalars(
            select(OutboxEvent.payload)
            .where(OutboxEvent.tenant_id == tenant)
            .order_by(OutboxEvent.id)
        )
        return [p["i"] for p in payloads]


def _migrate_cli(
    database_url: str, directory: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SOMABRAIN, "journal", "migrate", "--dir", str(directory), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SOMABRAIN_DATABASE_URL": database_url},
        timeout=120,
        check=False,
    )


def _migration_killed_after(directory: Path, database_url: str, *, chunks: int, batch: int) -> int:
    """Run a migration of `directory` in a process of its own that stops for good after
    its `chunks`-th committed chunk of `batch` records, kill it there (SIGKILL), and
    return how many records it had committed."""
    marker = directory.parent / f"{directory.name}.committed"
    script = (
        "import sys, time, pathlib\n"
        "from somabrain.delivery.journal import migrate_journal\n"
        "from somabrain.store.engine import make_engine\n"
        "done = []\n"
        "def after(n):\n"
        "    done.append(n)\n"
        f"    if len(done) == {chunks}:\n"
        "        pathlib.Path(sys.argv[3]).write_text(str(sum(done)))\n"
        "        time.sleep(600)\n"
        f"migrate_journal(pathlib.Path(sys.argv[1]), make_engine(sys.argv[2]), batch={batch},"
        " on_records=after)\n"
    )
    command = [sys.executable, "-c", script, str(directory), database_url, str(marker)]
    with subprocess.Popen(command) as process:
        try:
            assert wait_for(lambda: marker.exists() and marker.read_text() != "", timeout=60)
        finally:
            process.kill()
    return int(marker.read_text())


def test_an_event_emitted_while_the_database_is_unreachable_is_journaled_then_migrated(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    journal = Journal(tmp_path)
    result = emit_event(
        unreachable, tenant_id=tenant, topic="orders", payload={"i": 0}, key="k", journal=journal
    )
    assert result.status is EnqueueStatus.JOURNALED
    assert result.event_id is None
    journal.close()

    report = migrate_journal(tmp_path, engine)
    assert report.tenants[tenant].inserted == 1
    assert _outbox(sessions, tenant) == [0]
    assert segments(tmp_path) == []


def test_without_a_journal_an_unreachable_database_raises_as_before(
    unreachable: Engine, tenant: str
) -> None:
    with pytest.raises(sqlalchemy.exc.OperationalError):
        emit_event(unreachable, tenant_id=tenant, topic="orders", payload={})


def test_with_the_database_up_emit_enqueues_directly(
    tmp_path: Path, engine: Engine, sessions: sessionmaker[Session], tenant: str
) -> None:
    journal = Journal(tmp_path)
    results = emit_events(engine, _events(tenant, 3), journal=journal)
    assert {r.status for r in results} == {EnqueueStatus.ENQUEUED}
    assert segments(tmp_path) == []
    assert _outbox(sessions, tenant) == [0, 1, 2]


def test_migrating_the_same_records_twice_puts_each_event_in_the_outbox_once(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    journal = Journal(tmp_path / "journal")
    emit_events(unreachable, _events(tenant, 20), journal=journal)
    journal.close()
    shutil.copytree(tmp_path / "journal", tmp_path / "copy")

    first = migrate_journal(tmp_path / "journal", engine)
    again = migrate_journal(tmp_path / "copy", engine)
    assert (first.tenants[tenant].inserted, first.tenants[tenant].duplicates) == (20, 0)
    assert (again.tenants[tenant].inserted, again.tenants[tenant].duplicates) == (0, 20)
    assert _outbox(sessions, tenant) == list(range(20))


def test_a_migration_killed_half_way_and_run_again_gives_each_event_once_in_order(
    tmp_path: Path,
    unreachable: Engine,
    database_url: str,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    directory = tmp_path / "journal"
    journal = Journal(directory, max_segment_bytes=40_000)
    for start in range(0, 3000, 100):
        emit_events(unreachable, _events(tenant, 100, start=start), journal=journal)
    journal.close()
    assert len(segments(directory)) > 3
    committed = _migration_killed_after(directory, database_url, chunks=3, batch=250)
    assert 0 < committed < 3000
    assert _outbox(sessions, tenant) == list(range(committed))

    again = _migrate_cli(database_url, directory, "--output", "json")
    assert again.returncode == 0, again.stderr
    tally = json.loads(again.stdout)["tenants"][tenant]
    # Files the first run finished were deleted; of the one it was in, what it had
    # committed is counted as already there.
    assert tally["inserted"] == 3000 - committed
    assert 0 < tally["duplicates"] <= committed
    assert _outbox(sessions, tenant) == list(range(3000))
    assert segments(directory) == []


def test_events_emitted_after_the_database_is_back_wait_behind_the_journaled_ones(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    journal = Journal(tmp_path)
    down = emit_events(unreachable, _events(tenant, 5), journal=journal)
    back = emit_events(engine, _events(tenant, 5, start=5), journal=journal)
    assert {r.status for r in down + back} == {EnqueueStatus.JOURNALED}
    assert _outbox(sessions, tenant) == []

    migrator = JournalMigrator(journal, engine, interval=0.2).start()
    try:
        assert wait_for(lambda: not journal.backlogged, timeout=30)
    finally:
        migrator.stop()
    assert _outbox(sessions, tenant) == list(range(10))
    assert segments(tmp_path) == []
    after = emit_event(engine, tenant_id=tenant, topic="orders", payload={"i": 10}, journal=journal)
    assert after.status is EnqueueStatus.ENQUEUED


def test_while_the_journal_holds_events_a_tenant_over_its_cap_is_still_refused(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    emit_events(unreachable, _events(tenant, 2), journal=Journal(tmp_path))
    other = f"{tenant}-other"
    with sessions.begin() as session:
        report_tenant(session, tenant_id=tenant, pending=10, max_pending=10, publisher=tenant)
    # The producer restarted with its journal still holding events; the database is back.
    journal = Journal(tmp_path)
    assert journal.backlogged
    with pytest.raises(BacklogOverCap, match="its cap is 10"):
        emit_event(engine, tenant_id=tenant, topic="orders", payload={"i": 2}, journal=journal)
    fine = emit_event(engine, tenant_id=other, topic="orders", payload={"i": 0}, journal=journal)
    assert fine.status is EnqueueStatus.JOURNALED
    report = migrate_journal(tmp_path, engine, dry_run=True)
    assert (report.tenants[tenant].records, report.tenants[other].records) == (2, 1)


def test_while_the_database_was_just_found_unreachable_journaling_does_not_wait_on_it(
    tmp_path: Path, unreachable: Engine, tenant: str
) -> None:
    attempts: list[object] = []
    sqlalchemy.event.listen(unreachable, "do_connect", lambda *args: attempts.append(args))
    journal = Journal(tmp_path)
    emit_events(unreachable, _events(tenant, 1), journal=journal)
    tried = len(attempts)
    results = emit_events(unreachable, _events(tenant, 5, start=1), journal=journal)
    assert tried >= 1
    assert len(attempts) == tried
    assert {r.status for r in results} == {EnqueueStatus.JOURNALED}


def test_background_migration_keeps_order_while_events_keep_coming(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    journal = Journal(tmp_path)
    emit_events(unreachable, _events(tenant, 50), journal=journal)
    migrator = JournalMigrator(journal, engine, interval=0.05).start()
    try:
        for start in range(50, 550, 10):
            emit_events(engine, _events(tenant, 10, start=start), journal=journal)
        assert wait_for(lambda: not journal.backlogged, timeout=30)
    finally:
        migrator.stop()
    assert _outbox(sessions, tenant) == list(range(550))


def test_a_tenant_over_its_cap_is_held_back_and_another_tenant_migrates(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    sessions: sessionmaker[Session],
    database_url: str,
    tenant: str,
) -> None:
    full, fine = tenant, f"f{uuid.uuid4().hex[:10]}"
    with sessions.begin() as session:
        report_tenant(session, tenant_id=full, pending=10, max_pending=10, publisher=full)
    journal = Journal(tmp_path)
    emit_events(unreachable, _events(full, 3) + _events(fine, 3), journal=journal)
    journal.close()

    result = _migrate_cli(database_url, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 records not migrated" in result.stdout
    assert _outbox(sessions, fine) == [0, 1, 2]
    assert _outbox(sessions, full) == []
    assert len(segments(tmp_path)) == 1

    # The migrated tenant's rows are purged meanwhile (retention); the journal, which
    # kept only what was not migrated, does not bring them back.
    with sessions.begin() as session:
        session.execute(delete(OutboxEvent).where(OutboxEvent.tenant_id == fine))
        report_tenant(session, tenant_id=full, pending=0, max_pending=10, publisher=full)
    report = migrate_journal(tmp_path, engine)
    assert report.tenants[full].inserted == 3
    assert fine not in report.tenants
    assert _outbox(sessions, full) == [0, 1, 2]
    assert _outbox(sessions, fine) == []
    assert segments(tmp_path) == []


def test_a_dry_run_says_what_would_move_and_changes_nothing(
    tmp_path: Path,
    unreachable: Engine,
    database_url: str,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    journal = Journal(tmp_path)
    emit_events(unreachable, _events(tenant, 4), journal=journal)
    journal.close()
    result = _migrate_cli(database_url, tmp_path, "--dry-run", "--output", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tenants"][tenant]["inserted"] == 4
    assert _outbox(sessions, tenant) == []
    assert len(segments(tmp_path)) == 1


def test_a_torn_last_record_is_reported_and_every_record_before_it_migrates(
    tmp_path: Path,
    unreachable: Engine,
    database_url: str,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    journal = Journal(tmp_path)
    emit_events(unreachable, _events(tenant, 5), journal=journal)
    journal.close()
    [segment] = segments(tmp_path)
    with segment.open("ab") as f:
        f.write(b'1f2e3d4c {"v":1,"at":"2026-')  # killed in the middle of a write
    result = _migrate_cli(database_url, tmp_path, "--tenant", tenant)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{segment}:6: " in result.stdout
    assert "a write cut short, never acknowledged; dropped" in result.stdout
    assert _outbox(sessions, tenant) == [0, 1, 2, 3, 4]
    assert segments(tmp_path) == []


@pytest.mark.parametrize("line", [0, 2])
def test_a_corrupt_record_is_set_aside_for_a_person_and_the_others_migrate(
    tmp_path: Path,
    unreachable: Engine,
    database_url: str,
    sessions: sessionmaker[Session],
    tenant: str,
    line: int,
) -> None:
    # The last line too: it ends with its newline, so it was acknowledged, and a
    # checksum mismatch there is damage, never taken for a write cut short.
    journal = Journal(tmp_path)
    emit_events(unreachable, _events(tenant, 3), journal=journal)
    [segment] = segments(tmp_path)
    lines = segment.read_bytes().split(b"\n")
    damaged = b"00000000" + lines[line][8:]
    lines[line] = damaged
    segment.write_bytes(b"\n".join(lines))
    result = _migrate_cli(database_url, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{segment}:{line + 1}: " in result.stdout
    assert "does not match its checksum; moved to" in result.stdout
    assert _outbox(sessions, tenant) == [i for i in range(3) if i != line]
    assert segments(tmp_path) == []
    quarantine = segment.with_name(segment.name + ".corrupt")
    assert quarantine.read_bytes() == damaged + b"\n"


def test_after_another_process_migrated_the_journal_emit_goes_to_the_database_again(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    database_url: str,
    sessions: sessionmaker[Session],
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This producer finds the database back at once, not only after its grace.
    monkeypatch.setattr(journal_module, "UNREACHABLE_GRACE_SECONDS", 0.0)
    journal = Journal(tmp_path)
    emit_events(unreachable, _events(tenant, 2), journal=journal)
    migrated = _migrate_cli(database_url, tmp_path)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert wait_for(lambda: not journal.backlogged, timeout=5)
    result = emit_event(engine, tenant_id=tenant, topic="orders", payload={"i": 2}, journal=journal)
    assert result.status is EnqueueStatus.ENQUEUED
    assert _outbox(sessions, tenant) == [0, 1, 2]


def test_a_dry_run_says_which_tenants_their_cap_would_hold_back(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    with sessions.begin() as session:
        report_tenant(session, tenant_id=tenant, pending=0, max_pending=10, publisher=tenant)
    emit_events(engine, _events(tenant, 8, start=100))
    journal = Journal(tmp_path)
    emit_events(unreachable, _events(tenant, 3), journal=journal)
    report = migrate_journal(tmp_path, engine, dry_run=True)
    held = report.tenants[tenant].held
    assert held is not None
    assert "had 8 pending events and its cap is 10" in held
    assert report.tenants[tenant].inserted == 2
    assert _outbox(sessions, tenant) == list(range(100, 108))


def test_migrating_one_tenant_leaves_the_others_records_and_their_file(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    other = f"o{uuid.uuid4().hex[:10]}"
    journal = Journal(tmp_path)
    emit_events(unreachable, _events(tenant, 2) + _events(other, 2), journal=journal)
    journal.close()
    report = migrate_journal(tmp_path, engine, tenants=[tenant])
    assert _outbox(sessions, tenant) == [0, 1]
    assert _outbox(sessions, other) == []
    assert len(report.kept) == 1
    assert migrate_journal(tmp_path, engine).tenants[other].inserted == 2
    assert segments(tmp_path) == []


def test_every_event_acknowledged_before_the_writer_was_killed_reaches_the_outbox(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session], tenant: str
) -> None:
    # The writer journals one event at a time (its database unreachable) and prints
    # each index once emit_event has returned; it is killed mid-stream, wherever it is.
    script = (
        "import socket, sys, pathlib\n"
        "from somabrain import Journal, emit_event\n"
        "from somabrain.store.engine import make_engine\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "down = make_engine(f'postgresql://postgres@127.0.0.1:{port}/x?connect_timeout=2')\n"
        "journal = Journal(pathlib.Path(sys.argv[1]), max_segment_bytes=20_000)\n"
        "for i in range(100_000):\n"
        "    emit_event(down, tenant_id=sys.argv[2], topic='orders',"
        " payload={'i': i, 'pad': 'x' * 200}, key='k', journal=journal)\n"
        "    print(i, flush=True)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path), tenant], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    acknowledged = -1
    for line in writer.stdout:
        acknowledged = int(line)
        if acknowledged >= 300:
            break
    writer.send_signal(signal.SIGKILL)
    writer.communicate(timeout=30)

    result = _migrate_cli(database_url, tmp_path, "--output", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    migrated = _outbox(sessions, tenant)
    # Every acknowledged event, in order, each once; the events written after the last
    # acknowledgement read are there too, and a write cut short is the only loss.
    assert migrated[: acknowledged + 1] == list(range(acknowledged + 1))
    assert migrated == list(range(len(migrated)))
    assert all(d["torn"] for d in json.loads(result.stdout)["damaged"])
    assert segments(tmp_path) == []


def test_an_event_journaled_after_a_commit_that_did_succeed_is_not_added_twice(
    tmp_path: Path,
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The row is committed, then the producer is told the commit failed (as when the
    # connection is lost while COMMIT is answered), so the event is journaled as well.
    # The loss is simulated after a real commit on the real database.
    from somabrain.delivery import journal as journal_module
    from somabrain.store.outbox import enqueue_validated as real

    def committed_then_lost(session: Session, rows: Any) -> Any:
        real(session, rows)
        session.commit()
        raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("connection lost"))

    monkeypatch.setattr(journal_module, "enqueue_validated", committed_then_lost)
    journal = Journal(tmp_path)
    result = emit_event(engine, tenant_id=tenant, topic="orders", payload={"i": 0}, journal=journal)
    monkeypatch.undo()
    assert result.status is EnqueueStatus.JOURNALED
    journal.close()
    report = migrate_journal(tmp_path, engine)
    assert (report.tenants[tenant].inserted, report.tenants[tenant].duplicates) == (0, 1)
    assert _outbox(sessions, tenant) == [0]


def _journal_segments(directory: Path, tenant: str, unreachable: Engine, n: int) -> Journal:
    """`n` events of one key in several segments, the database unreachable."""
    journal = Journal(directory, max_segment_bytes=4_000)
    for start in range(0, n, 10):
        emit_events(unreachable, _events(tenant, 10, start=start), journal=journal)
    assert len(segments(directory)) > 2
    return journal


def test_a_second_migration_waits_for_the_first_and_order_per_key_is_kept(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    database_url: str,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    _journal_segments(tmp_path, tenant, unreachable, 200)
    first_chunk_in, go_on = threading.Event(), threading.Event()

    def slow(n: int) -> None:
        first_chunk_in.set()
        go_on.wait(60)

    first = threading.Thread(target=migrate_journal, args=(tmp_path, engine),
                             kwargs={"batch": 5, "on_records": slow})  # fmt: skip
    first.start()
    try:
        assert first_chunk_in.wait(30)
        refused = _migrate_cli(database_url, tmp_path, "--wait", "0.5")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "another migration of journal" in refused.stderr
        assert _outbox(sessions, tenant) == list(range(5))
    finally:
        go_on.set()
        first.join(60)
    assert _outbox(sessions, tenant) == list(range(200))
    assert segments(tmp_path) == []


def test_a_segment_that_stays_locked_stops_the_run_and_the_later_ones_wait(
    tmp_path: Path,
    unreachable: Engine,
    database_url: str,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    _journal_segments(tmp_path, tenant, unreachable, 100)
    first, *later = segments(tmp_path)
    fd = os.open(first, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer that never lets go
    try:
        result = _migrate_cli(database_url, tmp_path)
    finally:
        os.close(fd)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"stopped at {first}: cannot be read or locked" in result.stdout
    assert _outbox(sessions, tenant) == []
    assert segments(tmp_path) == [first, *later]

    assert _migrate_cli(database_url, tmp_path).returncode == 0
    assert _outbox(sessions, tenant) == list(range(100))


def test_a_tenant_whose_cap_is_below_a_batch_migrates_up_to_its_cap_then_waits(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    database_url: str,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    with sessions.begin() as session:
        report_tenant(session, tenant_id=tenant, pending=0, max_pending=100, publisher=tenant)
    emit_events(unreachable, _events(tenant, 300), journal=Journal(tmp_path))
    result = _migrate_cli(database_url, tmp_path, "--output", "json")
    assert result.returncode == 1, result.stdout + result.stderr
    tally = json.loads(result.stdout)["tenants"][tenant]
    assert tally["inserted"] == 100
    assert "its cap is 100" in tally["held"]
    assert _outbox(sessions, tenant) == list(range(100))
    # Again at once, while the publisher's last report still says 0 pending: the room
    # is counted from the rows, so nothing more goes in.
    again = _migrate_cli(database_url, tmp_path, "--output", "json")
    assert json.loads(again.stdout)["tenants"][tenant]["inserted"] == 0
    assert _outbox(sessions, tenant) == list(range(100))

    with sessions.begin() as session:
        session.execute(delete(OutboxEvent).where(OutboxEvent.tenant_id == tenant))
        report_tenant(session, tenant_id=tenant, pending=0, max_pending=1000, publisher=tenant)
    assert migrate_journal(tmp_path, engine).tenants[tenant].inserted == 200
    assert _outbox(sessions, tenant) == list(range(100, 300))


def test_a_tenant_held_back_by_its_cap_holds_back_no_other_tenant(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = f"{tenant}-other"
    with sessions.begin() as session:
        report_tenant(session, tenant_id=tenant, pending=10, max_pending=10, publisher=tenant)
    journal = Journal(tmp_path)
    emit_events(unreachable, _events(tenant, 3) + _events(other, 3), journal=journal)

    with caplog.at_level("WARNING", logger="somabrain.delivery.journal"):
        JournalMigrator(journal, engine).run_once()
    assert f"tenant {tenant}'s events wait in the journal" in caplog.text
    assert journal.held_tenants == frozenset({tenant})
    assert _outbox(sessions, other) == [0, 1, 2]
    later = emit_event(engine, tenant_id=other, topic="orders", payload={"i": 3}, journal=journal)
    assert later.status is EnqueueStatus.ENQUEUED
    assert _outbox(sessions, other) == [0, 1, 2, 3]
    with pytest.raises(BacklogOverCap):
        emit_event(engine, tenant_id=tenant, topic="orders", payload={"i": 3}, journal=journal)


def test_rows_a_killed_migration_committed_are_not_migrated_again_after_they_were_purged(
    tmp_path: Path,
    unreachable: Engine,
    database_url: str,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    emit_events(unreachable, _events(tenant, 1000), journal=Journal(tmp_path))
    # Killed after its second committed chunk, in the middle of the segment.
    committed = _migration_killed_after(tmp_path, database_url, chunks=2, batch=100)
    assert committed == 200
    # Sent and purged since (retention, or an admin's purge): the outbox forgot them.
    with sessions.begin() as session:
        session.execute(delete(OutboxEvent).where(OutboxEvent.tenant_id == tenant))

    result = _migrate_cli(database_url, tmp_path, "--output", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    tally = json.loads(result.stdout)["tenants"][tenant]
    assert (tally["inserted"], tally["duplicates"]) == (800, 200)
    assert _outbox(sessions, tenant) == list(range(200, 1000))
    assert list(tmp_path.glob("*.done")) == []


def test_a_directory_named_like_a_journal_file_is_not_taken_for_one(
    tmp_path: Path,
    unreachable: Engine,
    database_url: str,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    (tmp_path / "0000000000000000.journal").mkdir()
    emit_events(unreachable, _events(tenant, 3), journal=Journal(tmp_path))
    for dry_run in (["--dry-run"], []):
        result = _migrate_cli(database_url, tmp_path, *dry_run)
        assert result.returncode == 0, result.stdout + result.stderr
    assert _outbox(sessions, tenant) == [0, 1, 2]


def test_a_database_that_stops_answering_costs_an_emit_its_timeout_then_events_are_journaled(
    tmp_path: Path,
    engine: Engine,
    database_url: str,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    url = sqlalchemy.engine.make_url(database_url)
    with SilentProxy((url.host or "127.0.0.1", url.port or 5432)) as proxy:
        proxied = make_engine(
            url.set(port=proxy.port).render_as_string(hide_password=False), pool_size=1
        )
        journal = Journal(tmp_path, database_timeout=1.0)
        first = emit_event(proxied, tenant_id=tenant, topic="orders", payload={"i": 0},
                           key="k", journal=journal)  # fmt: skip
        assert first.status is EnqueueStatus.ENQUEUED
        # The network path stops carrying packets: the pooled connection neither
        # answers nor breaks, and new ones are never answered either.
        proxy.silence_existing()
        proxy.silence_new(True)
        statuses: list[EnqueueStatus] = []

        def emit_during_the_outage() -> None:
            for i in (1, 2, 3):
                result = emit_event(proxied, tenant_id=tenant, topic="orders",
                                    payload={"i": i}, key="k", journal=journal)  # fmt: skip
                statuses.append(result.status)

        emitter = threading.Thread(target=emit_during_the_outage)
        emitter.start()
        emitter.join(60)
        assert not emitter.is_alive(), "emit_event waited on a database that never answers"
        assert statuses == [EnqueueStatus.JOURNALED] * 3
    journal.close()
    proxied.dispose()
    migrate_journal(tmp_path, engine)
    assert _outbox(sessions, tenant) == [0, 1, 2, 3]


def test_one_migration_run_lets_in_no_more_than_the_cap_has_room_for(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    # The publisher's report (0 pending) is fresh, and each chunk alone is under the cap.
    with sessions.begin() as session:
        report_tenant(session, tenant_id=tenant, pending=0, max_pending=1000, publisher=tenant)
    journal = Journal(tmp_path)
    for start in range(0, 3000, 500):
        emit_events(unreachable, _events(tenant, 500, start=start), journal=journal)
    report = migrate_journal(tmp_path, engine, batch=500)
    assert report.tenants[tenant].inserted == 1000
    assert report.tenants[tenant].held is not None
    assert _outbox(sessions, tenant) == list(range(1000))


def test_a_transaction_left_open_on_a_dedupe_key_holds_back_its_tenant_only(
    tmp_path: Path,
    unreachable: Engine,
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    other = f"{tenant}-other"
    journal = Journal(tmp_path)
    [journaled] = emit_events(unreachable, _events(tenant, 1), journal=journal)
    emit_events(unreachable, _events(other, 3), journal=journal)
    # The same event's transaction, its COMMIT lost: the server still holds it open.
    with sessions() as stuck:
        open_one = enqueue_event(stuck, tenant_id=tenant, topic="orders", payload={"i": 0},
                                 key="k", dedupe_key=journaled.dedupe_key)  # fmt: skip
        assert open_one.status is EnqueueStatus.ENQUEUED
        report = migrate_journal(tmp_path, engine)
        held = report.tenants[tenant].held
        assert held is not None, report
        assert "a transaction that has not ended holds one" in held
        assert _outbox(sessions, other) == [0, 1, 2]
        stuck.rollback()
    assert migrate_journal(tmp_path, engine).tenants[tenant].inserted == 1
    assert _outbox(sessions, tenant) == [0]
    assert segments(tmp_path) == []


def test_when_neither_the_database_nor_the_journal_takes_an_emit_it_says_with_which_keys_to_retry(
    tmp_path: Path,
    engine: Engine,
    sessions: sessionmaker[Session],
    tenant: str,
) -> None:
    journal = Journal(tmp_path, database_timeout=1.0, max_bytes=10)
    with sessions() as locker:
        locker.execute(text("LOCK TABLE outbox_events IN EXCLUSIVE MODE"))
        with pytest.raises(EmitOutcomeUnknown, match="may still commit these 1 events") as refused:
            emit_event(engine, tenant_id=tenant, topic="orders", payload={"i": 0}, journal=journal)
        locker.rollback()
    [key] = refused.value.dedupe_keys
    # The call that timed out commits once the lock is gone; the retry is a duplicate.
    assert wait_for(lambda: _outbox(sessions, tenant) == [0], timeout=30)
    journal.note_reachable()
    again = emit_event(engine, tenant_id=tenant, topic="orders", payload={"i": 0},
                       dedupe_key=key, journal=journal)  # fmt: skip
    assert again.status is EnqueueStatus.DUPLICATE
    assert _outbox(sessions, tenant) == [0]
