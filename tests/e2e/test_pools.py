"""Shared publisher pools on the real API server and database: one publisher for the
pool's members, refusing a member whose settings it cannot honour, following members
as they join, leave and change mode."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from somabrain_operator.children import TENANT_FILE, pool_publisher_name, publisher_name
from sqlalchemy import text

from devenv.mainjob import MainJob
from somabrain import enqueue_event
from somabrain.store.engine import make_sessionmaker
from tests.e2e.helpers import (
    GROUP,
    VERSION,
    apply,
    clean_namespace,
    condition,
    get,
    has_condition,
    tenant,
)
from tests.support import wait_for

pytestmark = pytest.mark.e2e

POOL = "small"
SHARED = {"mode": "shared", "pool": POOL}


def _config(job: MainJob, name: str) -> Any | None:
    try:
        return client.CoreV1Api(job.api).read_namespaced_config_map(name, job.namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _pool_tenants(job: MainJob) -> str | None:
    config = _config(job, pool_publisher_name(POOL))
    return None if config is None else str(config.data["SOMABRAIN_TENANTS"])


def _deployment(job: MainJob, name: str) -> Any | None:
    try:
        return client.AppsV1Api(job.api).read_namespaced_deployment(name, job.namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _pending(job: MainJob, tenant_id: str) -> int:
    with job.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM outbox_events WHERE tenant_id = :t AND status = 'pending'"
                ),
                {"t": tenant_id},
            ).scalar_one()
        )


def _rows(job: MainJob, tenant_id: str) -> int:
    with job.engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM outbox_events WHERE tenant_id = :t"), {"t": tenant_id}
            ).scalar_one()
        )


def _delete(job: MainJob, name: str) -> None:
    client.CustomObjectsApi(job.api).delete_namespaced_custom_object(
        GROUP, VERSION, job.namespace, "tenants", name
    )


def test_one_publisher_serves_the_pool_and_drains_every_member(job: MainJob) -> None:
    job.apply_tenants(
        [
            tenant("acme", publisher=SHARED, topics=["acme.orders"]),
            tenant("globex", publisher=SHARED, topics=["globex.orders"]),
        ]
    )
    for name in ("acme", "globex"):
        assert wait_for(lambda n=name: has_condition(job, n, "Ready", "True", "ServedByPool"))
    assert wait_for(lambda: _pool_tenants(job) == "acme,globex")

    deployment = _deployment(job, pool_publisher_name(POOL))
    assert deployment is not None
    assert sorted(o.name for o in deployment.metadata.owner_references) == ["acme", "globex"]
    assert _deployment(job, publisher_name("acme")) is None
    children = (get(job, "acme") or {})["status"]["children"]
    assert children["deployment"] == pool_publisher_name(POOL)
    # Each member keeps its own alerts (or a condition saying why not, on a cluster
    # without the PrometheusRule kind).
    alerts = condition(job, "acme", "AlertsConfigured")
    assert alerts is not None
    assert (alerts["status"] == "True") == ("prometheusRule" in children)

    sessions = make_sessionmaker(job.engine)
    with sessions.begin() as session:
        for tenant_id in ("acme", "globex"):
            for i in range(10):
                enqueue_event(
                    session, tenant_id=tenant_id, topic=f"{tenant_id}.orders", payload={"i": i}
                )
    assert job.start_publishers() == 1
    assert wait_for(lambda: _pending(job, "acme") == _pending(job, "globex") == 0, timeout=90)
    for name in ("acme", "globex"):
        assert wait_for(
            lambda n=name: has_condition(job, n, "PublisherAvailable", "True", "Reporting"),
            timeout=60,
        )


def test_a_member_the_pool_cannot_honour_is_refused_until_it_can_be(job: MainJob) -> None:
    job.apply_tenants([tenant("acme", publisher=SHARED)])
    assert wait_for(lambda: has_condition(job, "acme", "Ready", "True", "ServedByPool"))
    apply(job, "tenants", tenant("late", publisher=SHARED, deliveryMode="at-least-once"))

    assert wait_for(lambda: has_condition(job, "late", "Ready", "False", "PoolSettingsConflict"))
    assert _pool_tenants(job) == "acme"

    # The first member goes (no finalizer under Retain): the pool follows the next one,
    # whose settings now rule, and the refused member's status says so by itself.
    _delete(job, "acme")
    assert wait_for(lambda: _pool_tenants(job) == "late", timeout=30)
    assert wait_for(lambda: has_condition(job, "late", "Ready", "True", "ServedByPool"))
    cm = _config(job, pool_publisher_name(POOL))
    assert cm is not None
    assert cm.data["SOMABRAIN_DELIVERY_MODE"] == "at-least-once"
    assert "acme" not in cm.data[TENANT_FILE]


def test_members_moving_in_and_out_of_the_pool_take_their_publishers_with_them(
    job: MainJob,
) -> None:
    apply(job, "tenants", tenant("acme", publisher=SHARED))
    apply(job, "tenants", tenant("globex"))
    assert wait_for(lambda: has_condition(job, "globex", "Ready", "True", "ChildrenApplied"))
    assert wait_for(lambda: _pool_tenants(job) == "acme")

    # Dedicated to shared: its own publisher goes, the pool gains it.
    apply(job, "tenants", tenant("globex", publisher=SHARED))
    assert wait_for(lambda: _pool_tenants(job) == "acme,globex")
    assert wait_for(lambda: _deployment(job, publisher_name("globex")) is None)
    assert wait_for(lambda: has_condition(job, "globex", "Ready", "True", "ServedByPool"))

    # Shared to dedicated: the pool loses it, it gets its own publisher back.
    apply(job, "tenants", tenant("acme", publisher={"mode": "dedicated"}))
    assert wait_for(lambda: _pool_tenants(job) == "globex")
    assert wait_for(lambda: _deployment(job, publisher_name("acme")) is not None)

    # The last member goes: so does the pool's publisher.
    _delete(job, "globex")
    assert wait_for(lambda: _deployment(job, pool_publisher_name(POOL)) is None, timeout=30)
    assert _config(job, pool_publisher_name(POOL)) is None


def test_a_hand_deleted_pool_publisher_is_restored(job: MainJob) -> None:
    job.apply_tenants([tenant("acme", publisher=SHARED), tenant("globex", publisher=SHARED)])
    assert wait_for(lambda: _pool_tenants(job) == "acme,globex")
    assert wait_for(lambda: _deployment(job, pool_publisher_name(POOL)) is not None)

    client.AppsV1Api(job.api).delete_namespaced_deployment(pool_publisher_name(POOL), job.namespace)

    assert wait_for(lambda: _deployment(job, pool_publisher_name(POOL)) is not None, timeout=30)


def test_a_pool_member_deleted_under_delete_policy_loses_its_events_and_the_pool_goes_on(
    job: MainJob,
) -> None:
    job.apply_tenants(
        [
            tenant("keeper", publisher=SHARED),
            tenant("doomed", publisher=SHARED, deletionPolicy="Delete"),
        ]
    )
    assert wait_for(lambda: _pool_tenants(job) == "doomed,keeper")
    assert wait_for(lambda: (get(job, "doomed") or {})["metadata"].get("finalizers"))
    sessions = make_sessionmaker(job.engine)
    with sessions.begin() as session:
        for i in range(5):
            enqueue_event(session, tenant_id="doomed", topic="doomed.orders", payload={"i": i})
    assert job.start_publishers() == 1

    _delete(job, "doomed")

    # The running pool publisher holds doomed's lock until it restarts without it (the
    # local pod runner restarts it when its template changes, as a Deployment would).
    assert wait_for(lambda: job.start_publishers() == 1 and get(job, "doomed") is None, timeout=90)
    assert _rows(job, "doomed") == 0
    assert _pool_tenants(job) == "keeper"


def test_pools_of_one_name_in_two_namespaces_publish_under_different_names(
    job: MainJob,
) -> None:
    other = f"{job.namespace}-b"
    client.CoreV1Api(job.api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=other))
    )
    apply(job, "tenants", tenant("here", publisher=SHARED))
    there = tenant("there", publisher=SHARED)
    client.CustomObjectsApi(job.api).create_namespaced_custom_object(
        GROUP, VERSION, other, "tenants", {**there, "metadata": {"name": "there"}}
    )
    core = client.CoreV1Api(job.api)

    def pool_name(namespace: str) -> str | None:
        try:
            cm = core.read_namespaced_config_map(pool_publisher_name(POOL), namespace)
        except client.ApiException:
            return None
        return str(cm.data["SOMABRAIN_POOL"])

    try:
        assert wait_for(lambda: pool_name(job.namespace) and pool_name(other))
        # The name is the Kafka transactional id: one for both would fence one pool.
        assert pool_name(job.namespace) != pool_name(other)
    finally:
        clean_namespace(job.api, other)
