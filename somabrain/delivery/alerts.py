"""Prometheus alerting rules on the publisher's metrics, defined once.

`rule_group` builds the rules for one tenant (what the operator puts in each Tenant's
PrometheusRule) or for every tenant at once (`deploy/prometheus/somabrain-rules.yaml`,
for deployments without the operator; `python -m somabrain.delivery.alerts` prints it).
Every alert carries the `tenant` label, so Alertmanager can route it to the tenant's
owners, and says what to look at.

"No live publisher" (case O-8) cannot come from the publisher itself: when the only
publisher of a tenant is gone, so are its metrics. `SomabrainPublisherDown` therefore
fires when no process reports `somabrain_publisher_active == 1` for a tenant: for one
tenant, as an `absent()` (also when its publisher never started); for all tenants, for
each tenant seen in the last hour that has lost its active publisher.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import yaml

from somabrain.delivery import metrics


@dataclasses.dataclass(frozen=True, slots=True)
class Thresholds:
    """When each alert fires; the defaults suit a tenant publishing a few hundred
    events per second."""

    backlog_warning: int = 10_000
    backlog_critical: int = 100_000
    oldest_pending_seconds: float = 300.0
    publisher_down_for: str = "1m"
    backlog_for: str = "10m"
    circuit_open_for: str = "5m"


def _name(metric: Any) -> str:
    # prometheus_client keeps a counter's name without its `_total` sample suffix.
    return str(metric._name)


def rule_group(
    *, tenant: str | None = None, thresholds: Thresholds | None = None, name: str | None = None
) -> dict[str, Any]:
    """One rule group: for `tenant`, or for every tenant when None."""
    t = thresholds or Thresholds()
    selector = f'{{tenant="{tenant}"}}' if tenant else '{tenant!=""}'
    active = _name(metrics.LOCK_HELD)
    if tenant:
        down = f"absent({active}{selector} == 1)"
    else:
        down = (
            f"max by (tenant) (max_over_time({active}{selector}[1h]))"
            f" unless on (tenant) (max by (tenant) ({active}{selector}) == 1)"
        )
    fixed = {"tenant": tenant} if tenant else {}

    def rule(
        alert: str, expr: str, wait: str, severity: str, summary: str, what: str
    ) -> dict[str, Any]:
        return {
            "alert": alert,
            "expr": expr,
            "for": wait,
            "labels": {"severity": severity, **fixed},
            "annotations": {"summary": summary, "description": what},
        }

    pending = f"max by (tenant) ({_name(metrics.PENDING)}{selector})"
    return {
        "name": name or (f"somabrain-tenant-{tenant}" if tenant else "somabrain-outbox"),
        "rules": [
            rule(
                "SomabrainPublisherDown",
                down,
                t.publisher_down_for,
                "critical",
                "No active publisher for tenant {{ $labels.tenant }}",
                "No process holds the publisher lock of tenant {{ $labels.tenant }}, so its "
                "events are not delivered. Check its publisher Deployment or pool: scaled to "
                "zero, crash-looping, or unable to reach the database.",
            ),
            rule(
                "SomabrainBacklogHigh",
                f"{pending} > {t.backlog_warning}",
                t.backlog_for,
                "warning",
                "Tenant {{ $labels.tenant }} has {{ $value }} pending events",
                "The backlog has stayed above the warning threshold: the publisher is not "
                "keeping up (quota, circuit, slow broker) or writers spiked.",
            ),
            rule(
                "SomabrainBacklogCritical",
                f"{pending} > {t.backlog_critical}",
                t.backlog_for,
                "critical",
                "Tenant {{ $labels.tenant }} has {{ $value }} pending events",
                "The backlog is near levels where enqueue refuses events (max_pending).",
            ),
            rule(
                "SomabrainOldestPendingTooOld",
                f"max by (tenant) ({_name(metrics.OLDEST_PENDING_AGE)}{selector})"
                f" > {t.oldest_pending_seconds:g}",
                "5m",
                "warning",
                "Tenant {{ $labels.tenant }}'s oldest pending event is {{ $value }}s old",
                "An event has waited too long: look for a retrying or dead event blocking "
                "its key, or an open circuit.",
            ),
            rule(
                "SomabrainDeadEvents",
                f"sum by (tenant) (increase({_name(metrics.DEAD)}_total{selector}[15m])) > 0",
                "0m",
                "warning",
                "Events of tenant {{ $labels.tenant }} went dead",
                "Kafka refused them for good, or they ran out of attempts; their reason is "
                "in last_error. Under poison policy block, later events of their keys wait.",
            ),
            rule(
                "SomabrainCircuitOpen",
                f"max by (tenant) ({_name(metrics.CIRCUIT_STATE)}{selector}) == 2",
                t.circuit_open_for,
                "critical",
                "Publishing for tenant {{ $labels.tenant }} is paused (circuit open)",
                "Its batches keep failing; the publisher probes Kafka again periodically. "
                "The publisher's log says why.",
            ),
        ],
    }


def rules_file(groups: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({"groups": groups}, sort_keys=False, width=100)


def main() -> int:
    sys.stdout.write(rules_file([rule_group()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
