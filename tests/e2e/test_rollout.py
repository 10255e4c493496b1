"""Staged rollouts of a feature flag across the Tenants of an OutboxPolicy, on the real
API server with the tenants' publishers running (case K-17)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client
from somabrain_operator import rollout
from somabrain_operator.children import TENANT_FILE, publisher_name

from devenv.mainjob import MainJob
from somabrain import enqueue_event
from somabrain.store.engine import make_sessionmaker
from tests.e2e.helpers import apply, get, policy, tenant
from tests.support import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def kubelet(job: MainJob) -> Iterator[None]:
    """Keep the tenants' publishers running as their Deployments say, restarting them
    when a Deployment rolls, as a kubelet would."""
    stop = threading.Event()

    def run() -> None:
        # A failed pass (the API server slow to answer on a loaded machine) is logged
        # (pytest shows it with a failure) and tried again a second later, as a kubelet
        # would, instead of ending the thread and every publisher start with it.
        while not stop.wait(1.0):
            try:
                job.runner.sync(job.namespace)
            except Exception:
                logging.getLogger(__name__).exception("kubelet pass failed")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(30)


def _state(job: MainJob, name: str, flag: str) -> dict[str, Any] | None:
    status = (get(job, name, "outboxpolicies") or {}).get("status") or {}
    return next((r for r in status.get("rollouts") or [] if r["flag"] == flag), None)


def _config(job: MainJob, tenant_id: str) -> dict[str, str]:
    cm = client.CoreV1Api(job.api).read_namespaced_config_map(
        publisher_name(tenant_id), job.namespace
    )
    return dict(cm.data)


def _flags(job: MainJob, tenant_id: str) -> dict[str, bool]:
    entry = yaml.safe_load(_config(job, tenant_id)[TENANT_FILE])["tenants"][tenant_id]
    return dict(entry.get("feature_flags") or {})


def _names(prefix: str, flag: str, *, inside: int, outside: int) -> tuple[list[str], list[str]]:
    """Tenant ids in the first half of the flag's cohorts, and outside it."""
    ins, outs = [], []
    for i in range(200):
        name = f"{prefix}-{i}"
        (ins if rollout.flag_on(flag, name, 50) else outs).append(name)
    return ins[:inside], outs[:outside]


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("kubelet")
def test_a_rollout_advances_while_canaries_are_healthy_and_ends_at_100(job: MainJob) -> None:
    flag = "exactly-once"
    canaries, later = _names("ro", flag, inside=2, outside=2)
    apply(
        job,
        "outboxpolicies",
        policy(
            "eos-rollout",
            featureFlags={flag: False},
            rollouts=[{"flag": flag, "steps": [50, 100], "dwellSeconds": 6}],
        ),
    )
    job.apply_tenants([tenant(t, policyRef={"name": "eos-rollout"}) for t in canaries + later])
    job.wait_ready(canaries + later, timeout=60)

    # First step: the canaries' publishers run exactly-once, the others not yet.
    assert wait_for(lambda: (_state(job, "eos-rollout", flag) or {}).get("percent") == 50)
    assert wait_for(
        lambda: all(_config(job, t)["SOMABRAIN_DELIVERY_MODE"] == "exactly-once" for t in canaries)
    )
    assert all(_config(job, t)["SOMABRAIN_DELIVERY_MODE"] == "at-least-once" for t in later)

    done = wait_for(
        lambda: (_state(job, "eos-rollout", flag) or {}).get("phase") == "Complete", timeout=180
    )
    assert done, _state(job, "eos-rollout", flag)
    state = _state(job, "eos-rollout", flag)
    assert state is not None
    assert state["percent"] == 100
    for t in canaries + later:
        assert _config(job, t)["SOMABRAIN_DELIVERY_MODE"] == "exactly-once"
        assert _flags(job, t)[flag] is True
    # Every publisher is running, and reported while the rollout went on.
    assert len(job.runner.sync(job.namespace)) == len(canaries + later)


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("kubelet")
def test_an_unhealthy_canary_rolls_the_flag_back_for_every_tenant(job: MainJob) -> None:
    flag = "dead-letter"
    (slow, *canaries), later = _names("rb", flag, inside=2, outside=2)
    # The slow canary publishes one event every 5 s and has 40 waiting: its backlog
    # stays over the gate's maximum.
    sessions = make_sessionmaker(job.engine)
    with sessions.begin() as session:
        for i in range(40):
            enqueue_event(session, tenant_id=slow, topic=f"{slow}.orders", payload={"i": i})
    apply(
        job,
        "outboxpolicies",
        policy(
            "gated",
            rollouts=[
                {
                    "flag": flag,
                    "steps": [50, 100],
                    "dwellSeconds": 120,
                    "healthGate": {"maxBacklog": 5},
                }
            ],
        ),
    )
    job.apply_tenants(
        [tenant(slow, policyRef={"name": "gated"}, quotas={"eventsPerSecond": 0.2, "batchSize": 1})]
        + [tenant(t, policyRef={"name": "gated"}) for t in [*canaries, *later]]
    )
    everyone = [slow, *canaries, *later]
    job.wait_ready(everyone, timeout=60)

    back = wait_for(
        lambda: (_state(job, "gated", flag) or {}).get("phase") == "RolledBack", timeout=120
    )
    assert back, _state(job, "gated", flag)
    state = _state(job, "gated", flag)
    assert state is not None
    assert slow in state["reason"]
    assert "pending events > 5" in state["reason"]
    assert wait_for(lambda: all(_flags(job, t).get(flag) is False for t in everyone))
    events = client.CoreV1Api(job.api).list_namespaced_event(job.namespace)
    assert any(e.reason == "RolloutRolledBack" and slow in e.message for e in events.items)
