from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from somabrain.store.engine import make_engine, make_sessionmaker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url, pool_size=10)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


@pytest.fixture(scope="session")
def bootstrap(data_env: dict[str, str]) -> str:
    return data_env["KAFKA_BOOTSTRAP_SERVERS"]
