"""The status loop skips Tenants whose copy and report are as at a tick that found their
status right, and looks again at those that changed."""

from collections.abc import Mapping
from typing import Any

import pytest
from somabrain_operator import loop, state
from somabrain_operator.config import OperatorSettings

from somabrain.store.outbox import TenantReport


def _body(uid: str, version: str) -> dict[str, Any]:
    return {
        "metadata": {"name": uid, "namespace": "n", "uid": uid, "generation": 1,
                     "resourceVersion": version},
        "spec": {"tenantId": uid},
        "status": {"observedGeneration": 1, "conditions": []},
    }  # fmt: skip


def _report(uid: str, *, seen: float, pending: int = 0) -> TenantReport:
    return TenantReport(
        tenant_id=uid,  # type: ignore[arg-type]
        pending=pending,
        oldest_pending_seconds=None,
        circuit="closed",
        publisher="p-1",
        seen_seconds_ago=seen,
    )


def test_unchanged_tenants_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []

    def write_status(api: Any, body: Mapping[str, Any], status: dict[str, Any]) -> bool:
        checked.append(body["metadata"]["uid"])
        return False  # as if the status were right already

    monkeypatch.setattr(loop, "write_status", write_status)
    monkeypatch.setattr(loop, "reconcile_known", lambda *a, **k: None)
    status_loop = loop.Loop(OperatorSettings(database_url=None))
    bodies = {"a": _body("a", "1"), "b": _body("b", "1")}
    monkeypatch.setattr(state.KNOWN, "tenants", {u: [b] for u, b in bodies.items()})

    status_loop.tick(None, 2.0)  # type: ignore[arg-type]
    assert sorted(checked) == ["a", "b"]
    checked.clear()
    status_loop.tick(None, 2.0)  # type: ignore[arg-type]
    assert checked == []

    bodies["b"]["metadata"]["resourceVersion"] = "2"
    status_loop.tick(None, 2.0)  # type: ignore[arg-type]
    assert checked == ["b"]


def test_a_report_is_looked_at_again_when_what_it_shows_changes() -> None:
    status_loop = loop.Loop(OperatorSettings(database_url=None))
    max_age = status_loop.settings.publisher_report_max_age_seconds
    assert status_loop._shown(_report("a", seen=1.0)) == status_loop._shown(_report("a", seen=2.0))
    assert status_loop._shown(_report("a", seen=1.0)) != status_loop._shown(
        _report("a", seen=max_age + 1)
    )
    assert status_loop._shown(_report("a", seen=1.0)) != status_loop._shown(
        _report("a", seen=1.0, pending=3)
    )
    assert status_loop._shown(None) != status_loop._shown(_report("a", seen=1.0))
