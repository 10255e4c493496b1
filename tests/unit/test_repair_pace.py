"""The periodic repair visits every Tenant once per repair interval, however few there are."""

from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest
from somabrain_operator import loop
from somabrain_operator.config import OperatorSettings


@pytest.mark.parametrize(("tenants", "interval"), [(1, 2.0), (2, 2.0), (7, 10.0), (1000, 10.0)])
def test_each_tenant_is_repaired_once_per_repair_period(
    monkeypatch: pytest.MonkeyPatch, tenants: int, interval: float
) -> None:
    repaired: Counter[str] = Counter()

    def reconcile(api: Any, body: Mapping[str, Any], **_: Any) -> None:
        repaired[body["metadata"]["uid"]] += 1

    monkeypatch.setattr(loop, "reconcile_known", reconcile)
    bodies: list[Mapping[str, Any]] = [{"metadata": {"uid": f"u{i}"}} for i in range(tenants)]
    settings = OperatorSettings(database_url=None)
    status_loop = loop.Loop(settings)

    ticks = round(settings.repair_interval_seconds / interval)
    for _ in range(ticks):
        status_loop._repair_slice(None, bodies, interval)  # type: ignore[arg-type]

    assert sorted(repaired.values()) == [1] * tenants
