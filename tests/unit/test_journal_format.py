"""The local journal's file format and its writer: checksums, what counts as a write cut
short and what as corruption, segments, failed appends (files in a temporary
directory only)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from somabrain.config.errors import InvalidEvent
from somabrain.delivery.journal import (
    DatabaseTimeout,
    Journal,
    JournalBusy,
    JournalFull,
    JournalWriteFailed,
    MigrationReport,
    _parse,
    _settle_segment,
    decode_record,
    encode_record,
    segments,
)
from somabrain.store.outbox import NewEvent, ValidatedEvent, validate_events


def _rows(n: int, tenant: str = "acme") -> list[ValidatedEvent]:
    return validate_events(
        [
            NewEvent(tenant_id=tenant, topic="orders", payload={"i": i, "price": "1.10"}, key="k")
            for i in range(n)
        ],
        max_message_bytes=10_000,
    )


def _read(path: Path) -> tuple[list[ValidatedEvent], list[tuple[int, bool]]]:
    lines, damaged = _parse(path, path.read_bytes())
    return [x.row for x in lines if x.row is not None], [(d.line, d.torn) for d in damaged]


def test_a_record_round_trips_and_any_changed_byte_is_detected() -> None:
    row = _rows(1)[0]
    line = encode_record(row).rstrip(b"\n")
    assert decode_record(line) == row
    for at in range(len(line)):
        changed = bytearray(line)
        changed[at] ^= 0x01
        assert decode_record(bytes(changed)) != row


def test_an_appended_group_is_one_line_per_event_in_order(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    rows = _rows(5)
    journal.append(rows)
    [segment] = segments(tmp_path)
    assert _read(segment) == (rows, [])
    assert journal.backlogged


def test_a_last_line_without_its_newline_is_a_write_cut_short(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(_rows(3))
    [segment] = segments(tmp_path)
    whole = encode_record(_rows(1)[0])
    with segment.open("ab") as f:
        f.write(whole[: len(whole) // 2])  # the process died in the middle of a write
    rows, damaged = _read(segment)
    assert len(rows) == 3
    assert damaged == [(4, True)]


def test_zeros_at_the_end_after_a_machine_crash_are_a_write_cut_short(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(_rows(2))
    [segment] = segments(tmp_path)
    with segment.open("ab") as f:
        f.write(b"\0" * 300)
    rows, damaged = _read(segment)
    assert len(rows) == 2
    assert damaged == [(3, True)]


@pytest.mark.parametrize("line", [0, 1, 2])
def test_a_complete_line_that_does_not_match_its_checksum_is_corruption_wherever_it_is(
    tmp_path: Path, line: int
) -> None:
    # Its newline was written and fsynced with it: an acknowledged record, damaged
    # since, never mistaken for a write cut short, even as the last line.
    journal = Journal(tmp_path)
    journal.append(_rows(3))
    [segment] = segments(tmp_path)
    lines = segment.read_bytes().split(b"\n")
    lines[line] = lines[line].replace(b'"i\\":', b'"j\\":')
    segment.write_bytes(b"\n".join(lines))
    rows, damaged = _read(segment)
    assert len(rows) == 2
    assert damaged == [(line + 1, False)]


def test_a_file_that_is_not_a_journal_is_all_corruption(tmp_path: Path) -> None:
    segment = tmp_path / "0000000000000001.journal"
    segment.write_bytes(b"garbage\nmore garbage\n")
    assert _read(segment) == ([], [(1, False), (2, False)])


def test_no_lock_is_held_between_appends(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(_rows(1))
    [segment] = segments(tmp_path)
    fd = os.open(segment, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_an_append_never_waits_for_a_locked_segment_and_goes_to_a_new_one(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    journal.append(_rows(1))
    [first] = segments(tmp_path)
    fd = os.open(first, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a migrator is working on it
    try:
        journal.append(_rows(1))
    finally:
        os.close(fd)
    assert len(segments(tmp_path)) == 2
    assert len(_read(first)[0]) == 1


@pytest.mark.parametrize("how", ["replaced", "deleted"])
def test_a_segment_a_migrator_settles_while_the_writer_opens_it_is_never_appended_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # The writer has opened the segment and not locked it yet when a migrator, holding
    # the lock, replaces or deletes it: the writer must notice and start a new one.
    journal = Journal(tmp_path)
    journal.append(_rows(1))
    [first] = segments(tmp_path)
    real_open = os.open

    def open_then_settle(path: Any, flags: int, *args: Any) -> int:
        fd = real_open(path, flags, *args)
        if Path(path) == first and flags & os.O_APPEND:
            if how == "replaced":
                replacement = tmp_path / ".replacement"
                replacement.write_bytes(first.read_bytes())
                os.replace(replacement, first)
            else:
                first.unlink()
        return fd

    monkeypatch.setattr(os, "open", open_then_settle)
    journal.append(_rows(1, tenant="later"))
    monkeypatch.undo()
    files = segments(tmp_path)
    assert [len(_read(f)[0]) for f in files] == ([1, 1] if how == "replaced" else [1])
    assert _read(files[-1])[0][0].tenant_id == "later"


def test_segments_are_numbered_in_order_whatever_the_clock_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path, max_segment_bytes=600)
    rows = _rows(12)
    for n, row in enumerate(rows):
        monkeypatch.setattr(time, "time_ns", lambda n=n: 10**18 - n)
        journal.append([row])
    files = segments(tmp_path)
    assert len(files) > 2
    assert [r for f in files for r in _read(f)[0]] == rows


def test_a_failed_append_leaves_the_segment_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path)
    journal.append(_rows(2))
    [segment] = segments(tmp_path)
    size = segment.stat().st_size
    real_write = os.write

    def disk_full(fd: int, data: bytes | memoryview) -> int:
        real_write(fd, bytes(data)[:10])  # part of it reached the file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(JournalWriteFailed, match="No space left"):
        journal.append(_rows(1))
    monkeypatch.undo()
    assert segment.stat().st_size == size
    journal.append(_rows(1, tenant="after"))
    rows, damaged = _read(segments(tmp_path)[-1])
    assert damaged == []
    assert rows[-1].tenant_id == "after"


def test_settling_again_after_a_killed_settle_moves_no_corrupt_line_twice_and_leaves_no_copy(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    journal.append(_rows(3))
    [segment] = segments(tmp_path)
    raw = segment.read_bytes().split(b"\n")
    raw[0] = b"00000000" + raw[0][8:]
    segment.write_bytes(b"\n".join(raw))
    # A settle was killed after moving the corrupt line, with its replacement written
    # but not renamed; the records of line 2 were committed, line 3's were not.
    quarantine = segment.with_name(segment.name + ".corrupt")
    quarantine.write_bytes(raw[0] + b"\n")
    stale = segment.with_name(f".{segment.name}.0badc0de")
    stale.write_bytes(raw[2] + b"\n")

    lines, damaged = _parse(segment, segment.read_bytes())
    report = MigrationReport(dry_run=False)
    _settle_segment(segment, lines=lines, done={2}, damaged=damaged, report=report)

    assert quarantine.read_bytes() == raw[0] + b"\n"
    assert not stale.exists()
    assert segment.read_bytes() == raw[2] + b"\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_full_journal_refuses_the_append_and_writes_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=1_000)
    journal.append(_rows(3))
    size = sum(p.stat().st_size for p in segments(tmp_path))
    with pytest.raises(JournalFull, match="somabrain journal migrate"):
        journal.append(_rows(10))
    assert sum(p.stat().st_size for p in segments(tmp_path)) == size


def test_a_journal_left_with_segments_starts_backlogged_until_they_are_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not Journal(tmp_path).backlogged
    Journal(tmp_path).append(_rows(1))
    reopened = Journal(tmp_path)
    assert reopened.backlogged
    for segment in segments(tmp_path):
        segment.unlink()  # migrated by another process
    later = time.monotonic() + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert not reopened.backlogged


def test_invalid_events_are_refused_before_anything_is_journaled() -> None:
    with pytest.raises(InvalidEvent):
        validate_events([NewEvent(tenant_id="acme", topic="bad topic!", payload={})])


def test_an_emit_waits_for_a_hung_migration_pass_only_so_long_then_is_refused(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path, database_timeout=0.1)
    journal.append(_rows(1))
    hung, release = threading.Event(), threading.Event()

    def migrate_on_a_hung_database() -> MigrationReport:
        hung.set()
        release.wait(60)
        return MigrationReport(dry_run=False)

    drain = threading.Thread(target=journal.drain, args=(migrate_on_a_hung_database,))
    drain.start()
    try:
        assert hung.wait(10)
        with pytest.raises(JournalBusy, match="nothing was written, retry later"):
            journal.append(_rows(1, tenant="later"))
    finally:
        release.set()
        drain.join(10)
    assert [len(_read(f)[0]) for f in segments(tmp_path)] == [1]


def test_a_new_segment_never_takes_the_number_of_notes_or_quarantine_left_behind(
    tmp_path: Path,
) -> None:
    (tmp_path / "0000000000000007.journal.done").write_text('["acme","d1"]\n')
    (tmp_path / "0000000000000009.journal.corrupt").write_bytes(b"garbage\n")
    Journal(tmp_path).append(_rows(1))
    assert [p.name for p in segments(tmp_path)] == ["0000000000000010.journal"]


def test_database_calls_stuck_for_good_hold_up_no_later_call_nor_the_process_exit(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path, database_timeout=0.2)
    forever = threading.Event()
    for _ in range(6):
        with pytest.raises(DatabaseTimeout, match=r"did not answer within 0\.2s"):
            journal.call_database(forever.wait)
    assert journal.call_database(lambda: 42) == 42
    journal.close()
    assert journal.call_database(lambda: 43) == 43
    forever.set()

    script = (
        "import pathlib, sys, threading\n"
        "from somabrain.delivery.journal import DatabaseTimeout, Journal\n"
        "journal = Journal(pathlib.Path(sys.argv[1]), database_timeout=0.2)\n"
        "try:\n"
        "    journal.call_database(threading.Event().wait)\n"
        "except DatabaseTimeout:\n"
        "    print('journaled instead')\n"
    )
    exited = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert exited.returncode == 0, exited.stderr
    assert exited.stdout == "journaled instead\n"


def test_an_error_of_the_call_reaches_the_caller_as_it_is(tmp_path: Path) -> None:
    def refuse() -> None:
        raise InvalidEvent("refused")

    with pytest.raises(InvalidEvent, match="refused"):
        Journal(tmp_path).call_database(refuse)
