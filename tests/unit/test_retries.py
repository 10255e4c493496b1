"""Refused Tenants are tried again by the status loop when their delay is over."""

from somabrain_operator.reconcile import Outcome
from somabrain_operator.state import Retries


def test_a_refusal_is_due_after_its_delay_and_a_success_ends_it() -> None:
    retries = Retries()
    retries.note("u1", Outcome({}, retry_after=60, error="ChildNameTaken"), now=100.0)
    retries.note("u2", Outcome({}, retry_after=10, error="ApplyFailed"), now=100.0)

    assert retries.due(now=105.0) == []
    assert retries.due(now=110.0) == ["u2"]
    # Still due until its next reconcile says again.
    assert sorted(retries.due(now=160.0)) == ["u1", "u2"]

    retries.note("u2", Outcome({}), now=160.0)
    retries.note("u1", Outcome({}, retry_after=60, error="ChildNameTaken"), now=160.0)
    assert retries.due(now=170.0) == []
    assert retries.due(now=220.0) == ["u1"]


def test_a_refusal_without_a_delay_waits_for_a_change_instead() -> None:
    # PolicyNotFound, InvalidSpec: the policy's arrival or an edit reconciles again.
    retries = Retries()
    retries.note("u1", Outcome({}, error="PolicyNotFound"), now=0.0)

    assert retries.due(now=1e9) == []


def test_the_longest_waiting_come_first_and_at_most_the_limit() -> None:
    retries = Retries()
    for i, at in enumerate([30.0, 10.0, 20.0]):
        retries.note(f"u{i}", Outcome({}, retry_after=0, error="ApplyFailed"), now=at)

    assert retries.due(now=100.0, limit=2) == ["u1", "u2"]
    assert retries.due(now=100.0) == ["u1", "u2", "u0"]


def test_an_older_reconcile_finishing_last_does_not_undo_a_newer_one() -> None:
    # The handler's reconcile started first and succeeded; the loop's retry started
    # later, was refused, and noted first: the refusal is the last word.
    retries = Retries()
    retries.note("u1", Outcome({}, retry_after=10, error="ApplyFailed"), now=50.0)
    retries.note("u1", Outcome({}), now=40.0)

    assert retries.due(now=60.0) == ["u1"]
