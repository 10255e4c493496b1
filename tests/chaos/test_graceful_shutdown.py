"""SIGTERM in the middle of a drain: the publisher stops claiming, settles or abandons its
batch cleanly, releases its locks and exits 0 within its grace period; whoever comes
next delivers the rest, each event once."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from somabrain.config.types import TenantId
from somabrain.store.engine import make_engine
from somabrain.store.outbox import advisory_lock_key
from tests.support import SOMABRAIN, event_id, publisher_env, read_committed, wait_for

pytestmark = pytest.mark.integration
PER_TENANT = 4_000
GRACE_SECONDS = 5


def _seed(engine: Engine, tenant: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_events (tenant_id, topic, message_key, dedupe_key, payload)"
                " SELECT :t, :t || '.term', 'k' || (g % 20), 'e' || g,"
                " jsonb_build_object('n', g, 'pad', repeat('x', 1000))"
                " FROM generate_series(1, :n) AS g"
            ),
            {"t": tenant, "n": PER_TENANT},
        )


def _sent(engine: Engine, tenants: list[str]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM outbox_events WHERE tenant_id = ANY(:t)"
                    " AND status = 'sent'"
                ),
                {"t": tenants},
            ).scalar_one()
        )


def _lock_free(engine: Engine, tenant: str) -> bool:
    with engine.connect() as conn:
        key = advisory_lock_key(TenantId(tenant))
        taken = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        if taken:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        return taken


@pytest.mark.parametrize("shared", [False, True], ids=["dedicated", "shared"])
@pytest.mark.timeout(600)
def test_sigterm_mid_drain_exits_zero_in_grace_releases_locks_and_loses_nothing(
    shared: bool, database_url: str, bootstrap: str, tenant: str, tmp_path: Path
) -> None:
    tenants = [tenant, f"{tenant}-b", f"{tenant}-c"] if shared else [tenant]
    engine = make_engine(database_url)
    for name in tenants:
        _seed(engine, name)
    env = publisher_env(
        database_url, bootstrap, batch_size="200", shutdown_grace_seconds=str(GRACE_SECONDS)
    )
    if shared:
        env |= {"SOMABRAIN_TENANTS": ",".join(tenants), "SOMABRAIN_POOL": "term"}
    else:
        env["SOMABRAIN_TENANT"] = tenant
    log = tmp_path / "publisher.log"

    with log.open("ab") as out:
        first = subprocess.Popen([SOMABRAIN, "publisher", "run"], env=env, stdout=out, stderr=out)
    total = PER_TENANT * len(tenants)
    assert wait_for(lambda: _sent(engine, tenants) >= 600, timeout=120), log.read_text()[-3000:]
    first.send_signal(signal.SIGTERM)
    stopping = time.monotonic()
    assert first.wait(GRACE_SECONDS + 10) == 0, log.read_text()[-3000:]
    stopped_after = time.monotonic() - stopping
    assert stopped_after < GRACE_SECONDS + 5
    assert _sent(engine, tenants) < total, "stopped too late to test a mid-drain stop"
    assert all(_lock_free(engine, name) for name in tenants)

    with log.open("ab") as out:
        second = subprocess.Popen([SOMABRAIN, "publisher", "run"], env=env, stdout=out, stderr=out)
    try:
        assert wait_for(lambda: _sent(engine, tenants) == total, timeout=300)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(GRACE_SECONDS + 10) == 0

    for name in tenants:
        ids = [event_id(r) for r in read_committed(bootstrap, f"{name}.term", expected=PER_TENANT)]
        assert len(ids) == PER_TENANT
        assert len(set(ids)) == PER_TENANT
    engine.dispose()
