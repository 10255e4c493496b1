"""Which child events the operator answers with a repair: a child no longer as its
Tenant wants it, not one that is (its own apply seen before the apply returned, or a
change only to what the operator does not set, such as a Deployment's status)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import kopf
import pytest
from somabrain_operator import watch
from somabrain_operator.apply import stamped
from somabrain_operator.config import OperatorSettings
from somabrain_operator.reconcile import wanted_children
from somabrain_operator.state import KNOWN

TENANT: dict[str, Any] = {
    "apiVersion": "somabrain.io/v1alpha1",
    "kind": "Tenant",
    "metadata": {"name": "acme", "namespace": "team-a", "uid": "u-acme", "generation": 1},
    "spec": {"tenantId": "acme", "quotas": {"batchSize": 70}},
}


@pytest.fixture
def repairs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    done: list[str] = []
    monkeypatch.setattr(KNOWN, "settings", OperatorSettings(database_url=None))
    monkeypatch.setattr(KNOWN, "tenant", lambda uid: TENANT if uid == "u-acme" else None)
    monkeypatch.setattr(KNOWN, "policy", lambda namespace, name: None)
    monkeypatch.setattr(KNOWN, "pool_members", lambda namespace, pool: [])
    monkeypatch.setattr(KNOWN, "api", lambda: None)

    def reconcile(api: Any, body: Mapping[str, Any], **_: Any) -> None:
        done.append(body["metadata"]["name"])

    monkeypatch.setattr(watch, "reconcile_known", reconcile)
    return done


def _live(kind: str) -> dict[str, Any]:
    """The Tenant's child of `kind` as the API server would send it, with fields of its
    own; its resourceVersion is none the operator remembers writing."""
    [wanted] = [
        c
        for c in wanted_children(TENANT, policy_of=lambda n, p: None, settings=KNOWN.settings)
        if c["kind"] == kind
    ]
    live = copy.deepcopy(stamped(wanted))
    live["metadata"] |= {"uid": "c-1", "resourceVersion": "987654", "managedFields": [{}]}
    return live


def test_a_child_as_wanted_is_not_repaired_nor_reported(
    repairs: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    deployment = _live("Deployment")
    deployment["status"] = {"replicas": 1, "readyReplicas": 0, "observedGeneration": 3}

    with caplog.at_level(logging.WARNING):
        watch._repair("Deployment", "MODIFIED", kopf.Body(deployment))
        watch._repair("ConfigMap", "MODIFIED", kopf.Body(_live("ConfigMap")))

    assert repairs == []
    assert "someone else" not in caplog.text


def test_a_child_edited_by_someone_else_is_repaired_and_reported(
    repairs: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    config = _live("ConfigMap")
    config["data"] = dict.fromkeys(config["data"], "tenants: {}\n")

    with caplog.at_level(logging.WARNING):
        watch._repair("ConfigMap", "MODIFIED", kopf.Body(config))

    assert repairs == ["acme"]
    assert "was changed by someone else" in caplog.text
