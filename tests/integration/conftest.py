from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.event
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from devenv import prometheus
from somabrain.delivery.publisher import Publisher
from somabrain.store.engine import make_engine, make_sessionmaker
from tests.support import publishing

pytestmark = pytest.mark.integration


# Pooled connections given back in autocommit since the last test ended. The pool is
# shared by the whole session: such a connection would make every later "transaction"
# that draws it commit statement by statement, and a test of transactional behaviour
# pass or fail by the luck of the draw.
_RETURNED_IN_AUTOCOMMIT: list[str] = []


def _no_autocommit_in_the_pool(dbapi_connection: Any, _record: Any) -> None:
    if dbapi_connection is not None and dbapi_connection.autocommit:
        dbapi_connection.autocommit = False
        _RETURNED_IN_AUTOCOMMIT.append(repr(dbapi_connection))


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url, pool_size=10)
    sqlalchemy.event.listen(engine, "checkin", _no_autocommit_in_the_pool)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _pool_left_transactional() -> Iterator[None]:
    """Fail the test that gives a connection back to the shared pool in autocommit
    (detach a connection before changing its session state)."""
    yield
    returned, _RETURNED_IN_AUTOCOMMIT[:] = list(_RETURNED_IN_AUTOCOMMIT), []
    if returned:
        pytest.fail(f"connections given back to the shared pool in autocommit: {returned}")


@pytest.fixture(scope="session")
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


@pytest.fixture(scope="session")
def bootstrap(data_env: dict[str, str]) -> str:
    return data_env["KAFKA_BOOTSTRAP_SERVERS"]


@dataclass
class Prometheus:
    """The running server, and the rule and target files a test wrote (removed after it)."""

    url: str
    rules_dir: Path
    targets_dir: Path
    promtool: str
    written: list[Path] = field(default_factory=list)

    # S310: `url` is the stack's http://127.0.0.1 address, never a file: or custom scheme.
    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as response:  # noqa: S310
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def reload(self) -> None:
        request = urllib.request.Request(f"{self.url}/-/reload", method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                assert response.status == 200
        except urllib.error.HTTPError as exc:
            pytest.fail(f"reload refused ({exc.code}): {exc.read().decode()}")

    def query(self, promql: str) -> list[Any]:
        result: list[Any] = self.get("/api/v1/query", query=promql)["result"]
        return result

    def add_rules(self, name: str, text: str) -> Path:
        return self._add(self.rules_dir / f"{name}.yaml", text)

    def add_targets(self, name: str, groups: list[dict[str, Any]]) -> Path:
        return self._add(self.targets_dir / f"{name}.json", json.dumps(groups))

    def _add(self, path: Path, text: str) -> Path:
        # Written aside and renamed in: Prometheus watches the folder and must never read a
        # half-written file.
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text)
        os.replace(partial, path)
        self.written.append(path)
        return path


@pytest.fixture
def prom(prometheus_env: dict[str, str]) -> Iterator[Prometheus]:
    server = Prometheus(
        url=prometheus_env["PROMETHEUS_URL"],
        rules_dir=Path(prometheus_env[prometheus.RULES_ENV]),
        targets_dir=Path(prometheus_env[prometheus.TARGETS_ENV]),
        promtool=prometheus_env["PROMTOOL"],
    )
    yield server
    for path in server.written:
        path.unlink(missing_ok=True)
    if any(path.parent == server.rules_dir for path in server.written):
        server.reload()


@pytest.fixture
def run_publisher() -> Iterator[Callable[[Publisher], Publisher]]:
    """Start publishers in threads for the test; all are stopped, and waited for, after it."""
    with contextlib.ExitStack() as running:
        yield lambda publisher: running.enter_context(publishing(publisher))
