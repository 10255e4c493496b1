"""The main job end to end on the real API server, broker and database.

Three Tenants are applied; the operator (a real process) creates their Deployments;
each Deployment's container command runs as a local process with the environment it
declares; 10,000 events are enqueued; a read_committed consumer reads them back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devenv.mainjob import MainJob, database_rows, load_tenants, verify
from tests.e2e.helpers import clean_up

pytestmark = pytest.mark.e2e
EVENTS = 10_000


@pytest.fixture
def job(stack_env: dict[str, str], tmp_path: Path) -> Iterator[MainJob]:
    job = MainJob(stack_env, work_dir=tmp_path, namespace="e2e-main-job")
    yield job
    job.stop_operator()
    clean_up(job)
    job.stop()


@pytest.mark.timeout(900)
def test_main_job_delivers_every_event_once_in_key_order(job: MainJob) -> None:
    tenants = load_tenants()
    names = [t["metadata"]["name"] for t in tenants]
    job.prepare(tenants)
    job.start_operator()
    job.apply_tenants(tenants)
    job.wait_ready(names, timeout=180)

    assert job.start_publishers() == len(tenants)

    start = job.topic_ends([t["spec"]["topics"][0] for t in tenants])
    started = time.monotonic()
    enqueued = job.enqueue(tenants, total=EVENTS)
    consumed = job.consume(start, expected=EVENTS, timeout=300)
    tenant_ids = [t["spec"]["tenantId"] for t in tenants]
    rows = database_rows(job.engine, tenant_ids)
    verdict = verify(enqueued, consumed, rows, started_at=started)

    assert verdict.problems == []
    assert len(enqueued) == EVENTS
    assert len(consumed) == EVENTS
    assert {status for status, _, _ in rows.values()} == {"sent"}
    assert {r.tenant for r in verdict.reports} == set(tenant_ids)
    assert all(r.published == r.enqueued > 0 for r in verdict.reports)
