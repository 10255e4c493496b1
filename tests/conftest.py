"""Fixtures shared by every tier.

Integration and end-to-end tests run against a local stack of their own (real Postgres,
Kafka, etcd, kube-apiserver and Prometheus), started once per session in `$SOMABRAIN_TEST_STACK`
(default `.devenv/test`) and torn down afterwards. Unit tests never start it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from devenv import stack
from somabrain.store.engine import engine_url

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def stack_dir() -> Iterator[Path]:
    """The session's stack folder; everything started in it is stopped at the end
    (unless SOMABRAIN_TEST_KEEP_STACK=1, to iterate quickly on a running stack)."""
    state_dir = ROOT / os.environ.get("SOMABRAIN_TEST_STACK", ".devenv/test")
    yield state_dir
    if os.environ.get("SOMABRAIN_TEST_KEEP_STACK") != "1":
        stack.down(state_dir)


@pytest.fixture(scope="session")
def postgres_env(stack_dir: Path) -> dict[str, str]:
    """Postgres only: for tests that need a database and no broker (the operator's)."""
    return stack.environment(stack.up(stack_dir, only=("postgres",)))


@pytest.fixture(scope="session")
def data_env(stack_dir: Path) -> dict[str, str]:
    """Postgres and Kafka only: what integration tests need."""
    return stack.environment(stack.up(stack_dir, only=("postgres", "kafka")))


@pytest.fixture(scope="session")
def stack_env(stack_dir: Path) -> dict[str, str]:
    """The whole stack, the Kubernetes API server included."""
    return stack.environment(stack.up(stack_dir))


@pytest.fixture(scope="session")
def prometheus_env(stack_dir: Path) -> dict[str, str]:
    """Postgres, Kafka and Prometheus, without the Kubernetes API server: publishers, and a
    Prometheus that scrapes them and evaluates alerting rules (PROMETHEUS_URL, PROMTOOL and
    the rules and targets folders, see devenv/prometheus.py)."""
    return stack.environment(stack.up(stack_dir, only=("postgres", "kafka", "prometheus")))


@pytest.fixture(scope="session")
def helm_binary(stack_dir: Path) -> str:
    """The stack's helm (built once into the cache, see devenv/helm.py); nothing runs."""
    return stack.environment(stack.up(stack_dir, only=("helm",)))["HELM"]


@pytest.fixture(scope="session")
def make_database(postgres_env: dict[str, str]) -> Callable[[], str]:
    """Create an empty database on the stack's server and return its URL."""
    admin_url = make_url(postgres_env["DATABASE_URL"]).set(database="postgres")

    def create() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        engine = create_engine(
            engine_url(admin_url.render_as_string(hide_password=False)),
            isolation_level="AUTOCOMMIT",
        )
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return (
            make_url(postgres_env["DATABASE_URL"])
            .set(database=name)
            .render_as_string(hide_password=False)
        )

    return create


@pytest.fixture(scope="session")
def database_url(make_database: Callable[[], str]) -> str:
    """A database migrated to the newest schema, shared by the session (tenants keep
    tests apart: each test uses tenant ids of its own)."""
    from somabrain.store import migrate

    url = make_database()
    migrate.upgrade(url)
    return url


@pytest.fixture
def tenant() -> str:
    """A tenant id no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}"
