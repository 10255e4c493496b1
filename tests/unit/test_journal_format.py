"""The local journal's file format and how a segment is read: checksums, torn writes,
corruption, a segment still being written (files in a temporary directory only)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from somabrain.config.errors import InvalidEvent
from somabrain.delivery.journal import (
    Journal,
    JournalFull,
    _Locked,
    _read_segment,
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
    journal.close()
    [segment] = segments(tmp_path)
    read = _read_segment(segment, _Locked(None))
    assert read.rows == rows
    assert read.damaged == []
    assert journal.backlogged


def test_a_torn_last_record_is_reported_and_the_records_before_it_are_kept(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    journal.append(_rows(3))
    journal.close()
    [segment] = segments(tmp_path)
    whole = encode_record(_rows(1)[0])
    with segment.open("ab") as f:
        f.write(whole[: len(whole) // 2])  # the process died in the middle of a write
    read = _read_segment(segment, _Locked(None))
    assert len(read.rows) == 3
    [damage] = read.damaged
    assert (damage.line, damage.torn) == (4, True)


def test_zeros_at_the_end_after_a_machine_crash_count_as_a_torn_write(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(_rows(2))
    journal.close()
    [segment] = segments(tmp_path)
    with segment.open("ab") as f:
        f.write(b"\0" * 300)
    read = _read_segment(segment, _Locked(None))
    assert len(read.rows) == 2
    assert [d.torn for d in read.damaged] == [True]


def test_a_bad_record_between_good_ones_is_corruption_not_a_torn_write(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(_rows(3))
    journal.close()
    [segment] = segments(tmp_path)
    lines = segment.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"i\\":1', b'"i\\":7')
    segment.write_bytes(b"\n".join(lines))
    read = _read_segment(segment, _Locked(None))
    assert len(read.rows) == 2
    [damage] = read.damaged
    assert (damage.line, damage.torn) == (2, False)


def test_a_segment_its_writer_still_holds_is_read_without_its_unfinished_line(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    journal.append(_rows(2))
    [segment] = segments(tmp_path)
    with segment.open("ab") as f:
        f.write(b"0000")  # the writer is in the middle of its next record
    read = _read_segment(segment, _Locked(None))
    assert read.writing
    assert len(read.rows) == 2
    assert read.damaged == []
    journal.close()
    assert not _read_segment(segment, _Locked(None)).writing


def test_the_writer_holds_an_exclusive_lock_on_its_open_segment(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(_rows(1))
    [segment] = segments(tmp_path)
    fd = os.open(segment, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        journal.seal()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_segments_rotate_at_their_size_and_sort_in_the_order_written(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_segment_bytes=600)
    rows = _rows(12)
    for row in rows:
        journal.append([row])
    journal.close()
    files = segments(tmp_path)
    assert len(files) > 2
    read = [r for f in files for r in _read_segment(f, _Locked(None)).rows]
    assert read == rows


def test_a_full_journal_refuses_the_append_and_writes_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=1_000)
    journal.append(_rows(3))
    size = sum(p.stat().st_size for p in segments(tmp_path))
    with pytest.raises(JournalFull, match="somabrain journal migrate"):
        journal.append(_rows(10))
    assert sum(p.stat().st_size for p in segments(tmp_path)) == size


def test_a_journal_left_with_segments_starts_backlogged(tmp_path: Path) -> None:
    assert not Journal(tmp_path).backlogged
    first = Journal(tmp_path)
    first.append(_rows(1))
    first.close()
    assert Journal(tmp_path).backlogged


def test_invalid_events_are_refused_before_anything_is_journaled() -> None:
    with pytest.raises(InvalidEvent):
        validate_events([NewEvent(tenant_id="acme", topic="bad topic!", payload={})])
