"""What the operator's log says of a clean-up in progress, and what it leaves out."""

import logging

from somabrain_operator.__main__ import _CleanupProgress, _RoutineSuccess
from somabrain_operator.tenant import Waiting


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("kopf.objects", level, __file__, 1, message, None, None)


def test_a_waiting_clean_up_is_logged_as_progress_and_a_failure_as_an_error() -> None:
    waiting = Waiting("draining: 30 events pending", delay=5)
    progress = _record(logging.ERROR, f"Handler 'clean_up' failed temporarily: {waiting}")
    failure = _record(logging.ERROR, "Handler 'reconcile' failed temporarily: 500")

    assert _CleanupProgress().filter(progress)
    assert _CleanupProgress().filter(failure)

    assert progress.levelno == logging.INFO
    assert failure.levelno == logging.ERROR


def test_kopf_s_routine_successes_are_left_out_and_failures_kept() -> None:
    routine = [
        "Handler 'reconcile' succeeded.",
        "Handler 'deployment_changed' succeeded.",
        "Creation is processed: 1 succeeded; 0 failed.",
        "Resuming is processed: 1 succeeded; 0 failed.",
    ]
    kept = [
        "Creation is processed: 0 succeeded; 1 failed.",
        "Tenant team-a/acme (tenant acme): ChildrenApplied: publisher Deployment ... applied",
    ]

    assert not any(_RoutineSuccess().filter(_record(logging.INFO, m)) for m in routine)
    assert all(_RoutineSuccess().filter(_record(logging.INFO, m)) for m in kept)
    assert _RoutineSuccess().filter(_record(logging.WARNING, routine[0]))


def test_a_request_kopf_retries_is_a_warning_and_one_it_gives_up_an_error() -> None:
    from somabrain_operator.__main__ import _RetriedRequest

    retried = _record(
        logging.ERROR, "Request attempt #1/9 failed; will retry: PATCH x -> APIClientError(429)"
    )
    given_up = _record(logging.ERROR, "Request attempt #9/9 failed; escalating: PATCH x -> 429")

    assert _RetriedRequest().filter(retried)
    assert _RetriedRequest().filter(given_up)
    assert retried.levelno == logging.WARNING
    assert given_up.levelno == logging.ERROR
