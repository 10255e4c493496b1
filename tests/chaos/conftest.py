from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bootstrap(data_env: dict[str, str]) -> str:
    return data_env["KAFKA_BOOTSTRAP_SERVERS"]
