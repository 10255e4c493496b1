"""O-8 on the real stack: the only publisher of a tenant dies while events keep coming.
Prometheus, scraping the publisher and evaluating the shipped alerting rules, names the
tenant; a new publisher takes over without manual steps, and the alert clears."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from devenv.common import free_port
from somabrain import enqueue_event
from somabrain.delivery.alerts import Thresholds, rule_group, rules_file
from somabrain.store.engine import make_engine, make_sessionmaker
from tests.integration.conftest import Prometheus
from tests.support import SOMABRAIN, publisher_env, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _alerts(prom: Prometheus, tenant: str) -> dict[str, str]:
    """alertname -> state (pending or firing) of the alerts naming `tenant`."""
    return {
        a["labels"]["alertname"]: a["state"]
        for a in prom.get("/api/v1/alerts")["alerts"]
        if a["labels"].get("tenant") == tenant
    }


def _active(prom: Prometheus, tenant: str) -> list[Any]:
    return prom.query(f'somabrain_publisher_active{{tenant="{tenant}"}} == 1')


def test_shipped_rules_pass_promtool_and_their_own_rule_tests(
    prom: Prometheus, tmp_path: Path
) -> None:
    shipped = ROOT / "deploy" / "prometheus"
    per_tenant = tmp_path / "acme.yaml"
    per_tenant.write_text(rules_file([rule_group(tenant="acme")]))

    checked = subprocess.run(
        [prom.promtool, "check", "rules", str(shipped / "somabrain-rules.yaml"), str(per_tenant)],
        capture_output=True,
        text=True,
        check=False,
    )
    tested = subprocess.run(
        [prom.promtool, "test", "rules", str(shipped / "somabrain-rules.test.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert tested.returncode == 0, tested.stdout + tested.stderr


@pytest.mark.timeout(300)
def test_a_tenant_without_a_live_publisher_is_named_by_an_alert_until_one_takes_over(
    prom: Prometheus, database_url: str, bootstrap: str, tenant: str, tmp_path: Path
) -> None:
    prom.add_rules(
        f"tenant-{tenant}",
        rules_file([rule_group(tenant=tenant, thresholds=Thresholds(publisher_down_for="0s"))]),
    )
    prom.reload()
    port = free_port()
    prom.add_targets(
        f"publisher-{tenant}",
        [{"targets": [f"127.0.0.1:{port}"], "labels": {"job": "somabrain-publisher"}}],
    )
    env = publisher_env(database_url, bootstrap, tenant=tenant, metrics_port=str(port))
    log = tmp_path / "publisher.log"
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)

    def spawn() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                [SOMABRAIN, "publisher", "run"], env=env, stdout=out, stderr=out
            )

    def sent() -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM outbox_events WHERE tenant_id = :t"
                        " AND status = 'sent'"
                    ),
                    {"t": tenant},
                ).scalar_one()
            )

    first = spawn()
    try:
        assert wait_for(lambda: _active(prom, tenant), timeout=60), log.read_text()[-2000:]
        assert wait_for(lambda: not _alerts(prom, tenant), timeout=30)

        first.send_signal(signal.SIGKILL)
        first.wait(10)
        with sessions.begin() as session:
            for i in range(20):
                enqueue_event(session, tenant_id=tenant, topic=f"{tenant}.o8", payload={"i": i})

        firing = wait_for(
            lambda: _alerts(prom, tenant).get("SomabrainPublisherDown") == "firing", timeout=60
        )
        assert firing, "no alert named the tenant whose publisher died"
        assert sent() == 0

        second = spawn()
        try:
            assert wait_for(lambda: sent() == 20, timeout=60), log.read_text()[-2000:]
            assert wait_for(lambda: not _alerts(prom, tenant), timeout=60)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
        engine.dispose()
