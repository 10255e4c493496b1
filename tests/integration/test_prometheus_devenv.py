"""The stack's Prometheus: its HTTP API, rules loaded from the rules folder, targets scraped
from the targets folder, alerts that fire, and promtool's verdict on rule files."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from devenv import prometheus, stack
from tests.integration.conftest import Prometheus
from tests.support import wait_for

pytestmark = pytest.mark.integration


@dataclass
class Exporter:
    """A /metrics endpoint on loopback serving one gauge, as a publisher would."""

    port: int
    gauge: Gauge


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    registry = CollectorRegistry()
    gauge = Gauge("devenv_test_backlog", "A value the test sets.", registry=registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    yield Exporter(port=server.server_port, gauge=gauge)
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def test_prometheus_answers_its_http_api_as_the_release_it_was_built_from(
    prom: Prometheus,
) -> None:
    assert prom.get("/api/v1/status/buildinfo")["version"] == prometheus.RELEASE
    [sample] = prom.query("vector(7)")
    assert sample["value"][1] == "7"


def test_a_rule_file_dropped_in_the_rules_folder_is_loaded_on_reload(prom: Prometheus) -> None:
    group = _name()
    path = prom.add_rules(
        group,
        f"""\
groups:
  - name: {group}
    rules:
      - record: devenv:constant
        expr: vector(1)
""",
    )

    prom.reload()

    groups = {g["name"]: g for g in prom.get("/api/v1/rules")["groups"]}
    assert group in groups
    assert groups[group]["file"] == str(path)
    assert [rule["name"] for rule in groups[group]["rules"]] == ["devenv:constant"]


def test_a_target_file_makes_prometheus_scrape_that_endpoint(
    prom: Prometheus, exporter: Exporter
) -> None:
    target = _name()
    exporter.gauge.set(42)

    prom.add_targets(
        target, [{"targets": [f"127.0.0.1:{exporter.port}"], "labels": {"target": target}}]
    )

    samples = wait_for(lambda: prom.query(f'devenv_test_backlog{{target="{target}"}}'))
    assert samples, "the gauge was never scraped"
    [sample] = samples
    assert sample["value"][1] == "42"
    assert sample["metric"]["job"] == prometheus.JOB
    assert sample["metric"]["instance"] == f"127.0.0.1:{exporter.port}"


def test_an_alert_on_the_scraped_gauge_fires_once_it_crosses_the_threshold(
    prom: Prometheus, exporter: Exporter
) -> None:
    target = _name()
    exporter.gauge.set(5)
    prom.add_targets(
        target, [{"targets": [f"127.0.0.1:{exporter.port}"], "labels": {"target": target}}]
    )
    prom.add_rules(
        target,
        f"""\
groups:
  - name: {target}
    rules:
      - alert: DevenvBacklogHigh
        expr: devenv_test_backlog{{target="{target}"}} > 10
        for: 2s
        labels:
          severity: page
        annotations:
          summary: "backlog is {{{{ $value }}}}"
""",
    )
    prom.reload()

    def rule_health() -> dict[str, Any] | None:
        for group in prom.get("/api/v1/rules", type="alert")["groups"]:
            if group["name"] == target:
                rule: dict[str, Any] = group["rules"][0]
                return rule
        return None

    def ours() -> list[dict[str, Any]]:
        return [
            alert
            for alert in prom.get("/api/v1/alerts")["alerts"]
            if alert["labels"].get("target") == target
        ]

    # Below the threshold: the gauge is scraped and the rule evaluated, and nothing fires.
    assert wait_for(lambda: prom.query(f'devenv_test_backlog{{target="{target}"}}'))
    evaluated = wait_for(lambda: (r := rule_health()) and r["health"] == "ok" and r)
    assert evaluated, f"the alerting rule was never evaluated: {rule_health()}"
    assert evaluated["state"] == "inactive"
    assert ours() == []

    exporter.gauge.set(20)

    firing = wait_for(lambda: [a for a in ours() if a["state"] == "firing"])
    assert firing, f"the alert never fired: {ours()}"
    [alert] = firing
    assert alert["labels"]["alertname"] == "DevenvBacklogHigh"
    assert alert["labels"]["severity"] == "page"
    assert alert["annotations"]["summary"] == "backlog is 20"


VALID_RULES = """\
groups:
  - name: somabrain
    rules:
      - alert: OutboxBacklog
        expr: sum by (tenant) (somabrain_pending_events) > 1000
        for: 5m
"""

INVALID_RULES = """\
groups:
  - name: somabrain
    rules:
      - alert: OutboxBacklog
        expr: sum by (tenant) (somabrain_pending_events > 1000
"""


def _promtool(prom: Prometheus, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [prom.promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_accepts_a_valid_rules_file_and_refuses_an_invalid_one_saying_why(
    prom: Prometheus, tmp_path: Path
) -> None:
    valid = tmp_path / "valid.yaml"
    valid.write_text(VALID_RULES)
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(INVALID_RULES)

    accepted = _promtool(prom, "check", "rules", str(valid))
    refused = _promtool(prom, "check", "rules", str(invalid))

    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "SUCCESS: 1 rules found" in accepted.stdout
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "FAILED" in refused.stderr
    assert "unclosed left parenthesis" in refused.stderr


def test_the_stack_s_prometheus_config_passes_promtool_check_config(
    prom: Prometheus, stack_dir: Path
) -> None:
    config = stack.load(stack_dir)["prometheus"].info["config"]

    checked = _promtool(prom, "check", "config", config)

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
