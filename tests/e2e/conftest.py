"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devenv.mainjob import MainJob


@pytest.fixture
def job(stack_env: dict[str, str], tmp_path: Path) -> Iterator[MainJob]:
    """The operator running against the stack, and a namespace of the test's own."""
    namespace = f"e2e-{uuid.uuid4().hex[:8]}"
    job = MainJob(stack_env, work_dir=tmp_path, namespace=namespace)
    job.prepare([])
    job.start_operator(env={"SOMABRAIN_OPERATOR_PUBLISHER_REPORT_MAX_AGE_SECONDS": "8"})
    yield job
    job.stop()
