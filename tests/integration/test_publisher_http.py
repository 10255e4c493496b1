"""The publisher process's /metrics, /healthz and /readyz, with a standby beside it."""

from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from somabrain import enqueue_event
from tests.support import SOMABRAIN, publisher_env, wait_for


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture
def spawn(database_url: str, bootstrap: str, tenant: str, tmp_path: Path) -> Iterator[object]:
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> subprocess.Popen[bytes]:
        env = publisher_env(database_url, bootstrap, metrics_port=str(port))
        with (tmp_path / f"{port}.log").open("wb") as log:
            proc = subprocess.Popen(
                [SOMABRAIN, "publisher", "run", "--tenant", tenant],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(30)


def test_publisher_serves_health_readiness_and_tenant_metrics(
    spawn: object, sessions: sessionmaker[Session], tenant: str
) -> None:
    active_port, standby_port = _free_port(), _free_port()
    spawn(active_port)  # type: ignore[operator]
    assert wait_for(lambda: _get(active_port, "/readyz")[0] == 200)
    spawn(standby_port)  # type: ignore[operator]
    assert wait_for(lambda: _get(standby_port, "/healthz")[0] == 200)

    with sessions.begin() as session:
        for i in range(3):
            enqueue_event(session, tenant_id=tenant, topic=f"{tenant}.m", payload={"i": i})

    published = f'somabrain_events_published_total{{tenant="{tenant}"}} 3.0'
    assert wait_for(lambda: published in _get(active_port, "/metrics")[1])
    assert _get(standby_port, "/readyz")[0] == 503
    assert (
        f'somabrain_publisher_active{{tenant="{tenant}"}} 0.0' in _get(standby_port, "/metrics")[1]
    )
    assert _get(active_port, "/nowhere")[0] == 404
